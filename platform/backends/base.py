"""The protocol every execution backend speaks (local processes, podman containers, Kubernetes).

As with httpx's transports, the platform holds one ``Backend`` and never knows which: it
hands over runs that are ready (``submit``), asks to stop them (``cancel``) and hears back
through ``RunEvents``. What a run becomes (a warm worker's next task, a container, a
Kubernetes Job) is the backend's business.

Beyond that core, a backend *declares* optional abilities (``abilities``): warm worker pools
the runtime pulls from (``WorkerPools``), serving classes (``Serving``), their logs
(``ServiceLogs``). Callers ask with ``require(backend, Serving)`` and get the backend typed as
that ability, or a ``NotSupported`` (HTTP 501) naming the backend and what it cannot do, so
no layer above has to guess with ``hasattr``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple, Protocol, TypeVar

from opbox.builder.base import Artifact
from opbox.errors import NotSupported
from opbox import defaults
from opbox.resource import Resource

from ..payload import Payload

A = TypeVar("A")


@dataclass(frozen=True)
class VersionInfo:
    """What a backend needs to run a job version."""

    workspace: str
    job_id: str
    job_name: str
    version: int
    kind: str  # "function" or "class"
    entry: str  # "module:qualname"
    resource: Resource
    artifact: Artifact = field(default_factory=Artifact)  # the builder's output: code_dir, venv, image...
    # the values of ``resource.secrets`` (workspace secrets), for the processes' environment only
    secret_env: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    @property
    def key(self) -> str:
        return f"{self.job_id}.v{self.version}"


@dataclass(frozen=True)
class RunTicket:
    run_id: str
    workspace: str
    job_id: str
    version: int
    timeout: float | None
    attempt: int = 0
    batch_id: str | None = None  # set for the items of a map
    traceparent: str | None = None  # the run's (its runtime's TRACEPARENT)


class PoolSize(NamedTuple):
    """A warm pool's size now, and how many workers it started so far (``WorkerPools.pool_sizes``)."""

    workspace: str
    job: str
    workers: int
    busy: int
    queued: int
    started: int


@dataclass(frozen=True)
class Lease:
    """A run handed to a warm worker: its arguments (bytes, never decoded here) and timeout."""

    run_id: str
    args: Payload
    timeout: float | None
    traceparent: str | None = None

    @classmethod
    def of(cls, ticket: RunTicket, args: Payload) -> Lease:
        return cls(ticket.run_id, args, ticket.timeout, ticket.traceparent)


@dataclass(frozen=True)
class Completion:
    """A warm worker's result for the run it was leased, carried on its next poll."""

    run_id: str
    outcome: str  # "succeeded" or "failed"
    payload: Payload
    error_type: str | None = None


@dataclass(frozen=True)
class GroupLease:
    """Several queued runs of a map handed to one warm worker at once (its pool's queue is longer than its
    workers): the worker runs them in order and hands in each result as it finishes (``Completion``s on one
    streamed request), so the platform always knows which run is in hand."""

    leases: tuple[Lease, ...]

    @classmethod
    def of(cls, tickets: Iterable[RunTicket], args: Mapping[str, Payload]) -> GroupLease:
        return cls(tuple(Lease.of(t, args[t.run_id]) for t in tickets))


SKIPPED = "skipped"  # a group's run the worker did not start: it was cancelled before its turn
IDLE, EXIT = "idle", "exit"  # a poll's answers other than a Lease: ask again, or leave


@dataclass(frozen=True)
class ServiceInfo:
    """What a backend needs to serve a class (or an ASGI app): ``python -m opbox.runtime serve``."""

    workspace: str
    name: str
    version: VersionInfo  # kind "class" or "asgi"
    init: bytes = b""  # the constructor's arguments: an args envelope (never decoded by the platform)
    replicas: int = defaults.REPLICAS
    concurrency: int = defaults.CONCURRENCY  # calls at once per replica (Knative's containerConcurrency); 0: no limit
    queue: int = defaults.QUEUE  # calls waiting per replica beyond that, then 429
    scale_to_zero: float | None = defaults.SCALE_TO_ZERO  # idle seconds before replicas stop; None: never

    @property
    def key(self) -> str:
        return f"{self.workspace}/{self.name}"


