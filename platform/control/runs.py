"""Job-Runs: their durable records and their lifecycle.

queued → running → succeeded | failed | cancelled | timed_out. A failed run with retries
left goes back to queued, at once or (``Retries``) once its backoff has passed: ``retry_at`` is
kept in the records, so a restart keeps the wait; the attempt that ended is recorded with its
reason and the last log chunk it wrote. Every change is written to the records before anyone is
told about it; waiters (long-polls, map result streams, log followers) are woken through
the notifier. This module never decodes payloads: it stores and hands over bytes.

Jobs calling jobs: a run started with a running run's caller token is that run's child
(``parent_run_id``). Its timeout is at most what is left of its parent's, and when an attempt of
the parent ends other than succeeded (failed, timed out, cancelled), its open children and the
maps it started are cancelled, and theirs in turn. Which runs have open children is kept in
memory (rebuilt from the queued runs after a restart), so a run's end costs no query for it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

from opbox import envelope, tracecontext
from opbox.builder.base import Artifact
from opbox.errors import (Conflict, MissingSecret, NotFound, PayloadTooLarge, QuotaExceeded, StorageFull,
                          StorageQuotaExceeded, ValidationError)
from opbox.resource import Resource

from ..backends.base import Backend, RunTicket, VersionInfo
from ..ids import new_id
from ..metrics import Metrics
from ..notify import Notifier
from ..records.base import TERMINAL, AttemptRecord, BatchRecord, BatchResult, NewRun, Payload, Records, RunRecord, payload_size
from ..settings import Settings
from ..tracing import RunSpans
from .payloads import head_of, too_large

log = logging.getLogger("opbox.runs")

LOG_DROPPED = b"[opbox: older output dropped: the run's log passed its size limit]\n"
MIN_ITEMS_ADDED = 500  # a map's items are taken when this many (or all sent, or a tenth of the quota) fit in it
SMALL_RESULT = 64 * 1024  # a result a full disk refused: above this size, the run ends failed saying so
STALLED_RETRY = 1.0  # seconds between attempts to write what a full disk refused
HOLD_BACK_RETRY = 1.0  # seconds before an item held back by its map's concurrency tries again, notice or not
CANCEL_PREFIX = "cancel:"  # the notice to the other gateways that a running run was cancelled (its worker stops)


@dataclass
class BatchState:
    """A map in flight: items waiting for a free slot under its concurrency limit."""

    id: str
    version: VersionInfo
    limit: int | None
    pending: deque = field(default_factory=deque)
    inflight: int = 0
    parent: tuple[str, float | None] | None = None  # (run id, deadline) of the run whose code started it
    retry: asyncio.TimerHandle | None = None  # items held back by the concurrency (several gateways) try again


@dataclass(frozen=True)
class Limits:
    """The run limits; defaults are the platform's (``Settings``), written there once."""

    max_payload: int = Settings.max_payload
    max_log_bytes: int = Settings.max_log_bytes
    max_batch_items: int = 10_000  # per submission request; a map may have any number
    max_open_runs: int = Settings.max_open_runs  # per workspace: queued + running; beyond it, 429 until some end
    cancel_grace: float = Settings.cancel_grace
    storage_quota: int | None = Settings.storage_quota  # per workspace: bytes of payloads, logs and code


def item_run_id(batch_id: str, index: int) -> str:
    """The run of a map's item: time-ordered like other runs, unique per index, and naming its map."""
    return f"r-{batch_id[2:]}.{index}"


def batch_of(run_id: str) -> str | None:
    """The map whose item ``run_id`` is (``item_run_id``), or None."""
    head, dot, _ = run_id.partition(".")
    return f"b-{head[2:]}" if dot else None


def bounded_timeout(own: float | None, parent_deadline: float | None) -> float | None:
    """A child run's timeout: its own, or what is left of its parent's (at least a second), whichever is less."""
    if parent_deadline is None:
        return own
    left = max(1.0, round(parent_deadline - time.time(), 3))
    return left if own is None else min(own, left)


SecretEnv = Callable[[str, tuple], dict]  # (workspace, secret names) -> their variables; MissingSecret if one is gone


