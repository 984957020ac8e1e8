"""The local backend: warm pools of runtime worker processes on this machine.

Each worker is ``python -m opbox.runtime worker`` from the version's virtualenv, started as
every local process is (``process.py``). Memory limits are enforced by a watchdog that kills a worker whose
resident memory passes its ``Resource.memory`` (as the kernel's OOM killer does in a pod);
timeouts by the pool. GPUs: a job gets this machine's (``gpus.py``: ``CUDA_VISIBLE_DEVICES``), and a deploy
asking for more than there are is refused. CPU and disk requests are recorded for the cluster backends.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from ...settings import Settings
from opbox.resource import Resource

from ..base import (ChecksResources, InjectsSecrets, RunEvents, RunTicket, ServiceLogs, Serving, VersionInfo, WorkerPools,
                    worker_caller_token)
from ..pools import PoolManager, PoolMethods, Worker, file_tail
from ..replicas import ServiceMethods
from ..runtime_env import runtime_env
from . import gpus
from .oneshot import OneShotRunner
from .process import rss_bytes, signal_runtime, start_runtime
from .sandbox import Sandbox, open_sandbox
from .services import LocalServices

log = logging.getLogger("opbox.local")


class LocalProcess:
    def __init__(self, proc: asyncio.subprocess.Process, log_path: Path):
        self.proc = proc
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def wait(self) -> int:
        return await self.proc.wait()

    def output_tail(self, size: int = 4000) -> str:
        return file_tail(self.log_path, size)


class ProcessSpawner:
    def __init__(self, gateway_url: str, log_dir: Path, sandbox: Sandbox | None):
        self.gateway_url = gateway_url
        self.log_dir = log_dir
        self.sandbox = sandbox

    async def spawn(self, worker: Worker) -> LocalProcess:
        version = worker.pool.version
        log_path = self.log_dir / worker.pool.id / f"{worker.id}.log"
        runtime = runtime_env(version, gateway_url=self.gateway_url,
                              worker=(worker.pool.id, worker.id, worker.token), secrets=True,
                              caller=worker_caller_token(worker.pool.id, worker.id, worker.token))
        proc = await start_runtime(version, runtime, ["worker"], log_path, self.sandbox)
        return LocalProcess(proc, log_path)

    def signal(self, worker: Worker, signum: int) -> None:
        if worker.handle is not None:
            signal_runtime(worker.handle.proc, signum, self.sandbox is not None)


class LocalBackend(PoolMethods, ServiceMethods):
    """``isolation="worker"`` (default): warm pools, one interpreter serves many runs of a version.
    ``isolation="run"``: a fresh process per run (the batch entrypoint, as in a Kubernetes Job)."""

    name = "local"
    abilities = frozenset({WorkerPools, Serving, ServiceLogs, InjectsSecrets, ChecksResources})

    def __init__(self, *, gateway_url: str, home: Path, token_for, max_workers: int, isolation: str = "worker",
                 worker_idle: float = Settings.worker_idle, pool_idle: float = Settings.pool_idle,
                 watchdog_interval: float = 0.2, sandbox: str = Settings.sandbox, max_running: int | None = None,
                 group_span: float = Settings.group_span):
        if isolation not in ("worker", "run"):
            raise ValueError(f"isolation must be 'worker' or 'run', got {isolation!r}")
        self.isolation = isolation
        self.sandbox = open_sandbox(home, sandbox)
        self.pools = PoolManager(
            ProcessSpawner(gateway_url, home / "logs" / "workers", self.sandbox), max_workers=max_workers,
            worker_idle=worker_idle, pool_idle=pool_idle, max_running=max_running, group_span=group_span,
        )
        self.oneshot = OneShotRunner(gateway_url=gateway_url, log_dir=home / "logs" / "runs", token_for=token_for,
                                     max_procs=max_workers, sandbox=self.sandbox)
        self.watchdog_interval = watchdog_interval
        self._watchdog: asyncio.Task | None = None
        self.services = LocalServices(home, sandbox=self.sandbox, gateway_url=gateway_url, token_for=token_for)

    async def start(self, events: RunEvents) -> None:
        self.pools.events = self.oneshot.events = events
        await asyncio.to_thread(gpus.detect)  # once, off the event loop (nvidia-smi may take a moment)
        self._watchdog = asyncio.ensure_future(self._watch_memory())

    async def close(self) -> None:
        if self._watchdog:
            self._watchdog.cancel()
        await self.pools.close()
        await self.oneshot.close()
        await self.services.close()

    async def prepare(self, version: VersionInfo) -> None:
        if self.isolation == "run" or version.kind != "function":  # services start on deploy_service
            return
        self.pools.retire(keep={version.key} | {k for k, p in self.pools.pools.items() if p.version.job_id != version.job_id})
        self.pools.warm_up(version, 1)

    def check_resource(self, resource: Resource) -> list[str]:
        """A GPU job needs this machine's GPUs (gpus.py); memory and timeouts are enforced, CPU and disk recorded."""
        return gpus.check(resource)

    def busy(self) -> int:
        return self.pools.leased + len(self.oneshot.running)

    def submit(self, ticket: RunTicket, version: VersionInfo) -> None:
        if self.isolation == "run":
            self.oneshot.submit(ticket, version)
        else:
            self.pools.submit(ticket, version)

    async def cancel(self, run_id: str, grace: float) -> None:
        await self.pools.cancel(run_id, grace)
        await self.oneshot.cancel(run_id, grace)

    def describe(self, workspace: str) -> dict:
        return {"backend": self.name, "isolation": self.isolation, "pools": self.pools.describe(workspace),
                "oneshot": {"running": len(self.oneshot.running), "queued": len(self.oneshot.queue)},
                "services": self.services.describe(workspace)}

    def _busy(self):
        """(pid, resource, kill) for every process that is running a run with a memory limit."""
        for pool in list(self.pools.pools.values()):
            if not pool.version.resource.memory_bytes:
                continue
            for worker in list(pool.workers.values()):
                if worker.handle is not None and worker.run_id is not None:
                    yield worker.handle.pid, pool.version.resource, (
                        lambda reason, w=worker: self.pools.kill(w, "failed", reason))
        yield from self.oneshot.busy()

    async def _watch_memory(self) -> None:
        while True:
            await asyncio.sleep(self.watchdog_interval)
            for pid, resource, kill in list(self._busy()):
                rss = rss_bytes(pid)
                if rss is not None and rss > resource.memory_bytes:
                    kill(f"OOMKilled: memory use {rss / 2**20:.0f}Mi passed the limit {resource.memory}")


def create(settings: Settings, token_for, gateway_url: str) -> LocalBackend:
    """The registry's factory (``OPBOX_BACKEND=local``)."""
    return LocalBackend(gateway_url=gateway_url, home=settings.home, max_workers=settings.max_workers,
                        worker_idle=settings.worker_idle, pool_idle=settings.pool_idle, isolation=settings.isolation,
                        sandbox=settings.sandbox, max_running=settings.max_running, token_for=token_for,
                        group_span=settings.group_span)
