"""Records as the HTTP API shows them: the JSON shapes of runs, maps, jobs, versions and tokens.

The fields and their names are the API's, kept as they were when the routes read rows
(a map's ``cancelled`` is 0 or 1, as SQLite stored it).
"""

from __future__ import annotations

from ..control.views import Page, Progress
from ..records.base import (TERMINAL, AttemptRecord, BatchRecord, JobRecord, RunRecord, ScheduleRecord, SecretRecord, TokenRecord,
                            VersionRecord)


def run_json(run: RunRecord, base: str = "") -> dict:
    out = {"id": run.id, "job_id": run.job_id, "version": run.version, "status": run.status, "trigger": run.trigger,
           "created_at": run.created_at, "started_at": run.started_at, "finished_at": run.finished_at,
           "exit_reason": run.exit_reason, "error_type": run.error_type, "attempt": run.attempt,
           "max_retries": run.max_retries, "timeout": run.timeout}
    if run.batch_id:
        out["batch_id"], out["batch_index"] = run.batch_id, run.batch_index
    if run.expired_at is not None:
        out["expired_at"] = run.expired_at  # its arguments, result and log are gone (410)
    if run.retry_at is not None:
        out["retry_at"] = run.retry_at  # queued: its next attempt starts then
    if run.schedule_id is not None:
        out["schedule_id"] = run.schedule_id
    if run.traceparent is not None:  # W3C: the run's trace and its own span; parent_span_id: its caller's
        out["traceparent"], out["parent_span_id"] = run.traceparent, run.parent_span_id
    if run.parent_run_id is not None:
        out["parent_run_id"] = run.parent_run_id  # the run whose code started it
    if base:
        out["links"] = {"self": f"{base}/runs/{run.id}", "result": f"{base}/runs/{run.id}/result",
                        "logs": f"{base}/runs/{run.id}/logs"}
    return out


def batch_json(batch: BatchRecord) -> dict:
    return {"id": batch.id, "workspace": batch.workspace, "job_id": batch.job_id, "version": batch.version,
            "concurrency": batch.concurrency, "total": batch.total, "submitted": batch.submitted, "done": batch.done,
            "cancelled": int(batch.cancelled), "created_at": batch.created_at}


def progress_json(progress: Progress) -> dict:
    """A map with its items by status (queued, running, succeeded, ...) and how many have finished."""
    return {**batch_json(progress.batch), "counts": progress.counts, "finished": progress.finished}


def page_json(page: Page, key: str, render, next_url: str) -> dict:
    """A page of a listing: its items under ``key``, the cursor of the next page and its URL (None at the end)."""
    return {key: [render(item) for item in page.items], "next": page.next,
            "next_url": f"{next_url}cursor={page.next}" if page.next else None}


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


def attempt_json(attempt: AttemptRecord | RunRecord, base: str = "") -> dict:
    """One attempt of a run: an earlier one (its record), or the run itself as its latest."""
    if isinstance(attempt, RunRecord):
        out = {"attempt": attempt.attempt, "status": attempt.status, "started_at": attempt.started_at,
               "finished_at": attempt.finished_at, "reason": attempt.exit_reason if attempt.status in TERMINAL else None,
               "error_type": attempt.error_type}
        run_id = attempt.id
    else:
        out = {"attempt": attempt.attempt, "status": attempt.status, "started_at": attempt.started_at,
               "finished_at": attempt.finished_at, "reason": attempt.reason, "error_type": attempt.error_type}
        run_id = attempt.run_id
    if base:
        out["logs"] = f"{base}/runs/{run_id}/logs?attempt={out['attempt']}"
    return out


def schedule_json(row: ScheduleRecord, job_name: str | None = None) -> dict:
    return {"id": row.id, "job_id": row.job_id, "job": job_name, "schedule": row.spec, "paused": row.paused,
            "next_fire_at": None if row.paused else row.next_fire_at, "pending": row.pending,
            "last_fire_at": row.last_fire_at, "last_run_id": row.last_run_id, "last_error": row.last_error,
            "created_at": row.created_at, "updated_at": row.updated_at}


def secret_json(row: SecretRecord) -> dict:
    """A secret as the API shows it: its name and keys, never a value."""
    return {"name": row.name, "keys": list(row.keys), "created_at": row.created_at, "updated_at": row.updated_at}


def token_json(token: TokenRecord) -> dict:
    return {"id": token.id, "name": token.name, "role": token.role, "created_at": token.created_at,
            "revoked_at": token.revoked_at}


# how open streams end when the platform stops: a map's result stream (the SDK reconnects), a followed log
SHUTTING_DOWN_LINE = '{"shutdown": true, "message": "the platform is shutting down: reconnect"}\n'
SHUTTING_DOWN_LOG = b"\n[opbox: the platform is shutting down: follow again to go on]\n"