class RunEvents(Protocol):
    """How a backend reports back to the platform. All calls are made on the event loop."""

    def run_args(self, run_id: str) -> Payload | None: ...

    def run_started(self, run_id: str, worker: str, pooled: bool = False) -> bool:
        """Mark the run running; False means skip it: it is no longer wanted (cancelled), or (``pooled``: a
        warm worker's lease, which can wait) its map's concurrency is taken on other gateways and it waits."""

    def run_finished(self, run_id: str, outcome: str, payload: Payload, error_type: str | None = None) -> None: ...

    def runs_started(self, tickets: Sequence[RunTicket], worker: str) -> list[bool]:
        """``run_started`` (pooled) for a group of runs leased together: one transaction where it can."""

    def runs_args(self, run_ids: Sequence[str]) -> dict[str, Payload]:
        """The arguments of several runs (those that have them), in one read."""

    def runs_finished(self, ends: Sequence[tuple[RunTicket, str, Payload]]) -> None:
        """``run_finished`` for several runs' (ticket, outcome, result): recorded in one transaction."""

    def run_lost(self, run_id: str, reason: str, status: str = "failed") -> None:
        """The run's process ended without a result (crash, kill, OOM, timeout)."""

    def run_disrupted(self, run_id: str, reason: str) -> None:
        """The run's pod was disrupted (evicted, its node lost): queue it again, its arguments
        ready to be fetched once more, without spending one of its retries."""

    def append_log(self, run_id: str, data: bytes) -> None: ...


class Backend(Protocol):
    """What every backend can do: take runs, stop them, describe itself."""

    name: str
    abilities: ClassVar[frozenset[type]]  # the optional ability protocols below that it implements

    async def start(self, events: RunEvents) -> None: ...

    async def close(self) -> None: ...

    async def prepare(self, version: VersionInfo) -> None:
        """A version was built: warm it up if the backend keeps warm workers."""

    def submit(self, ticket: RunTicket, version: VersionInfo) -> None:
        """Start (or queue) a run. Must not block."""

    async def cancel(self, run_id: str, grace: float) -> None:
        """Stop a run: SIGTERM (or the equivalent), then kill after ``grace`` seconds."""

    def describe(self, workspace: str) -> dict:
        """Status for the API, as one workspace may see it: its pools, workers and services."""


class WorkerPools(Protocol):
    """Warm workers that pull their runs from the gateway (``/_internal/pools/*``)."""

    def find_worker(self, pool_id: str, worker_id: str, token: str) -> object | None:
        """The worker, if this platform still knows it (None tells it to exit); ``AuthError`` unless
        ``token`` is that worker's own."""

    async def next_run(self, worker: object, done: Completion | None, wait: float) -> Lease | GroupLease | str:
        """Record ``done``, then the worker's next run (or group of runs), or IDLE after ``wait`` s, or EXIT."""

    def group_done(self, worker: object, dones: Sequence[Completion]) -> None:
        """Results of the worker's group, in its order, as they arrive (the next run of it is in hand then)."""

    def cancelled_in_group(self, worker: object) -> list[str]:
        """The runs of the worker's group cancelled since it was leased (it skips those not started yet)."""

    def release_parked(self) -> None:
        """Answer every parked worker now (EXIT): the platform is stopping."""

    def busy(self) -> int:
        """Runs in the hands of this backend's workers, which end with the gateway: a stopping platform
        waits (up to its grace) for them to hand their results in."""

    def pool_sizes(self) -> list[PoolSize]:
        """Each pool's size now and its workers started so far (the platform's metrics)."""

    def held_run(self, pool_id: str, worker_id: str, token: str,
                 claimed: str | None = None) -> tuple[str, str, float | None] | None:
        """(workspace, run id, seconds left before its timeout or None) of the run the worker holds now
        (``claimed``, the run its code says it runs in, when the worker holds that one); None when it holds
        none or is unknown; ``AuthError`` unless ``token`` is that worker's own."""


