"""Job-Runs: their durable records and their lifecycle.

queued → running → succeeded | failed | cancelled | timed_out. A failed run with retries
left goes back to queued. Every change is written to the state store before anyone is
told about it; waiters (long-polls, map result streams, log followers) are woken through
the notifier. This module never decodes payloads: it stores and hands over bytes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from dataclasses import dataclass, field

from opbox import envelope as serialization
from opbox.builder.base import Artifact
from opbox.errors import Conflict, NotFound, PayloadTooLarge, QuotaExceeded, ValidationError
from opbox.resource import Resource

from ..backends.base import Backend, RunTicket, VersionInfo
from ..ids import new_id
from ..notify import Notifier
from ..settings import Settings
from ..state import TERMINAL, State

log = logging.getLogger("opbox.runs")

LOG_DROPPED = b"[opbox: older output dropped: the run's log passed its size limit]\n"


@dataclass
class BatchState:
    """A map in flight: items waiting for a free slot under its concurrency limit."""

    id: str
    version: VersionInfo
    limit: int | None
    pending: deque = field(default_factory=deque)
    inflight: int = 0


@dataclass(frozen=True)
class Limits:
    """The run limits; defaults are the platform's (``Settings``), written there once."""

    max_payload: int = Settings.max_payload
    max_log_bytes: int = Settings.max_log_bytes
    max_batch_items: int = 10_000  # per submission request; a map may have any number
    max_open_runs: int = Settings.max_open_runs  # per workspace: queued + running; beyond it, 429 until some end
    cancel_grace: float = Settings.cancel_grace


