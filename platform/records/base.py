"""The records port: what the platform keeps durably, as typed records and small protocols.

The control layer (Runs, Deploys, Services, Auth) talks to these protocols only; an adapter
(``records.sqlite``; a PostgreSQL one later) implements them. Every change that must be
atomic is one method here (a run and its arguments; a result, the run's end and its map's
done counter; a new job version), so no adapter has to expose transactions upward.

Records are frozen dataclasses with slots, built positionally from a row: cheaper than the
dicts they replace, and typed. Inputs on the hot paths (``NewRun``) are named tuples, which an
adapter passes to its driver as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Protocol, Sequence

from ..payload import Payload, StoredPayload, payload_size  # noqa: F401 (part of this port)

TERMINAL = frozenset({"succeeded", "failed", "cancelled", "timed_out"})
OPEN = ("queued", "running")


@dataclass(frozen=True, slots=True)
class RunRecord:
    id: str
    workspace: str
    job_id: str
    version: int
    status: str
    trigger: str
    created_at: float
    started_at: float | None
    finished_at: float | None
    exit_reason: str | None
    error_type: str | None
    attempt: int
    max_retries: int
    timeout: float | None
    batch_id: str | None
    batch_index: int | None
    done_seq: int | None
    worker: str | None
    log_bytes: int
    expired_at: float | None = None  # its arguments, result and log were dropped (retention)
    retry_at: float | None = None  # queued, waiting out its retry's backoff until then
    schedule_id: str | None = None  # the schedule that started it
    traceparent: str | None = None  # W3C: its trace and its own span (what its environment's TRACEPARENT says)
    parent_span_id: str | None = None  # the caller's span in that trace (None: the trace began with the run)
    parent_run_id: str | None = None  # the run whose code started it (jobs calling jobs)


class NewRun(NamedTuple):
    """A run to create (queued); its fields in the order adapters insert them."""

    id: str
    workspace: str
    job_id: str
    version: int
    trigger: str
    created_at: float
    max_retries: int
    timeout: float | None
    batch_id: str | None = None
    batch_index: int | None = None
    schedule_id: str | None = None
    traceparent: str | None = None
    parent_span_id: str | None = None
    parent_run_id: str | None = None


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """An earlier attempt of a run that was retried; its output is the run's log chunks up to ``log_seq``
    (after the previous attempt's)."""

    run_id: str
    attempt: int
    status: str
    started_at: float | None
    finished_at: float
    reason: str | None
    error_type: str | None
    log_seq: int


@dataclass(frozen=True, slots=True)
class ScheduleRecord:
    """When the platform runs a job by itself: its spec (``opbox.schedules``'s dict form) and next fire."""

    id: str
    workspace: str
    job_id: str
    spec: dict
    anchor: float  # a Period's series starts here
    next_fire_at: float
    paused: bool
    pending: bool  # overlap="queue": a fire waits for the previous run to end
    last_fire_at: float | None
    last_run_id: str | None
    last_error: str | None
    created_at: float
    updated_at: float


@dataclass(frozen=True, slots=True)
class SecretRecord:
    """A workspace secret: its keys' names in the clear, its values encrypted (``data``)."""

    workspace: str
    name: str
    keys: tuple[str, ...]
    data: bytes
    created_at: float
    updated_at: float


class RunFilter(NamedTuple):
    """Which of a workspace's runs to list: each field narrows (None: any). ``since_id`` and ``before_id``
    bound the run ids (time-ordered, so a time range and a page cursor are both id bounds)."""

    job_id: str | None = None
    status: str | None = None
    trigger: str | None = None
    batch_id: str | None = None
    since_id: str | None = None  # ids >= this
    before_id: str | None = None  # ids < this
    parent_run_id: str | None = None  # the children of this run


@dataclass(frozen=True, slots=True)
class BatchRecord:
    """A map: its items are runs with ``batch_id`` set; ``done`` numbers their completions."""

    id: str
    workspace: str
    job_id: str
    version: int
    concurrency: int | None
    total: int | None
    submitted: int
    done: int
    cancelled: bool
    created_at: float


@dataclass(frozen=True, slots=True)
class BatchResult:
    """One finished item of a map, in completion order (``seq``), with its result envelope."""

    run_id: str
    index: int
    status: str
    seq: int
    exit_reason: str | None
    payload: Payload | None  # None once the result expired (retention)


@dataclass(frozen=True, slots=True)
class JobRecord:
    id: str
    workspace: str
    name: str
    kind: str
    created_at: float
    latest_version: int | None


@dataclass(frozen=True, slots=True)
class VersionRecord:
    """A job version (its build log is read apart: it can be large)."""

    job_id: str
    version: int
    status: str  # building | ready | failed
    entry: str
    code_key: str
    code_sha256: str
    requirements_sha256: str
    python: str
    cloudpickle: str
    resource: dict
    artifact: dict | None
    error: str | None
    created_at: float
    ready_at: float | None
    signature: dict | None = None  # a function's parameters (``runtime.schema.call_schema``); None: unknown


@dataclass(frozen=True, slots=True)
class NewVersion:
    entry: str
    code_key: str
    code_sha256: str
    python: str
    cloudpickle: str
    resource: dict
    created_at: float
    signature: dict | None = None


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """A bearer token, by its SHA-256 hash (the value itself is never stored)."""

    id: str
    workspace: str
    name: str
    hash: str
    role: str
    created_at: float
    revoked_at: float | None
    run_id: str | None = None  # a caller's token (role "run"): the run whose code calls, the parent of what it starts
    deadline: float | None = None  # ... and when that run times out (epoch seconds), which bounds its children


@dataclass(frozen=True, slots=True)
class ServiceRecord:
    """A served class or ASGI app: a name pointing at a job version, its init arguments and scaling."""

    workspace: str
    name: str
    job_id: str
    version: int
    kind: str
    replicas: int
    concurrency: int
    queue: int
    scale_to_zero: float | None
    init: bytes
    created_at: float
    updated_at: float


class RunRecords(Protocol):
    def get(self, run_id: str) -> RunRecord | None: ...
    def args(self, run_id: str) -> Payload | None: ...
    def result(self, run_id: str) -> Payload | None: ...

    def create(self, run: NewRun, args: Payload) -> None:
        """The run (queued) and its arguments, atomically; the bytes count in its workspace's usage."""

    def start(self, run_id: str, worker: str, at: float, limit: tuple[str, int] | None = None) -> bool:
        """queued -> running; False when the run is not queued (cancelled while it waited). ``limit``: (its map,
        the map's concurrency) when several gateways may start the map's items: False too while that many of
        them run (the run stays queued)."""

    def start_many(self, run_ids: Sequence[str], worker: str, at: float) -> list[bool]:
        """``start`` for each of a warm worker's group of runs (no map concurrency across gateways), in one
        transaction: whether each started."""

    def args_many(self, run_ids: Sequence[str]) -> dict[str, Payload]:
        """The arguments of the runs that have them."""

    def finish_many(self, ends: Sequence[tuple[str, str | None, str, Payload]], status: str,
                    at: float) -> list[tuple[RunRecord, bool] | None]:
        """``finish`` with ``status`` (no reason, no error type) for each (run id, map id, workspace, result), in
        one transaction; per run its record as ended and whether it completed its map, or None when it had
        ended already (it is left as it is)."""

    def retry(self, run: RunRecord, status: str, reason: str | None, error_type: str | None, at: float,
              retry_at: float | None) -> None:
        """Back to queued for its next attempt (dispatched at ``retry_at`` when set), with the attempt that
        ended (``status``, ``reason``) recorded, atomically."""

    def attempts(self, run_id: str) -> list[AttemptRecord]:
        """The run's earlier attempts, oldest first."""

    def requeue(self, run_id: str, reason: str) -> None:
        """Back to queued for the same attempt (its pod was disrupted: not a retry)."""

    def finish(self, run: RunRecord, status: str, at: float, reason: str | None, error_type: str | None,
               result: Payload) -> tuple[RunRecord, bool]:
        """The run's end, its result and (for a map item) its completion number, atomically. Returns the
        ended run's record, and True when this was the last item of a sealed map."""

    def append_log(self, run_id: str, data: bytes, limit: int, marker: bytes, dropped: bool) -> bool:
        """Append output within the run's ``limit`` of bytes: the oldest chunks go first, and
        ``marker`` (at seq -1) says so. False when there is no such run."""

    def logs_after(self, run_id: str, after_seq: int) -> list[tuple[int, bytes]]: ...

    def of_job(self, job_id: str, status: str | None, before: str | None, limit: int) -> list[RunRecord]:
        """Newest first; ``before`` is a run id (ids are time-ordered)."""

    def open_counts(self, workspace: str) -> dict[str, int]:
        """How many runs are queued and running, by status (statuses with none are absent)."""

    def open_totals(self) -> dict[str, int]:
        """How many runs are queued or running, by workspace (workspaces with none are absent)."""

    def search(self, workspace: str, where: RunFilter, limit: int) -> list[RunRecord]:
        """The workspace's runs that match, newest (highest id) first."""

    def hour_counts(self, workspace: str, hours: Sequence[int], now: float) -> dict[int, list[tuple[str, str, int]]]:
        """The runs created in each hour (its start, epoch seconds) as (job id, status, count). Hours whose runs
        have all ended may be kept counted; what could still change is counted at each call."""

    def expire(self, default_days: float, now: float, limit: int) -> Dropped:
        """Drop the arguments, results and logs of up to ``limit`` runs finished longer ago than their
        version's ``retention_days`` (else ``default_days``); mark them expired."""

    def delete_finished(self, days: float, now: float, limit: int) -> Dropped:
        """Delete up to ``limit`` run records (and what is left of them) finished more than ``days`` ago."""

    def stored_keys(self, keys: Sequence[str]) -> set[str]:
        """Which of ``keys`` a payload still refers to (the others are objects nothing will read)."""

    def claim_orphans(self, reason: str) -> list[RunRecord]:
        """The open runs no live gateway holds, now this gateway's, oldest first: running ones lost their
        workers with their gateway and are queued again (``exit_reason``: ``reason``). Alone on its records
        (SQLite), a gateway that starts claims every open run; several on one database, the leader claims
        those of gateways that died."""


class Dropped(NamedTuple):
    """What retention removed: runs, bytes freed, and objects in the store nothing refers to now."""

    runs: int
    bytes: int
    object_keys: list[str]


class UsageRecords(Protocol):
    """Bytes each workspace stores: its runs' arguments, results and logs (kept up to date by the
    run records themselves) and its code archives (added here, at deploy)."""

    def of(self, workspace: str) -> int: ...

    def add(self, workspace: str, delta: int) -> None: ...


class ItemRecords(Protocol):
    """A streaming run's items, numbered from 1 in the order its generator yielded them."""

    def add(self, run_id: str, workspace: str, seq: int, item: Payload) -> bool:
        """Item ``seq`` and its bytes in the workspace's usage, atomically; False (nothing written) when
        the run has an item ``seq`` already (a resent request, or a retried attempt yielding it again)."""

    def after(self, run_id: str, after: int, limit: int) -> list[tuple[int, Payload]]:
        """Items with ``seq`` > ``after``, in order."""

    def get(self, run_id: str, seq: int) -> Payload | None: ...

    def count(self, run_id: str) -> int:
        """The highest ``seq`` stored (0: none)."""


class BatchRecords(Protocol):
    def create(self, batch_id: str, workspace: str, job_id: str, version: int, concurrency: int | None,
               at: float) -> None: ...
    def get(self, batch_id: str) -> BatchRecord | None: ...

    def add_items(self, batch_id: str, runs: Sequence[NewRun], args: Sequence[Payload]) -> None:
        """The items' runs, their arguments (``args[i]`` for ``runs[i]``) and the submitted count, atomically."""

    def indexes(self, batch_id: str, first: int, last: int) -> set[int]:
        """The item indexes already stored in ``first..last``."""

    def seal(self, batch_id: str, total: int) -> None: ...
    def cancel(self, batch_id: str) -> None: ...

    def open_runs(self, batch_id: str) -> list[str]:
        """Ids of the batch's runs still queued or running."""

    def results_after(self, batch_id: str, after: int, limit: int) -> list[BatchResult]:
        """Finished items with completion number > ``after``, in completion order."""

    def in_workspace(self, workspace: str, before_id: str | None, limit: int) -> list[BatchRecord]:
        """The workspace's maps, newest first; ``before_id`` is a batch id (a page cursor)."""

    def status_counts(self, batch_id: str) -> dict[str, int]:
        """How many of the map's items are in each status."""


class JobRecords(Protocol):
    def get(self, workspace: str, ref: str) -> JobRecord | None:
        """A job by id or, failing that, by name."""

    def by_id(self, job_id: str) -> JobRecord | None: ...

    def in_workspace(self, workspace: str) -> list[JobRecord]:
        """Newest first."""

    def delete(self, job_id: str) -> Dropped:
        """The job, its versions, its maps and its runs with their payloads, logs and items, atomically; their bytes
        come off the workspace's usage. Returns what went (the caller deletes the objects in the store)."""

    def add_version(self, workspace: str, name: str, kind: str, version: NewVersion) -> tuple[JobRecord, int]:
        """A new version (building) of the job, made when missing; atomically. Raises Conflict
        when the job exists with another kind."""

    def version(self, job_id: str, version: int) -> VersionRecord | None: ...

    def code_in_use(self, code_key: str) -> bool:
        """Whether a version was made from this code archive."""

    def in_use(self) -> tuple[set[str], list[dict]]:
        """What versions still refer to: their code archives' keys, and the artifacts of those not failed."""

    def versions(self, job_id: str) -> list[VersionRecord]:
        """Newest first."""

    def build_log(self, job_id: str, version: int) -> str | None: ...
    def version_failed(self, job_id: str, version: int, error: str, build_log: str) -> None: ...

    def fail_unfinished_builds(self, error: str) -> int:
        """Versions still ``building`` (their gateway died mid-build) become ``failed`` with ``error``;
        returns how many."""

    def version_ready(self, job_id: str, version: int, artifact: dict, requirements_sha256: str, build_log: str,
                      at: float) -> None:
        """The version is ready and becomes the job's latest, atomically."""


class TokenRecords(Protocol):
    def add_workspace(self, name: str) -> None:
        """Idempotent."""

    def workspace_exists(self, name: str) -> bool: ...

    def add(self, token_id: str, workspace: str, name: str, token_hash: str, role: str) -> None:
        """The token, and its workspace when new, atomically."""

    def by_hash(self, token_hash: str, revoked_too: bool = False) -> TokenRecord | None:
        """An active (not revoked) token; with ``revoked_too``, a revoked one as well."""

    def revoke(self, workspace: str, token_id: str, at: float) -> bool:
        """False when there is no such active token in the workspace."""

    def in_workspace(self, workspace: str) -> list[TokenRecord]:
        """Oldest first, revoked ones included."""


class ServiceRecords(Protocol):
    def get(self, workspace: str, name: str) -> ServiceRecord | None: ...

    def all(self) -> list[ServiceRecord]: ...

    def in_workspace(self, workspace: str) -> list[ServiceRecord]:
        """By name."""

    def put(self, service: ServiceRecord) -> None:
        """Create or replace."""

    def delete(self, workspace: str, name: str) -> None: ...


class ScheduleRecords(Protocol):
    def put(self, schedule: ScheduleRecord) -> ScheduleRecord:
        """Create or replace the job's schedule (one per job; a replaced one keeps its id). Returns it."""

    def get(self, workspace: str, job_id: str) -> ScheduleRecord | None: ...
    def in_workspace(self, workspace: str) -> list[ScheduleRecord]: ...

    def active(self) -> list[ScheduleRecord]:
        """Schedules not paused, soonest first."""

    def fired(self, seen: ScheduleRecord, next_fire_at: float, pending: bool, last_fire_at: float | None,
              last_run_id: str | None, last_error: str | None, run: tuple[NewRun, Payload] | None = None) -> bool:
        """Record a fire of the schedule as ``seen`` (its next fire time and pending flag as read), with the
        run it starts (``run``: the run and its arguments, created with it, at once); False, and nothing
        written, when the schedule has changed since it was read (another gateway fired it, or it was
        set again): so a fire happens once, even when a leader dies in the middle of it."""

    def set_paused(self, schedule_id: str, paused: bool, next_fire_at: float, at: float) -> None: ...

    def delete(self, workspace: str, job_id: str) -> bool:
        """False when the job had no schedule."""


class SecretRecords(Protocol):
    def put(self, secret: SecretRecord) -> None:
        """Create or replace (a replaced one keeps its created_at)."""

    def get(self, workspace: str, name: str) -> SecretRecord | None: ...
    def in_workspace(self, workspace: str) -> list[SecretRecord]: ...
    def all(self) -> list[SecretRecord]:
        """Every workspace's, by workspace and name (a backend that mirrors them catches up at start)."""

    def delete(self, workspace: str, name: str) -> bool:
        """False when there was no such secret."""


class Leadership(Protocol):
    """Which gateway does the singleton duties (firing schedules, retention) when several share the records.
    Alone on its records (SQLite), a gateway always leads."""

    shared: bool  # other gateways may write these records too

    def start(self) -> None:
        """Join the gateways on these records (a gateway serving requests calls it before it starts runs)."""

    def held(self) -> bool:
        """Whether this gateway leads now (a cheap check: the adapter keeps it up to date)."""


class UploadRecords(Protocol):
    """Payloads uploaded to the object store and not yet attached to a run."""

    def add(self, key: str, workspace: str, at: float) -> None: ...

    def claim(self, key: str, workspace: str) -> bool:
        """Take the upload for one use: False when it is not the workspace's, was used, or has expired."""

    def expire(self, before: float, limit: int) -> list[str]:
        """Forget unclaimed uploads made before ``before``; their keys (the caller deletes the objects)."""


class Records(Protocol):
    """The whole store, one attribute per aggregate; ``core`` opens it and closes it."""

    runs: RunRecords
    batches: BatchRecords
    jobs: JobRecords
    tokens: TokenRecords
    services: ServiceRecords
    usage: UsageRecords
    schedules: ScheduleRecords
    secrets: SecretRecords
    items: ItemRecords
    leadership: Leadership
    uploads: UploadRecords

    def wakeups(self, deliver: Callable[[str], None]) -> Callable[[str], None] | None:
        """Wake-ups across the gateways sharing these records: returns ``publish(key)``, which sends a key the
        notifier woke to the other gateways without blocking, and calls ``deliver(key)`` (from another thread)
        for each key another gateway published. None when no other gateway can share them (SQLite)."""

    def close(self) -> None: ...
