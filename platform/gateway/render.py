"""Records as the HTTP API shows them: the JSON shapes of runs, maps, jobs, versions and tokens.

The fields and their names are the API's, kept as they were when the routes read rows
(a map's ``cancelled`` is 0 or 1, as SQLite stored it).
"""

from __future__ import annotations

from ..records.base import BatchRecord, JobRecord, RunRecord, TokenRecord, VersionRecord


def run_json(run: RunRecord, base: str = "") -> dict:
    out = {"id": run.id, "job_id": run.job_id, "version": run.version, "status": run.status, "trigger": run.trigger,
           "created_at": run.created_at, "started_at": run.started_at, "finished_at": run.finished_at,
           "exit_reason": run.exit_reason, "error_type": run.error_type, "attempt": run.attempt,
           "max_retries": run.max_retries, "timeout": run.timeout}
    if run.batch_id:
        out["batch_id"], out["batch_index"] = run.batch_id, run.batch_index
    if run.expired_at is not None:
        out["expired_at"] = run.expired_at  # its arguments, result and log are gone (410)
    if base:
        out["links"] = {"self": f"{base}/runs/{run.id}", "result": f"{base}/runs/{run.id}/result",
                        "logs": f"{base}/runs/{run.id}/logs"}
    return out


def batch_json(batch: BatchRecord) -> dict:
    return {"id": batch.id, "workspace": batch.workspace, "job_id": batch.job_id, "version": batch.version,
            "concurrency": batch.concurrency, "total": batch.total, "submitted": batch.submitted, "done": batch.done,
            "cancelled": int(batch.cancelled), "created_at": batch.created_at}


def job_json(job: JobRecord) -> dict:
    return {"id": job.id, "name": job.name, "kind": job.kind, "created_at": job.created_at,
            "latest_version": job.latest_version}


def version_json(row: VersionRecord) -> dict:
    out = {"job_id": row.job_id, "version": row.version, "status": row.status, "entry": row.entry,
           "code_sha256": row.code_sha256, "requirements_sha256": row.requirements_sha256, "python": row.python,
           "cloudpickle": row.cloudpickle, "created_at": row.created_at, "ready_at": row.ready_at,
           "error": row.error, "resource": row.resource}
    if row.signature:  # a function deployed with its signature (JSON triggers are checked against it)
        out["signature"] = row.signature["text"]
    return out


def token_json(token: TokenRecord) -> dict:
    return {"id": token.id, "name": token.name, "role": token.role, "created_at": token.created_at,
            "revoked_at": token.revoked_at}


# how open streams end when the platform stops: a map's result stream (the SDK reconnects), a followed log
SHUTTING_DOWN_LINE = '{"shutdown": true, "message": "the platform is shutting down: reconnect"}\n'
SHUTTING_DOWN_LOG = b"\n[opbox: the platform is shutting down: follow again to go on]\n"