class Serving(Protocol):
    """Classes (and ASGI apps) as HTTP endpoints; ``key`` is ``ServiceInfo.key``."""

    async def deploy_service(self, service: ServiceInfo, wait: float) -> dict:
        """Start a service, or roll it to ``service`` (new replicas ready before old ones drain).
        Returns ``service_status`` once the new version is ready, has failed, or ``wait`` passed."""

    async def delete_service(self, key: str) -> None:
        """Stop a service's replicas (in-flight calls finish first) and forget it."""

    async def service_endpoints(self, key: str, wait: float) -> list[str]:
        """Base URLs of the ready replicas (one URL for a Knative service). Counts as activity: a
        service scaled to zero starts again, the call waits up to ``wait`` s for it ([] if still
        not ready). Raises ``ServiceFailed`` when the service cannot start, ``NotFound`` if unknown."""

    def service_status(self, key: str) -> dict:
        """{"status": deploying|starting|ready|scaled_to_zero|failed, "version", "ready_replicas", "instances": [...], "error"}."""


class ServiceLogs(Protocol):
    """The replicas' output: apart from ``Serving``, since a backend may serve without keeping it."""

    async def service_logs(self, key: str, limit: int) -> str:
        """The replicas' recent output (stdout and stderr), at most ``limit`` bytes, newest last.
        Async: a backend may have to ask someone (the Kubernetes API) for it."""


class InjectsSecrets(Protocol):
    """Gives runtime processes their version's workspace secrets (``runtime_env(..., secrets=True)``): a
    marker, with nothing to call. Deploys naming secrets are refused on a backend without it."""


class ChecksResources(Protocol):
    """Knows at deploy whether it can give runs what their ``Resource`` asks for (a backend without it takes
    every resource, as a cluster's scheduler does)."""

    def check_resource(self, resource: Resource) -> list[str]:
        """Raise ``ValidationError`` (saying what to do) when it cannot; else the warnings to show the deployer."""


class MirrorsSecrets(Protocol):
    """Keeps each workspace secret as an object of its own that its processes reference (the kubernetes
    backend: a Kubernetes Secret in the workspace's namespace, loaded by ``envFrom``), rather than
    writing values into what it starts. ``Secrets`` (control/secrets.py) calls these on every set and
    delete, and ``put_secret`` for every secret when the platform starts."""

    async def put_secret(self, workspace: str, name: str, values: Mapping[str, str]) -> None:
        """Create or replace the object of secret ``name``; ``ClusterRefused`` with the API's words."""

    async def delete_secret(self, workspace: str, name: str) -> None:
        """Delete it (nothing to delete is fine)."""


# what a backend without the ability cannot do, for NotSupported's message
CANNOT = {WorkerPools: "keep warm worker pools", Serving: "serve classes", ServiceLogs: "show service logs",
          InjectsSecrets: "give runs workspace secrets yet", ChecksResources: "check resources at deploy",
          MirrorsSecrets: "keep secrets of its own"}


def supports(backend: Backend, ability: type) -> bool:
    return ability in backend.abilities


def require(backend: Backend, ability: type[A]) -> A:
    """``backend`` as ``ability`` when it declares it; else ``NotSupported`` (HTTP 501)."""
    if ability not in backend.abilities:
        raise NotSupported(f"the {backend.name} backend cannot {CANNOT[ability]}")
    return backend  # type: ignore[return-value]


# -- callers' tokens: what the SDK in user code sends back to its own workspace (jobs calling jobs) ---------
CALLER_PREFIX = "obc_"


def run_caller_token(sign: Callable[[str], str], run_id: str) -> str:
    """A one-shot run's (a local process, a cluster pod): valid while that run is running."""
    return f"{CALLER_PREFIX}r:{run_id}:{sign('call:r:' + run_id)}"


def worker_caller_token(pool_id: str, worker_id: str, worker_token: str) -> str:
    """A warm worker's: valid while the worker holds a run, for that run (checked against the worker's own
    random token, whose hash only the pool keeps)."""
    return f"{CALLER_PREFIX}w:{pool_id}:{worker_id}:{worker_token}"


def service_caller_token(sign: Callable[[str], str], key: str) -> str:
    """A service replica's (``key``: ``workspace/name``): valid while the service exists."""
    return f"{CALLER_PREFIX}s:{key}:{sign('call:s:' + key)}"
