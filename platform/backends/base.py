"""The protocol every execution backend speaks (local processes, podman containers, Kubernetes).

As with httpx's transports, the platform holds one ``Backend`` and never knows which: it
hands over runs that are ready (``submit``), asks to stop them (``cancel``) and hears back
through ``RunEvents``. What a run becomes (a warm worker's next task, a container, a
Kubernetes Job) is the backend's business.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from opbox.resource import Resource


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
    artifact: dict = field(default_factory=dict)  # the builder's output: code_dir, venv, image...

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


class RunEvents(Protocol):
    """How a backend reports back to the platform. All calls are made on the event loop."""

    def run_args(self, run_id: str) -> bytes | None: ...

    def run_started(self, run_id: str, worker: str) -> bool:
        """Mark the run running; False means it is no longer wanted (cancelled): skip it."""

    def run_finished(self, run_id: str, outcome: str, payload: bytes, error_type: str | None = None) -> None: ...

    def run_lost(self, run_id: str, reason: str, status: str = "failed") -> None:
        """The run's process ended without a result (crash, kill, OOM, timeout)."""

    def append_log(self, run_id: str, data: bytes) -> None: ...


class Backend(Protocol):
    name: str

    async def start(self, events: RunEvents) -> None: ...

    async def close(self) -> None: ...

    async def prepare(self, version: VersionInfo) -> None:
        """A version was built: warm it up if the backend keeps warm workers."""

    def submit(self, ticket: RunTicket, version: VersionInfo) -> None:
        """Start (or queue) a run. Must not block."""

    async def cancel(self, run_id: str, grace: float) -> None:
        """Stop a run: SIGTERM (or the equivalent), then kill after ``grace`` seconds."""

    def describe(self) -> dict:
        """Status for the API: pools, workers, services."""