class Runs:
    def __init__(self, records: Records, backend: Backend, limits: Limits = Limits(),
                 secret_env: SecretEnv | None = None):
        self.records = records
        self.backend = backend
        self.limits = limits
        self.secret_env = secret_env
        self.notifier = Notifier()
        self.batches: dict[str, BatchState] = {}
        self._versions: dict[tuple[str, int], VersionInfo] = {}
        self.open_runs: dict[str, int] = {}  # per workspace, kept in step with the runs table
        self.open_elsewhere: dict[str, int] = {}  # per workspace: other gateways' (several share the records)
        self.stalled: dict[str, Callable[[], None]] = {}  # writes a full disk refused, retried until it has room
        self._lost_log: dict[str, int] = {}  # per run: bytes of output a full disk refused
        self._retry_timer: asyncio.TimerHandle | None = None
        self._handoff: dict[str, tuple[RunRecord, Payload] | None] = {}  # runs a call waits for, and their ends
        self.children: dict[str, set[str]] = {}  # parent run id -> its open child runs (not map items)
        self.child_maps: dict[str, set[str]] = {}  # parent run id -> the maps it started
        self.on_run_end: Callable[[str], None] | None = None  # an attempt ended: its caller token goes (Auth)
        self.metrics = Metrics()  # the platform's (core serves them)
        self.spans: RunSpans | None = None  # a span per ended run, when an OTLP endpoint is configured

    def _reserve(self, workspace: str, count: int) -> None:
        open_now = self.open_runs.get(workspace, 0)
        if open_now + self.open_elsewhere.get(workspace, 0) + count > self.limits.max_open_runs:
            raise QuotaExceeded(
                f"workspace {workspace} has {open_now} runs queued or running and may have at most "
                f"{self.limits.max_open_runs}; retry when some have ended", retry_after=1)
        self.open_runs[workspace] = open_now + count

    # -- versions ------------------------------------------------------------------
    def version_info(self, job_id: str, version: int) -> VersionInfo:
        key = (job_id, version)
        info = self._versions.get(key)
        if info is None:
            row = self.records.jobs.version(job_id, version)
            job = self.records.jobs.by_id(job_id)
            if row is None or job is None:
                raise NotFound(f"job {job_id} has no version {version}")
            if row.status != "ready":
                raise Conflict(f"version {version} of job {job.name} is {row.status}, not ready")
            resource = Resource.from_dict(row.resource)
            secret_env = self.secret_env(job.workspace, resource.secrets) if resource.secrets and self.secret_env else {}
            info = VersionInfo(
                workspace=job.workspace, job_id=job_id, job_name=job.name, version=version, kind=job.kind,
                entry=row.entry, resource=resource, artifact=Artifact.from_dict(row.artifact), secret_env=secret_env,
            )
            self._versions[key] = info
        return info

    def forget_versions(self, workspace: str) -> None:
        """The workspace's secrets changed: resolve its versions again when next used."""
        for key in [k for k, v in self._versions.items() if v.workspace == workspace]:
            del self._versions[key]

    # -- creating runs -------------------------------------------------------------
    def _check_payload(self, payload: Payload) -> None:
        size = payload_size(payload)
        if size > self.limits.max_payload:
            raise too_large("arguments", size, self.limits.max_payload)
        header = envelope.read_header(head_of(payload))
        if header["kind"] != envelope.ARGS:
            raise ValidationError(f"expected an args envelope, got {header['kind']!r}")

    def _check_items(self, payloads: list[Payload], resent: list[bool] | None) -> None:
        """``_check_payload`` for a map's items (``resent``: which are stored already, not looked at again). A map's
        envelope heads are all alike (the SDK packs each with the same header): a head checked once is not
        parsed again, byte for byte the same."""
        limit, checked = self.limits.max_payload, set()
        for offset, payload in enumerate(payloads):
            if resent is not None and resent[offset]:
                continue
            head = head_of(payload)
            head = bytes(head[:envelope.head_length(head)])  # refuses a payload that is no envelope
            if head in checked and payload_size(payload) <= limit:
                continue
            self._check_payload(payload)
            checked.add(head)

    def check_quota(self, workspace: str, incoming: int = 0) -> None:
        """507 when storing ``incoming`` more bytes would take the workspace past its storage quota."""
        quota = self.limits.storage_quota
        if quota is None:
            return
        used = self.records.usage.of(workspace)
        if used + incoming > quota:
            raise StorageQuotaExceeded(
                f"workspace {workspace} stores {used} bytes of arguments, results, logs and code; its quota is "
                f"{quota} (OPBOX_STORAGE_QUOTA), so {incoming} more do not fit. Space returns as finished runs "
                "expire (OPBOX_RETENTION_DAYS, @operator(retention_days=...); `opbox gc` collects now)",
                used=used, quota=quota)

    def storage(self, workspace: str) -> dict:
        """Bytes the workspace stores (arguments, results, logs, code) and its quota (None: no quota)."""
        return {"bytes": self.records.usage.of(workspace), "quota": self.limits.storage_quota}

    def create(self, version: VersionInfo, payload: Payload, trigger: str, schedule_id: str | None = None,
               traceparent: str | None = None, parent: tuple[str, float | None] | None = None,
               write: Callable[[NewRun, Payload], bool] | None = None) -> str | None:
        """A run, queued and handed to the backend; ``traceparent``: the caller's (checked; else a new trace);
        ``parent``: (run id, its deadline) when a run's code started it; ``write``: records the run in place
        of ``records.runs.create`` (a schedule's fire, with it), and may decline (False: no run, None back)."""
        self._check_payload(payload)
        self.check_quota(version.workspace, payload_size(payload))
        self._reserve(version.workspace, 1)
        run_id = new_id("r")
        res = version.resource
        trace, parent_span = tracecontext.start(traceparent)
        timeout = res.timeout if parent is None else bounded_timeout(res.timeout, parent[1])
        run = NewRun(run_id, version.workspace, version.job_id, version.version, trigger, time.time(),
                     res.max_retries, timeout, None, None, schedule_id, str(trace), parent_span,
                     parent[0] if parent is not None else None)
        try:
            written = self.records.runs.create(run, payload) if write is None else write(run, payload)
        except BaseException:
            self.open_runs[version.workspace] -= 1
            raise
        if written is False:
            self.open_runs[version.workspace] -= 1
            return None
        self.metrics.runs_created(version.workspace, version.job_name, trigger).inc()
        if parent is not None:
            self.children.setdefault(parent[0], set()).add(run_id)
        self._dispatch(RunTicket(run_id, version.workspace, version.job_id, version.version, timeout,
                                 traceparent=run.traceparent), version)
        return run_id

    def create_batch(self, version: VersionInfo, concurrency: int | None,
                     parent: tuple[str, float | None] | None = None) -> str:
        """A map; ``parent``: (run id, deadline) when a run's code started it (its items are that run's children)."""
        if concurrency is not None and (not isinstance(concurrency, int) or concurrency < 1):
            raise ValidationError(f"concurrency must be a whole number >= 1, got {concurrency!r}")
        batch_id = new_id("b")
        self.records.batches.create(batch_id, version.workspace, version.job_id, version.version, concurrency,
                                    time.time())
        self.batches[batch_id] = BatchState(batch_id, version, concurrency, parent=parent)
        if parent is not None:
            self.child_maps.setdefault(parent[0], set()).add(batch_id)
        return batch_id

    def batch(self, workspace: str, batch_id: str) -> BatchRecord:
        row = self.records.batches.get(batch_id)
        if row is None or row.workspace != workspace:
            raise NotFound(f"no batch {batch_id}")
        return row

    def add_items(self, workspace: str, batch_id: str, start: int, payloads: list[Payload],
                  traceparent: str | None = None) -> tuple[int, int]:
        """Add items ``start, start+1, ...`` to a batch; idempotent per index. Each item is a run with a span of
        its own in the caller's trace (``traceparent``), else in the map's (its trace id made from its id).

        Returns (new, accepted): how many were new, and how many from the front are now stored.
        Under the workspace's open-runs quota only a prefix may fit; the caller sends the rest
        later. Nothing fitting at all is a 429.
        """
        row = self.batch(workspace, batch_id)
        if row.cancelled:
            raise Conflict(f"batch {batch_id} was cancelled")
        if row.total is not None and start + len(payloads) > row.total:
            raise Conflict(f"batch {batch_id} is sealed at {row.total} items")
        if len(payloads) > self.limits.max_batch_items:
            raise PayloadTooLarge(f"at most {self.limits.max_batch_items} items per request, got {len(payloads)}")
        existing = self.records.batches.indexes(batch_id, start, start + len(payloads) - 1)
        room = self.check_room(workspace, len(payloads) - len(existing))  # before the items are looked at
        self._check_items(payloads, [start + offset in existing for offset in range(len(payloads))]
                          if existing else None)
        self.check_quota(workspace, sum(map(payload_size, payloads)))
        state = self._batch_state(row)
        version = state.version
        res = version.resource
        parent_id, timeout = None, res.timeout
        if state.parent is not None:
            parent_id, timeout = state.parent[0], bounded_timeout(res.timeout, state.parent[1])
        now = time.time()
        caller = tracecontext.parse(traceparent)
        trace_id, parent_span, flags = caller or (tracecontext.trace_id_of(batch_id), None, "01")
        rows, blobs, tickets = [], [], []
        accepted = 0
        for offset, payload in enumerate(payloads):
            index = start + offset
            if index not in existing:
                if len(rows) >= room:
                    break
                run_id = item_run_id(batch_id, index)
                trace = f"00-{trace_id}-{tracecontext.new_span_id()}-{flags}"
                rows.append(NewRun(run_id, workspace, version.job_id, version.version, "map", now,
                                   res.max_retries, timeout, batch_id, index, None, trace, parent_span, parent_id))
                blobs.append(payload)
                tickets.append(RunTicket(run_id, workspace, version.job_id, version.version, timeout,
                                         batch_id=batch_id, traceparent=trace))
            accepted += 1
        if accepted == 0:
            self._reserve(workspace, 1)  # raises the quota's 429
        if rows:
            self._reserve(workspace, len(rows))
            try:
                self.records.batches.add_items(batch_id, rows, blobs)
            except BaseException:
                self.open_runs[workspace] -= len(rows)
                raise
            self.metrics.runs_created(workspace, version.job_name, "map").inc(len(rows))
            for ticket in tickets:
                self._dispatch(ticket, version)
        return len(rows), accepted

    def check_room(self, workspace: str, new: int, batch_id: str | None = None) -> int:
        """Room for ``new`` more items of a map in the workspace's open-runs quota: how many fit now (a prefix
        may), or a 429 while fewer than a good part of them fit (a handful at a time would cost a request each).
        With ``batch_id``, a map that is not there (or cancelled) is said first."""
        if batch_id is not None and self.batch(workspace, batch_id).cancelled:
            raise Conflict(f"batch {batch_id} was cancelled")
        room = self.limits.max_open_runs - self.open_runs.get(workspace, 0) - self.open_elsewhere.get(workspace, 0)
        wanted = min(new, MIN_ITEMS_ADDED, max(1, self.limits.max_open_runs // 10))
        if room < wanted:
            self._reserve(workspace, wanted)  # raises the quota's 429 (Retry-After)
        return room

    def stored_items(self, workspace: str, batch_id: str, start: int, count: int) -> set[int]:
        """Which of the map's items ``start .. start+count-1`` are stored already (a resent request's)."""
        self.batch(workspace, batch_id)
        return self.records.batches.indexes(batch_id, start, start + count - 1) if count else set()

    def seal_batch(self, workspace: str, batch_id: str, total: int) -> BatchRecord:
        row = self.batch(workspace, batch_id)
        if not isinstance(total, int) or total < 0:
            raise ValidationError(f"total must be a whole number >= 0, got {total!r}")
        if row.total is not None and row.total != total:
            raise Conflict(f"batch {batch_id} is already sealed at {row.total} items")
        if row.submitted > total:
            raise Conflict(f"batch {batch_id} has {row.submitted} items, more than {total}")
        self.records.batches.seal(batch_id, total)
        self.notifier.notify(f"batch:{batch_id}")
        sealed = self.batch(workspace, batch_id)
        if sealed.done >= total:  # every item ended before the total was known
            self.batches.pop(batch_id, None)
        return sealed

    def _batch_state(self, row: BatchRecord) -> BatchState:
        state = self.batches.get(row.id)
        if state is None:
            state = self.batches[row.id] = BatchState(row.id, self.version_info(row.job_id, row.version),
                                                      row.concurrency)
        return state

    def batch_results(self, batch_id: str, after: int, limit: int = 1000) -> list[BatchResult]:
        """Finished items after completion number ``after``, in completion order."""
        return self.records.batches.results_after(batch_id, after, limit)

    def batch_over(self, batch_id: str, after: int) -> bool:
        """Whether a reader that has seen ``after`` completions has seen them all (the batch is sealed)."""
        row = self.records.batches.get(batch_id)
        return row is not None and row.total is not None and after >= row.total

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
    def get(self, workspace: str, run_id: str) -> RunRecord:
        run = self.records.runs.get(run_id)
        if run is None or run.workspace != workspace:
            raise NotFound(f"no run {run_id} in workspace {workspace}")
        return run

    def find(self, run_id: str) -> RunRecord | None:
        """A run in any workspace (for the platform's own processes, whose tokens name the run or pool)."""
        return self.records.runs.get(run_id)

    def of_job(self, job_id: str, status: str | None = None, before: str | None = None,
               limit: int = 50) -> list[RunRecord]:
        """A job's runs, newest first; ``before`` is a run id."""
        return self.records.runs.of_job(job_id, status, before, limit)

    def open_counts(self, workspace: str) -> dict[str, int]:
        """The workspace's runs queued and running, by status, as the records count them."""
        return self.records.runs.open_counts(workspace)

    async def wait(self, workspace: str, run_id: str, timeout: float) -> RunRecord:
        """The run once it is terminal, or as it is when ``timeout`` passes."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            run = self.get(workspace, run_id)
            left = deadline - loop.time()
            if run.status in TERMINAL or left <= 0 or self.notifier.closing:
                return run
            await self.notifier.wait(run_id, left)

    async def call(self, workspace: str, run_id: str, timeout: float) -> tuple[RunRecord, Payload | None]:
        """For the call path, a run just created: its record and result once it ends (handed over in memory
        by the end itself, as written, so neither is read back), or its record as it is after ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self._handoff[run_id] = None
        try:
            while (ended := self._handoff[run_id]) is None:
                left = deadline - loop.time()
                if left <= 0 or self.notifier.closing:
                    run = self.get(workspace, run_id)  # maybe ended another way (a stalled end written late)
                    return run, self.result(run_id) if run.status in TERMINAL else None
                await self.notifier.wait(run_id, left)
            return ended
        finally:
            del self._handoff[run_id]

    def result(self, run_id: str) -> Payload | None:
        return self.records.runs.result(run_id)

    def attempts(self, run_id: str) -> list[AttemptRecord]:
        """The run's earlier attempts (retried), oldest first; the run itself is its latest."""
        return self.records.runs.attempts(run_id)

    def attempt_logs(self, run: RunRecord, attempt: int) -> tuple[int, int | None]:
        """The log chunks of one attempt: those with ``after < seq <= last`` (``last`` None: up to the end)."""
        if not 0 <= attempt <= run.attempt:
            raise NotFound(f"run {run.id} has no attempt {attempt} (its attempts are 0 to {run.attempt})")
        bounds = {a.attempt: a.log_seq for a in self.attempts(run.id)}
        return bounds.get(attempt - 1, -1), bounds.get(attempt)

    # -- events from backends (RunEvents) ----------------------------------------------
    def run_args(self, run_id: str) -> Payload | None:
        return self.records.runs.args(run_id)

    def run_started(self, run_id: str, worker: str, pooled: bool = False) -> bool:
        """False: the run was cancelled while it waited, or a full disk refused the change (then it is
        dispatched again once there is room), or (``pooled``) its map's concurrency is taken by items other
        gateways run (then it waits in the map's pending items for a slot). A one-shot run's process has
        started already: it is not held back (several gateways keep a map's concurrency for warm workers)."""
        limit = self._shared_limit(run_id) if pooled else None
        try:
            started = self.records.runs.start(run_id, worker, time.time(), limit)
        except StorageFull:
            self._stall(f"start:{run_id}", lambda: self._redispatch(run_id))
            return False
        if not started and limit is not None:
            self._hold_back(run_id)
        return started

    def runs_started(self, tickets: Sequence[RunTicket], worker: str) -> list[bool]:
        """``run_started`` for a warm worker's group of runs, in one transaction; several gateways on the
        records start each on its own (a map's concurrency is counted across them run by run)."""
        if self.records.leadership.shared:
            return [self.run_started(t.run_id, worker, pooled=True) for t in tickets]
        try:
            return self.records.runs.start_many([t.run_id for t in tickets], worker, time.time())
        except StorageFull:
            for ticket in tickets:
                self._stall(f"start:{ticket.run_id}", lambda run_id=ticket.run_id: self._redispatch(run_id))
            return [False] * len(tickets)

    def runs_args(self, run_ids: Sequence[str]) -> dict[str, Payload]:
        return self.records.runs.args_many(run_ids)

    def runs_finished(self, ends: Sequence[tuple[RunTicket, str, Payload]]) -> None:
        """Several runs' ends (a warm worker's group): those that succeeded with a result within the limit are
        recorded in one transaction, the others (failures: retries; too large) as ``run_finished`` does. When
        a full disk refuses the transaction, each is written on its own, as ``run_finished`` would."""
        quick = []
        for ticket, outcome, payload in ends:
            if outcome == "succeeded" and payload_size(payload) <= self.limits.max_payload:
                quick.append((ticket, payload))
            else:
                self.run_finished(ticket.run_id, outcome, payload)
        if not quick:
            return
        try:
            written = self.records.runs.finish_many(
                [(t.run_id, t.batch_id, t.workspace, payload) for t, payload in quick], "succeeded", time.time())
        except StorageFull:
            for ticket, payload in quick:
                self.run_finished(ticket.run_id, "succeeded", payload)
            return
        for (ticket, payload), row in zip(quick, written):
            if row is not None:
                self._ended(ticket.run_id, row[0], row[1], "succeeded", payload)

    # -- a map's concurrency across gateways ---------------------------------------
    def _shared_limit(self, run_id: str) -> tuple[str, int] | None:
        """(map, concurrency) for an item of a map with a concurrency when several gateways share the records:
        then the records count its running items across them; alone, this gateway's ``inflight`` is exact."""
        if not self.records.leadership.shared or "." not in run_id:
            return None
        state = self.batches.get(batch_of(run_id))
        return (state.id, state.limit) if state is not None and state.limit is not None else None

    def _hold_back(self, run_id: str) -> None:
        """The map's slots are taken by items other gateways run: the item waits, first in line, for a slot
        to free (an item of the map ending anywhere: ``batch_progress``; or a second, in case a notice is lost)."""
        run = self.records.runs.get(run_id)
        state = self.batches.get(batch_of(run_id))
        if run is None or run.status != "queued" or state is None:
            return  # cancelled, or taken by another gateway, meanwhile
        state.inflight = max(0, state.inflight - 1)
        state.pending.appendleft(RunTicket(run.id, run.workspace, run.job_id, run.version, run.timeout, run.attempt,
                                           run.batch_id, run.traceparent))
        if state.retry is None:
            state.retry = asyncio.get_running_loop().call_later(HOLD_BACK_RETRY, self._retry_held_back, state)

    def _retry_held_back(self, state: BatchState) -> None:
        state.retry = None
        self.batch_progress(state.id)

    def batch_progress(self, batch_id: str) -> None:
        """An item of the map ended, maybe on another gateway: one held-back item tries for the freed slot."""
        state = self.batches.get(batch_id)
        if state is not None and state.pending and state.limit is not None and state.inflight < state.limit:
            state.inflight += 1
            self.backend.submit(state.pending.popleft(), state.version)

    def _redispatch(self, run_id: str, resubmit: bool = False) -> None:
        """Dispatch a queued run again; ``resubmit``: a retry, which keeps its map slot (straight to the backend)."""
        run = self.records.runs.get(run_id)
        if run is None or run.status != "queued":
            return  # cancelled while it waited
        try:
            version = self.version_info(run.job_id, run.version)
        except (MissingSecret, NotFound, Conflict) as exc:
            self._end(run_id, "failed", f"cannot run: {exc.message}",
                      envelope.error_envelope(f"opbox.{type(exc).__name__}", exc.message), None, retriable=False)
            return
        ticket = RunTicket(run.id, run.workspace, run.job_id, run.version, run.timeout, run.attempt, run.batch_id,
                           run.traceparent)
        if resubmit:
            self.backend.submit(ticket, version)
        else:
            self._dispatch(ticket, version)

    def _retry_at(self, run_id: str, at: float) -> None:
        """Dispatch the run's next attempt at ``at`` (epoch seconds)."""
        loop = asyncio.get_running_loop()
        loop.call_later(max(0.0, at - time.time()), self._redispatch, run_id, True)

    def run_finished(self, run_id: str, outcome: str, payload: Payload, error_type: str | None = None) -> None:
        if outcome not in ("succeeded", "failed"):
            outcome = "failed"
        reason = None
        if outcome == "failed":
            try:
                header = envelope.read_header(head_of(payload))
                reason = f"{header.get('type', 'error')}: {header.get('message', '')}"[:2000]
                error_type = error_type or header.get("type")
            except Exception:
                reason = "failed"
        self._end(run_id, outcome, reason, payload, error_type, retriable=True)

    def run_lost(self, run_id: str, reason: str, status: str = "failed") -> None:
        payload = envelope.error_envelope(f"opbox.{status}", reason)
        self._end(run_id, status, reason, payload, None, retriable=status in ("failed", "timed_out"))

    def run_disrupted(self, run_id: str, reason: str) -> None:
        run = self.records.runs.get(run_id)
        if run is None or run.status in TERMINAL:
            return
        self.records.runs.requeue(run_id, reason)
        if self.on_run_end is not None:
            self.on_run_end(run_id)
        self._redispatch(run_id, resubmit=True)  # it keeps its map slot, as a retry does

    def append_log(self, run_id: str, data: bytes) -> None:
        """Append output; past the run's budget the oldest output goes, and a marker says so."""
        if not data:
            return
        limit = self.limits.max_log_bytes
        dropped = False
        if len(data) > limit:  # keep the newest bytes, from a line start where there is one
            data = data[-limit:]
            newline = data.find(b"\n")
            data = data[newline + 1:] if 0 <= newline < len(data) - 1 else data
            dropped = True
        lost = self._lost_log.pop(run_id, 0)
        if lost:
            data = f"[opbox: {lost} bytes of output were lost: the platform's disk was full]\n".encode() + data
        try:
            appended = self.records.runs.append_log(run_id, data, limit, LOG_DROPPED, dropped)
        except StorageFull:  # the run goes on; its log says what it lost once there is room again
            self._lost_log[run_id] = lost + len(data)
            return
        if appended:
            self.notifier.notify(f"logs:{run_id}")

    def logs_after(self, run_id: str, after_seq: int) -> list[tuple[int, bytes]]:
        return self.records.runs.logs_after(run_id, after_seq)

    # -- ending runs ---------------------------------------------------------------
    def _end(self, run_id: str, status: str, reason: str | None, payload: Payload, error_type: str | None,
             retriable: bool, stall: bool = True) -> None:
        """Record a run's end (or its next attempt). When a full disk refuses it and ``stall`` is set, it is
        kept and written as soon as there is room; without ``stall`` (an API request), StorageFull is raised."""
        try:
            self._write_end(run_id, status, reason, payload, error_type, retriable)
        except StorageFull:
            if not stall:
                raise
            log.warning("the end of run %s waits for disk space to be recorded", run_id)
            self._stall(f"end:{run_id}", lambda: self._end(run_id, status, reason, payload, error_type, retriable))

    def _write_end(self, run_id: str, status: str, reason: str | None, payload: Payload, error_type: str | None,
                   retriable: bool) -> None:
        run = self.records.runs.get(run_id)
        if run is None or run.status in TERMINAL:
            return
        delay = self._retry_delay(run, status, payload) if retriable and run.attempt < run.max_retries else None
        if delay is not None:
            now = time.time()
            self.append_log(run_id, f"\n[opbox: attempt {run.attempt + 1} of {run.max_retries + 1} {status}: {reason}; "
                                    f"the next starts in {delay:g} s]\n".encode())
            self.records.runs.retry(run, status, reason, error_type, now, now + delay if delay > 0 else None)
            self._attempt_ended(run, status, final=False)
            if delay > 0:
                self._retry_at(run_id, now + delay)
            else:
                self._redispatch(run_id, resubmit=True)
            return
        size = payload_size(payload)
        if size > self.limits.max_payload:
            status, reason = "failed", f"result is {size} bytes; the limit is {self.limits.max_payload} (OPBOX_MAX_PAYLOAD)"
            payload = envelope.error_envelope("opbox.PayloadTooLarge", reason)
        try:
            ended, complete = self.records.runs.finish(run, status, time.time(), reason, error_type, payload)
        except StorageFull as exc:
            if size <= SMALL_RESULT:
                raise  # nothing smaller to write instead: the end waits for room (see _end)
            reason = f"the run ended ({status}) but its result ({size} bytes) could not be stored: {exc.message}"
            status, error_type = "failed", "opbox.StorageFull"
            payload = envelope.error_envelope(error_type, reason)
            ended, complete = self.records.runs.finish(run, status, time.time(), reason, error_type, payload)
        self._ended(run_id, ended, complete, status, payload, run)

    def _ended(self, run_id: str, ended: RunRecord, complete: bool, status: str, payload: Payload,
               before: RunRecord | None = None) -> None:
        """What follows a run's end once it is written: counts, its waiters and its map's next items;
        ``before``: its record as it was (its metrics count a start only if it had one)."""
        self.open_runs[ended.workspace] = max(0, self.open_runs.get(ended.workspace, 0) - 1)
        self._attempt_ended(ended, status)
        if run_id in self._handoff:  # a call waits for it: it gets the record and result as written
            self._handoff[run_id] = (ended, payload)
        self._count_end(before or ended, status)
        if self.spans is not None:
            self.spans(ended, self._job_name(ended))
        self.notifier.notify(run_id)
        self.notifier.notify(f"logs:{run_id}")
        if ended.batch_id:
            self._release_slot(ended.batch_id)
            self.notifier.notify(f"batch:{ended.batch_id}")
            if complete:  # the map's last item: its in-memory state goes (its record stays)
                self.batches.pop(ended.batch_id, None)

    def _retry_delay(self, run: RunRecord, status: str, payload: Payload) -> float | None:
        """Seconds before the run's next attempt, or None when this attempt's end is final. Without
        ``Retries`` a failure is retried at once (``max_retries``); with it, as it says."""
        row = self.records.jobs.version(run.job_id, run.version)
        policy = Resource.from_dict(row.resource).retries if row is not None else None
        if policy is None:
            return 0.0 if status == "failed" else None
        try:
            header = envelope.read_header(head_of(payload))
            types = [header["type"], *header.get("bases", ())] if header.get("kind") == envelope.ERROR else []
        except Exception:
            types = []
        return policy.delay(run.attempt) if policy.retries(status, types) else None

    def _job_name(self, run: RunRecord) -> str:
        info = self._versions.get((run.job_id, run.version))
        return info.job_name if info else run.job_id

    def _count_end(self, run: RunRecord, status: str) -> None:
        job, m = self._job_name(run), self.metrics
        m.runs_finished(run.workspace, job, run.trigger, status).inc()
        if run.started_at is not None:
            m.queue_wait(run.workspace, job).observe(run.started_at - run.created_at)
            m.run_duration(run.workspace, job, status).observe(time.time() - run.started_at)

    def _stall(self, key: str, retry: Callable[[], None]) -> None:
        """Keep a write a full disk refused; it is tried again every STALLED_RETRY seconds until it goes in."""
        self.stalled[key] = retry
        self.metrics.storage_errors("state", "full").inc()
        if self._retry_timer is None:
            try:
                self._retry_timer = asyncio.get_running_loop().call_later(STALLED_RETRY, self._retry_stalled)
            except RuntimeError:  # no event loop (a tool using Runs directly): nothing retries
                pass

    def _retry_stalled(self) -> None:
        self._retry_timer = None
        for key, retry in list(self.stalled.items()):
            del self.stalled[key]
            try:
                retry()  # stalls again (and sets the next round) when the disk is still full
            except Exception:
                log.exception("retrying a write refused by a full disk failed")
            if key in self.stalled:
                return  # still full: the others wait for the next round
        log.info("the disk has room again: every refused write is recorded")

    def count_open_elsewhere(self) -> None:
        """Several gateways on one database: learn how many open runs each workspace has on the others, so the
        open-runs quota counts them all (as of the last look: ``core`` asks every second)."""
        totals = self.records.runs.open_totals()
        self.open_elsewhere = {ws: n - self.open_runs.get(ws, 0) for ws, n in totals.items()
                               if n > self.open_runs.get(ws, 0)}

    def maps_in_memory(self, workspace: str) -> int:
        """Maps of ``workspace`` whose dispatch state the gateway holds (those not yet complete)."""
        return sum(1 for state in self.batches.values() if state.version.workspace == workspace)

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
    async def cancel(self, workspace: str, run_id: str) -> RunRecord:
        run = self.get(workspace, run_id)
        self._cancel(run, "cancelled by request", stall=False)
        return self.get(workspace, run_id)

    def _cancel(self, run: RunRecord, reason: str, stall: bool = True) -> None:
        if run.status in TERMINAL:
            return
        was_running = run.status == "running"
        self._end(run.id, "cancelled", reason, envelope.error_envelope("opbox.cancelled", reason), None,
                  retriable=False, stall=stall)
        if was_running:
            self.stop_worker(run.id)
            if self.notifier.publish is not None:  # its worker may be another gateway's
                self.notifier.publish(f"{CANCEL_PREFIX}{run.id}")

    def ended_elsewhere(self, run_id: str) -> None:
        """A run ended on another gateway: the runs and maps its code started through this one go as they would
        had it ended here (cancelled, unless it succeeded). Only parents with children here cost a read."""
        if run_id not in self.children and run_id not in self.child_maps:
            return
        run = self.records.runs.get(run_id)
        if run is not None and run.status in TERMINAL:
            self._attempt_ended(run, run.status, final=False)

    def stop_worker(self, run_id: str) -> None:
        """Stop the worker running ``run_id`` (cancelled), if this gateway's backend runs it."""
        asyncio.ensure_future(self.backend.cancel(run_id, self.limits.cancel_grace))

    async def cancel_batch(self, workspace: str, batch_id: str) -> BatchRecord:
        self.batch(workspace, batch_id)
        self._cancel_batch(batch_id, "cancelled by request", stall=False)
        return self.batch(workspace, batch_id)

    def _cancel_batch(self, batch_id: str, reason: str, stall: bool = True) -> None:
        self.records.batches.cancel(batch_id)
        state = self.batches.get(batch_id)
        if state is not None:
            state.pending.clear()
        for run_id in self.records.batches.open_runs(batch_id):
            run = self.records.runs.get(run_id)
            if run is not None:
                self._cancel(run, reason, stall)
        self.batches.pop(batch_id, None)

    def _attempt_ended(self, run: RunRecord, status: str, final: bool = True) -> None:
        """An attempt of ``run`` ended with ``status`` (its record says so already): its caller token goes; the
        run's end (``final``) leaves its parent's open children; unless it succeeded, its open children and
        maps are cancelled (a retried attempt's too: the next one starts them again)."""
        if self.on_run_end is not None:
            self.on_run_end(run.id)
        if final and run.parent_run_id is not None and run.batch_id is None:
            siblings = self.children.get(run.parent_run_id)
            if siblings is not None:
                siblings.discard(run.id)
                if not siblings:
                    del self.children[run.parent_run_id]
        children, maps = self.children.pop(run.id, ()), self.child_maps.pop(run.id, ())
        if status == "succeeded" or not (children or maps):
            return  # what a run that succeeded started goes on (a trigger that outlives its parent)
        reason = f"cancelled: its parent run {run.id} {status.replace('_', ' ')}"
        for batch_id in maps:
            row = self.records.batches.get(batch_id)
            if row is not None and not row.cancelled and (row.total is None or row.done < row.total):
                self._cancel_batch(batch_id, reason)
        for child_id in children:
            child = self.records.runs.get(child_id)
            if child is not None:
                self._cancel(child, reason)

    # -- restart, and gateways that died -------------------------------------------
    def recover(self, reason: str = "requeued: the platform restarted while it ran") -> int:
        """Take over the open runs no live gateway holds: after a restart (alone on its records) every one,
        those that were running having lost their workers; several gateways on one database, the leader
        calls it every second for the runs of gateways that died. Their maps' state, retry waits and open
        children are rebuilt here, as they were on the gateway that held them."""
        rows = self.records.runs.claim_orphans(reason)
        for run in rows:
            self.open_runs[run.workspace] = self.open_runs.get(run.workspace, 0) + 1
            if run.parent_run_id is not None:  # which runs have open children, as before the restart
                if run.batch_id is None:
                    self.children.setdefault(run.parent_run_id, set()).add(run.id)
                else:
                    self.child_maps.setdefault(run.parent_run_id, set()).add(run.batch_id)
        for run in rows:
            try:
                version = self.version_info(run.job_id, run.version)
            except (NotFound, Conflict, MissingSecret) as exc:
                self._end(run.id, "failed", f"cannot run after restart: {exc.message}",
                          envelope.error_envelope(f"opbox.{type(exc).__name__}", exc.message), None, retriable=False)
                continue
            if run.batch_id and run.batch_id not in self.batches:
                batch = self.records.batches.get(run.batch_id)
                parent = (run.parent_run_id, None) if run.parent_run_id else None
                self.batches[run.batch_id] = BatchState(run.batch_id, version, batch.concurrency if batch else None,
                                                        parent=parent)
            if run.retry_at is not None:  # waiting out a retry's backoff: it keeps its map slot meanwhile
                state = self.batches.get(run.batch_id) if run.batch_id else None
                if state is not None and state.limit is not None:
                    state.inflight += 1
                self._retry_at(run.id, run.retry_at)
                continue
            self._dispatch(RunTicket(run.id, run.workspace, run.job_id, run.version, run.timeout, run.attempt,
                                     run.batch_id, run.traceparent), version)
        return len(rows)