class Runs:
    def __init__(self, state: State, backend: Backend, limits: Limits = Limits()):
        self.state = state
        self.backend = backend
        self.limits = limits
        self.notifier = Notifier()
        self.batches: dict[str, BatchState] = {}
        self._versions: dict[tuple[str, int], VersionInfo] = {}
        self.open_runs: dict[str, int] = {}  # per workspace, kept in step with the runs table

    def _reserve(self, workspace: str, count: int) -> None:
        open_now = self.open_runs.get(workspace, 0)
        if open_now + count > self.limits.max_open_runs:
            raise QuotaExceeded(
                f"workspace {workspace} has {open_now} runs queued or running and may have at most "
                f"{self.limits.max_open_runs}; retry when some have ended", retry_after=1)
        self.open_runs[workspace] = open_now + count

    # -- versions ------------------------------------------------------------------
    def version_info(self, job_id: str, version: int) -> VersionInfo:
        key = (job_id, version)
        info = self._versions.get(key)
        if info is None:
            row = self.state.version(job_id, version)
            job = self.state.one("SELECT * FROM jobs WHERE id = ?", job_id)
            if row is None or job is None:
                raise NotFound(f"job {job_id} has no version {version}")
            if row["status"] != "ready":
                raise Conflict(f"version {version} of job {job['name']} is {row['status']}, not ready")
            info = VersionInfo(
                workspace=job["workspace"], job_id=job_id, job_name=job["name"], version=version, kind=job["kind"],
                entry=row["entry"], resource=Resource.from_dict(row["resource"]),
                artifact=Artifact.from_dict(row["artifact"]),
            )
            self._versions[key] = info
        return info

    # -- creating runs -------------------------------------------------------------
    def _check_payload(self, payload: bytes) -> None:
        if len(payload) > self.limits.max_payload:
            raise PayloadTooLarge(f"arguments are {len(payload)} bytes; the limit is {self.limits.max_payload}")
        header = serialization.read_header(payload)
        if header["kind"] != serialization.ARGS:
            raise ValidationError(f"expected an args envelope, got {header['kind']!r}")

    def create(self, version: VersionInfo, payload: bytes, trigger: str) -> str:
        self._check_payload(payload)
        self._reserve(version.workspace, 1)
        run_id = new_id("r")
        res = version.resource
        row = (run_id, version.workspace, version.job_id, version.version, "queued", trigger, time.time(),
               res.max_retries, res.timeout, None, None)
        try:
            self.state.insert_runs([row], [(run_id, payload)])
        except BaseException:
            self.open_runs[version.workspace] -= 1
            raise
        self._dispatch(RunTicket(run_id, version.workspace, version.job_id, version.version, res.timeout), version)
        return run_id

    def create_batch(self, version: VersionInfo, concurrency: int | None) -> str:
        if concurrency is not None and (not isinstance(concurrency, int) or concurrency < 1):
            raise ValidationError(f"concurrency must be a whole number >= 1, got {concurrency!r}")
        batch_id = new_id("b")
        self.state.db.execute(
            "INSERT INTO batches(id, workspace, job_id, version, concurrency, created_at) VALUES (?,?,?,?,?,?)",
            (batch_id, version.workspace, version.job_id, version.version, concurrency, time.time()),
        )
        self.batches[batch_id] = BatchState(batch_id, version, concurrency)
        return batch_id

    def batch(self, workspace: str, batch_id: str) -> dict:
        row = self.state.one("SELECT * FROM batches WHERE id = ? AND workspace = ?", batch_id, workspace)
        if row is None:
            raise NotFound(f"no batch {batch_id}")
        return row

    def add_items(self, workspace: str, batch_id: str, start: int, payloads: list[bytes]) -> tuple[int, int]:
        """Add items ``start, start+1, ...`` to a batch; idempotent per index.

        Returns (new, accepted): how many were new, and how many from the front are now stored.
        Under the workspace's open-runs quota only a prefix may fit; the caller sends the rest
        later. Nothing fitting at all is a 429.
        """
        row = self.batch(workspace, batch_id)
        if row["cancelled"]:
            raise Conflict(f"batch {batch_id} was cancelled")
        if row["total"] is not None and start + len(payloads) > row["total"]:
            raise Conflict(f"batch {batch_id} is sealed at {row['total']} items")
        if len(payloads) > self.limits.max_batch_items:
            raise PayloadTooLarge(f"at most {self.limits.max_batch_items} items per request, got {len(payloads)}")
        for payload in payloads:
            self._check_payload(payload)
        state = self._batch_state(row)
        version = state.version
        res = version.resource
        existing = {
            r[0] for r in self.state.db.execute(
                "SELECT batch_index FROM runs WHERE batch_id = ? AND batch_index BETWEEN ? AND ?",
                (batch_id, start, start + len(payloads) - 1),
            )
        }
        room = self.limits.max_open_runs - self.open_runs.get(workspace, 0)
        now = time.time()
        rows, blobs, tickets = [], [], []
        accepted = 0
        for offset, payload in enumerate(payloads):
            index = start + offset
            if index not in existing:
                if len(rows) >= room:
                    break
                run_id = f"r-{batch_id[2:]}.{index}"  # time-ordered like other runs; unique per index
                rows.append((run_id, workspace, version.job_id, version.version, "queued", "map", now,
                             res.max_retries, res.timeout, batch_id, index))
                blobs.append((run_id, payload))
                tickets.append(RunTicket(run_id, workspace, version.job_id, version.version, res.timeout,
                                         batch_id=batch_id))
            accepted += 1
        if accepted == 0:
            self._reserve(workspace, 1)  # raises the quota's 429
        if rows:
            self._reserve(workspace, len(rows))
            try:
                self._insert_items(batch_id, rows, blobs)
            except BaseException:
                self.open_runs[workspace] -= len(rows)
                raise
            for ticket in tickets:
                self._dispatch(ticket, version)
        return len(rows), accepted

    def _insert_items(self, batch_id: str, rows: list, blobs: list) -> None:
        with self.state.tx() as db:
            db.executemany(
                "INSERT INTO runs(id, workspace, job_id, version, status, trigger, created_at, max_retries, "
                "timeout, batch_id, batch_index) VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows)
            db.executemany("INSERT INTO payloads(run_id, kind, data) VALUES (?, 'args', ?)", blobs)
            db.execute("UPDATE batches SET submitted = submitted + ? WHERE id = ?", (len(rows), batch_id))

    def seal_batch(self, workspace: str, batch_id: str, total: int) -> dict:
        row = self.batch(workspace, batch_id)
        if not isinstance(total, int) or total < 0:
            raise ValidationError(f"total must be a whole number >= 0, got {total!r}")
        if row["total"] is not None and row["total"] != total:
            raise Conflict(f"batch {batch_id} is already sealed at {row['total']} items")
        if row["submitted"] > total:
            raise Conflict(f"batch {batch_id} has {row['submitted']} items, more than {total}")
        self.state.db.execute("UPDATE batches SET total = ? WHERE id = ?", (total, batch_id))
        self.notifier.notify(f"batch:{batch_id}")
        return self.batch(workspace, batch_id)

    def _batch_state(self, row: dict) -> BatchState:
        state = self.batches.get(row["id"])
        if state is None:
            state = self.batches[row["id"]] = BatchState(
                row["id"], self.version_info(row["job_id"], row["version"]), row["concurrency"])
        return state

    def _dispatch(self, ticket: RunTicket, version: VersionInfo) -> None:
        if ticket.batch_id is not None:
            state = self.batches.get(ticket.batch_id)
            if state is not None and state.limit is not None:
                if state.inflight >= state.limit:
                    state.pending.append(ticket)
                    return
                state.inflight += 1
        self.backend.submit(ticket, version)

    # -- reading -------------------------------------------------------------------
    def get(self, workspace: str, run_id: str) -> dict:
        run = self.state.run(run_id)
        if run is None or run["workspace"] != workspace:
            raise NotFound(f"no run {run_id} in workspace {workspace}")
        return run

    async def wait(self, workspace: str, run_id: str, timeout: float) -> dict:
        """The run once it is terminal, or as it is when ``timeout`` passes."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            run = self.get(workspace, run_id)
            left = deadline - loop.time()
            if run["status"] in TERMINAL or left <= 0:
                return run
            await self.notifier.wait(run_id, left)

    def result(self, run_id: str) -> bytes | None:
        return self.state.payload(run_id, "result")

    # -- events from backends (RunEvents) ----------------------------------------------
    def run_args(self, run_id: str) -> bytes | None:
        return self.state.payload(run_id, "args")

    def run_started(self, run_id: str, worker: str) -> bool:
        cur = self.state.db.execute(
            "UPDATE runs SET status = 'running', started_at = ?, worker = ? WHERE id = ? AND status = 'queued'",
            (time.time(), worker, run_id),
        )
        return cur.rowcount == 1  # not queued any more: cancelled while it waited

    def run_finished(self, run_id: str, outcome: str, payload: bytes, error_type: str | None = None) -> None:
        if outcome not in ("succeeded", "failed"):
            outcome = "failed"
        reason = None
        if outcome == "failed":
            try:
                header = serialization.read_header(payload)
                reason = f"{header.get('type', 'error')}: {header.get('message', '')}"[:2000]
                error_type = error_type or header.get("type")
            except Exception:
                reason = "failed"
        self._end(run_id, outcome, reason, payload, error_type, retriable=True)

    def run_lost(self, run_id: str, reason: str, status: str = "failed") -> None:
        payload = serialization.error_envelope(f"opbox.{status}", reason)
        self._end(run_id, status, reason, payload, None, retriable=status == "failed")

    def append_log(self, run_id: str, data: bytes) -> None:
        """Append output; past the run's budget the oldest output goes, and a marker says so."""
        if not data:
            return
        run = self.state.one("SELECT log_bytes FROM runs WHERE id = ?", run_id)
        if run is None:
            return
        limit = self.limits.max_log_bytes
        dropped = False
        if len(data) > limit:  # keep the newest bytes, from a line start where there is one
            data = data[-limit:]
            newline = data.find(b"\n")
            data = data[newline + 1:] if 0 <= newline < len(data) - 1 else data
            dropped = True
        with self.state.tx() as db:
            seq = db.execute("SELECT COALESCE(MAX(seq), -1) + 1 FROM logs WHERE run_id = ?", (run_id,)).fetchone()[0]
            size = run["log_bytes"] + len(data)
            if size > limit:
                for old_seq, old_len in db.execute(
                        "SELECT seq, length(data) FROM logs WHERE run_id = ? AND seq >= 0 ORDER BY seq",
                        (run_id,)).fetchall():
                    if size <= limit:
                        break
                    db.execute("DELETE FROM logs WHERE run_id = ? AND seq = ?", (run_id, old_seq))
                    size -= old_len
                dropped = True
            if dropped:
                db.execute("INSERT OR REPLACE INTO logs(run_id, seq, data) VALUES (?, -1, ?)", (run_id, LOG_DROPPED))
            db.execute("INSERT INTO logs(run_id, seq, data) VALUES (?, ?, ?)", (run_id, seq, data))
            db.execute("UPDATE runs SET log_bytes = ? WHERE id = ?", (size, run_id))
        self.notifier.notify(f"logs:{run_id}")

    def logs_after(self, run_id: str, after_seq: int) -> list[tuple[int, bytes]]:
        return [(r[0], r[1]) for r in self.state.db.execute(
            "SELECT seq, data FROM logs WHERE run_id = ? AND seq > ? ORDER BY seq", (run_id, after_seq))]

    # -- ending runs ---------------------------------------------------------------
    def _end(self, run_id: str, status: str, reason: str | None, payload: bytes, error_type: str | None,
             retriable: bool) -> None:
        run = self.state.run(run_id)
        if run is None or run["status"] in TERMINAL:
            return
        if retriable and status == "failed" and run["attempt"] < run["max_retries"]:
            self.state.db.execute(
                "UPDATE runs SET status = 'queued', attempt = attempt + 1, exit_reason = ?, started_at = NULL, "
                "worker = NULL WHERE id = ?", (f"attempt {run['attempt'] + 1} failed: {reason}", run_id))
            version = self.version_info(run["job_id"], run["version"])
            self.backend.submit(RunTicket(run_id, run["workspace"], run["job_id"], run["version"], run["timeout"],
                                          run["attempt"] + 1, run["batch_id"]), version)
            return
        if len(payload) > self.limits.max_payload:
            status, reason = "failed", f"result is {len(payload)} bytes; the limit is {self.limits.max_payload}"
            payload = serialization.error_envelope("opbox.PayloadTooLarge", reason)
        with self.state.tx() as db:
            db.execute(
                "UPDATE runs SET status = ?, finished_at = ?, exit_reason = COALESCE(?, exit_reason), error_type = ?, "
                "started_at = COALESCE(started_at, ?) WHERE id = ?",
                (status, time.time(), reason, error_type, time.time(), run_id))
            db.execute("INSERT OR REPLACE INTO payloads(run_id, kind, data) VALUES (?, 'result', ?)", (run_id, payload))
            if run["batch_id"]:
                seq = db.execute("UPDATE batches SET done = done + 1 WHERE id = ? RETURNING done",
                                 (run["batch_id"],)).fetchone()[0]
                db.execute("UPDATE runs SET done_seq = ? WHERE id = ?", (seq, run_id))
        self.open_runs[run["workspace"]] = max(0, self.open_runs.get(run["workspace"], 0) - 1)
        self.notifier.notify(run_id)
        self.notifier.notify(f"logs:{run_id}")
        if run["batch_id"]:
            self._release_slot(run["batch_id"])
            self.notifier.notify(f"batch:{run['batch_id']}")

    def _release_slot(self, batch_id: str) -> None:
        """A map's item ended: let the next waiting item of that map start."""
        state = self.batches.get(batch_id)
        if state is None or state.limit is None:
            return
        state.inflight = max(0, state.inflight - 1)
        while state.pending and state.inflight < state.limit:
            state.inflight += 1
            self.backend.submit(state.pending.popleft(), state.version)

    # -- cancelling ----------------------------------------------------------------
    async def cancel(self, workspace: str, run_id: str) -> dict:
        run = self.get(workspace, run_id)
        if run["status"] in TERMINAL:
            return run
        was_running = run["status"] == "running"
        self._end(run_id, "cancelled", "cancelled by request",
                  serialization.error_envelope("opbox.cancelled", "cancelled by request"), None, retriable=False)
        if was_running:
            asyncio.ensure_future(self.backend.cancel(run_id, self.limits.cancel_grace))
        return self.get(workspace, run_id)

    async def cancel_batch(self, workspace: str, batch_id: str) -> dict:
        self.batch(workspace, batch_id)
        self.state.db.execute("UPDATE batches SET cancelled = 1 WHERE id = ?", (batch_id,))
        state = self.batches.get(batch_id)
        if state is not None:
            state.pending.clear()
        for (run_id,) in self.state.db.execute(
                "SELECT id FROM runs WHERE batch_id = ? AND status IN ('queued', 'running')", (batch_id,)).fetchall():
            await self.cancel(workspace, run_id)
        return self.batch(workspace, batch_id)

    # -- restart -------------------------------------------------------------------
    def recover(self) -> int:
        """After a restart: runs that were running lost their workers; queue them again."""
        self.state.db.execute(
            "UPDATE runs SET status = 'queued', started_at = NULL, worker = NULL, "
            "exit_reason = 'requeued: the platform restarted while it ran' WHERE status = 'running'")
        rows = self.state.all("SELECT id, workspace, job_id, version, timeout, attempt, batch_id FROM runs "
                              "WHERE status = 'queued' ORDER BY id")
        for run in rows:
            self.open_runs[run["workspace"]] = self.open_runs.get(run["workspace"], 0) + 1
        for run in rows:
            try:
                version = self.version_info(run["job_id"], run["version"])
            except (NotFound, Conflict) as exc:
                self.run_lost(run["id"], f"cannot run after restart: {exc}")
                continue
            if run["batch_id"] and run["batch_id"] not in self.batches:
                batch = self.state.one("SELECT * FROM batches WHERE id = ?", run["batch_id"])
                self.batches[batch["id"]] = BatchState(batch["id"], version, batch["concurrency"])
            self._dispatch(RunTicket(run["id"], run["workspace"], run["job_id"], run["version"], run["timeout"],
                                     run["attempt"], run["batch_id"]), version)
        return len(rows)


def run_json(run: dict, base: str = "") -> dict:
    """A run as the API shows it."""
    out = {k: run[k] for k in ("id", "job_id", "version", "status", "trigger", "created_at", "started_at",
                               "finished_at", "exit_reason", "error_type", "attempt", "max_retries", "timeout")}
    if run.get("batch_id"):
        out["batch_id"], out["batch_index"] = run["batch_id"], run["batch_index"]
    if base:
        out["links"] = {"self": f"{base}/runs/{run['id']}", "result": f"{base}/runs/{run['id']}/result",
                        "logs": f"{base}/runs/{run['id']}/logs"}
    return out


def version_json(row: dict) -> dict:
    keep = ("job_id", "version", "status", "entry", "code_sha256", "requirements_sha256", "python", "cloudpickle",
            "created_at", "ready_at", "error")
    out = {k: row[k] for k in keep}
    out["resource"] = row["resource"] if isinstance(row["resource"], dict) else json.loads(row["resource"])
    return out
