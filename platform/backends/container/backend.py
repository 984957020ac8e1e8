"""The container backend: warm pools of runtime workers, each a podman container of the version's image.

The same ``PoolManager`` as the local backend, with a spawner that starts containers
(``podman.py``) instead of processes; services are ``Replicas`` whose replicas are
containers too (``services.py``). Containers are killed with ``podman kill`` (cancel:
SIGTERM, then SIGKILL after the grace period; timeouts: SIGKILL).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from ...settings import Settings
from ..base import InjectsSecrets, RunEvents, RunTicket, ServiceLogs, Serving, VersionInfo, WorkerPools
from ..pools import PoolManager, PoolMethods
from ..replicas import ServiceMethods
from .podman import PodmanSpawner
from .services import ContainerServices


class ContainerBackend(PoolMethods, ServiceMethods):
    name = "container"
    # workspace secrets: passed at container create through a FIFO --env-file (envfile.py)
    abilities = frozenset({WorkerPools, Serving, ServiceLogs, InjectsSecrets})

    def __init__(self, *, gateway_url: str, home: Path, token_for, max_workers: int,
                 worker_idle: float = Settings.worker_idle, pool_idle: float = Settings.pool_idle,
                 podman: str = "podman", max_running: int | None = None, group_span: float = Settings.group_span):
        self.pools = PoolManager(
            PodmanSpawner(gateway_url, home / "logs" / "containers", podman), max_workers=max_workers,
            worker_idle=worker_idle, pool_idle=pool_idle, max_running=max_running, group_span=group_span,
        )
        self.services = ContainerServices(home, self.pools.spawner, token_for)

    async def start(self, events: RunEvents) -> None:
        self.pools.events = events

    async def close(self) -> None:
        await self.services.close()
        workers = [w for p in self.pools.pools.values() for w in p.workers.values() if w.handle is not None]
        await self.pools.close()
        if workers:  # give them a moment to leave on SIGTERM, then make sure the containers are gone
            await asyncio.wait([asyncio.ensure_future(w.handle.proc.wait()) for w in workers], timeout=5)
            for worker in workers:
                self.pools.spawner.remove(worker.handle.name, worker.handle.cgroup)
        await self.pools.spawner.drain()

    async def prepare(self, version: VersionInfo) -> None:
        if version.kind != "function":  # services start on deploy_service
            return
        self.pools.retire(keep={version.key} | {k for k, p in self.pools.pools.items() if p.version.job_id != version.job_id})
        self.pools.warm_up(version, 1)

    def submit(self, ticket: RunTicket, version: VersionInfo) -> None:
        self.pools.submit(ticket, version)

    async def cancel(self, run_id: str, grace: float) -> None:
        await self.pools.cancel(run_id, grace)

    def describe(self, workspace: str) -> dict:
        return {"backend": self.name, "pools": self.pools.describe(workspace), "services": self.services.describe(workspace)}


def create(settings: Settings, token_for, gateway_url: str) -> ContainerBackend:
    """The registry's factory (``OPBOX_BACKEND=container``)."""
    return ContainerBackend(gateway_url=gateway_url, home=settings.home, max_workers=settings.max_workers,
                            worker_idle=settings.worker_idle, pool_idle=settings.pool_idle,
                            max_running=settings.max_running, token_for=token_for, group_span=settings.group_span)
