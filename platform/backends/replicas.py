"""Replicas of served classes on this machine, for the backends without a cluster (local, container).

Each replica is ``python -m opbox.runtime serve`` (uvicorn): a process in the version's venv
(``local/services.py``) or a podman container of its image (``container/services.py``); how
one starts and is signalled is all they add. What Knative does on a cluster, done here:

- a replica is routed to only once its ``/readyz`` answers 200 (the instance is built,
  ``__remote_init__`` has run); a replica that exits is restarted, one that stops answering
  ``/healthz`` is killed (and so restarted); three exits in a row before ready fail the version;
- after ``scale_to_zero`` idle seconds (no call, none in flight) the replicas stop; the next
  ``endpoints`` call starts them again and waits until one is ready (the activator's hold);
- a redeploy starts the new version's replicas, switches routing once they are ready, then
  drains the old ones: SIGTERM lets uvicorn finish the calls in flight (SIGKILL after ``drain``).

Each replica listens on a loopback socket the platform binds and hands down (``--fd``), so
there is no port race. Its output goes to ``logs/services/<workspace>/<name>/<replica>.log``.
"""

from __future__ import annotations

import abc
import asyncio
import hashlib
import logging
import os
import secrets
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from opbox.errors import NotFound, ServiceFailed

from .base import ServiceInfo
from .pools import file_tail

log = logging.getLogger("opbox.services")

STARTING, READY, DRAINING = "starting", "ready", "draining"


@dataclass
class Replica:
    id: str
    generation: int
    spec: ServiceInfo
    log_path: Path
    url: str = ""
    state: str = STARTING
    proc: asyncio.subprocess.Process | None = None
    started_at: float = field(default_factory=time.time)
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))  # the replica answers only its bearer

    @property
    def endpoint(self) -> str:
        """Where the proxy sends calls: the URL with the replica's token as its userinfo (never shown by the API)."""
        return self.url.replace("://", f"://opbox:{self.token}@", 1)

    def describe(self) -> dict:
        return {"id": self.id, "version": self.spec.version.version, "state": self.state, "url": self.url,
                "pid": self.proc.pid if self.proc else None, "started_at": self.started_at}


@dataclass
class Service:
    spec: ServiceInfo
    generation: int = 1
    serving: int = 0  # the generation routed to (0: none yet)
    specs: dict = field(default_factory=dict)  # generation -> ServiceInfo
    replicas: dict = field(default_factory=dict)
    endpoints: list = field(default_factory=list)
    status: str = "deploying"
    error: dict | None = None
    failed_generations: set = field(default_factory=set)
    start_failures: int = 0
    last_active: float = field(default_factory=time.monotonic)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    deleted: bool = False
    idle_task: asyncio.Task | None = None

    def notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    def live(self, generation: int) -> list[Replica]:
        return [r for r in self.replicas.values() if r.generation == generation and r.state in (STARTING, READY)]


def loopback_listener() -> tuple[socket.socket, str]:
    """A listening socket on a free loopback port, bound here and handed to a replica (so no one
    can take the port in between), and the replica's base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    return sock, f"http://127.0.0.1:{sock.getsockname()[1]}"


class ServiceMethods:
    """The ``Serving`` and ``ServiceLogs`` abilities, for backends whose ``services`` are ``Replicas``."""

    services: "Replicas"
    replicas_per_gateway = True  # each gateway runs its own (processes, containers): several gateways each serve

    async def deploy_service(self, service: ServiceInfo, wait: float) -> dict:
        return await self.services.deploy(service, wait)

    async def delete_service(self, key: str) -> None:
        await self.services.delete(key)

    async def service_endpoints(self, key: str, wait: float) -> list[str]:
        return await self.services.endpoints(key, wait)

    def service_status(self, key: str) -> dict:
        return self.services.status(key)

    async def service_logs(self, key: str, limit: int) -> str:
        return self.services.logs(key, limit)  # reads at most ``limit`` bytes a replica from local files


class Replicas(abc.ABC):
    """Every service of one backend: its replicas, their routing, restarts and scaling."""

    def __init__(self, home: Path, *, drain: float = 60.0, startup_timeout: float = 600.0,
                 health_interval: float = 5.0):
        self.log_root = home / "logs" / "services"
        self.init_root = home / "services"
        self.drain = drain
        self.startup_timeout = startup_timeout
        self.health_interval = health_interval
        self.services: dict[str, Service] = {}
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(5.0), trust_env=False)
        self._tasks: set[asyncio.Task] = set()
        self._seq = 0

    # -- the Backend's service methods ---------------------------------------------------
    async def deploy(self, spec: ServiceInfo, wait: float, start: bool = True) -> dict:
        svc = self.services.get(spec.key)
        if svc is None or svc.deleted:
            svc = self.services[spec.key] = Service(spec=spec)
            svc.idle_task = self._spawn_task(self._watch_idle(svc))
        else:
            svc.generation = max(svc.specs) + 1  # never reuse a (possibly failed) generation's number
            svc.spec = spec
            if svc.status == "failed":
                svc.status, svc.error = "deploying", None
        gen = svc.generation
        svc.specs[gen] = spec
        svc.start_failures = 0
        svc.last_active = time.monotonic()
        self._write_init(spec)
        if not start:  # recovery after a restart: start on the first call
            svc.serving, svc.status = gen, "scaled_to_zero"
            return self.status(spec.key)
        if svc.status != "ready":
            svc.status = "deploying"
        self._scale_up(svc, gen)
        await self._wait(svc, lambda: (svc.serving == gen and len(svc.endpoints) >= spec.replicas)
                         or gen in svc.failed_generations or svc.generation != gen or svc.deleted, wait)
        if gen in svc.failed_generations:
            error = svc.error or {}
            raise ServiceFailed(f"service {spec.name!r} version {spec.version.version} did not start: "
                                f"{error.get('message', 'unknown reason')}", cause=error)
        return self.status(spec.key)

    async def delete(self, key: str) -> None:
        svc = self._get(key)
        svc.deleted = True
        del self.services[key]
        if svc.idle_task:
            svc.idle_task.cancel()
        for replica in list(svc.replicas.values()):
            self._drain(svc, replica)
        svc.endpoints = []
        svc.notify()

    async def endpoints(self, key: str, wait: float) -> list[str]:
        svc = self._get(key)
        svc.last_active = time.monotonic()
        if svc.endpoints:
            return svc.endpoints
        if svc.status == "failed":
            raise self._failure(svc)
        if not svc.live(svc.serving or svc.generation):
            if svc.status == "scaled_to_zero":
                svc.status = "starting"
            self._scale_up(svc, svc.serving or svc.generation)
        await self._wait(svc, lambda: bool(svc.endpoints) or svc.status == "failed" or svc.deleted, wait)
        if svc.status == "failed":
            raise self._failure(svc)
        return svc.endpoints

    def status(self, key: str) -> dict:
        svc = self._get(key)
        spec = svc.specs.get(svc.serving) or svc.spec
        return {
            "status": svc.status, "version": spec.version.version, "latest_version": svc.spec.version.version,
            "ready_replicas": len(svc.endpoints), "instances": [r.describe() for r in svc.replicas.values()],
            "error": svc.error, "idle_seconds": round(time.monotonic() - svc.last_active, 3),
        }

    def logs(self, key: str, limit: int) -> str:
        svc = self._get(key)
        folder = self._log_dir(svc.spec)
        files = sorted(folder.glob("*.log"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
        parts = []
        for path in files:
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - limit))
                text = f.read().decode(errors="replace")
            if text:
                parts.append(f"==> replica {path.stem} <==\n{text}")
        return "\n".join(parts)[-limit:]

    def describe(self, workspace: str) -> list[dict]:
        """The services of ``workspace`` (keys are ``workspace/name``)."""
        return [{"service": key, "status": s.status, "ready": len(s.endpoints), "replicas": len(s.replicas)}
                for key, s in self.services.items() if key.startswith(f"{workspace}/")]

    async def close(self) -> None:
        for svc in self.services.values():
            svc.deleted = True
            for replica in svc.replicas.values():
                self._signal(replica, signal.SIGTERM)
        for task in list(self._tasks):
            task.cancel()
        await self.http.aclose()

    # -- internals -----------------------------------------------------------------------
    def _get(self, key: str) -> Service:
        svc = self.services.get(key)
        if svc is None:
            raise NotFound(f"no service {key.partition('/')[2]!r}")
        return svc

    def _failure(self, svc: Service) -> ServiceFailed:
        error = svc.error or {}
        return ServiceFailed(f"service {svc.spec.name!r} cannot start: {error.get('message', 'unknown reason')}",
                             cause=error)

    def _spawn_task(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _wait(self, svc: Service, done, timeout: float) -> None:
        deadline = time.monotonic() + max(0.0, timeout)
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                await asyncio.wait_for(svc.changed.wait(), left)
            except asyncio.TimeoutError:
                return

    def _log_dir(self, spec: ServiceInfo) -> Path:
        return self.log_root / spec.workspace / spec.name

    def _init_path(self, spec: ServiceInfo) -> Path:
        digest = hashlib.sha256(spec.init).hexdigest()[:16]
        return self.init_root / spec.workspace / f"{spec.name}.v{spec.version.version}.{digest}.init"

    def _write_init(self, spec: ServiceInfo) -> None:
        path = self._init_path(spec)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(spec.init)
        os.replace(tmp, path)

    def _scale_up(self, svc: Service, generation: int) -> None:
        spec = svc.specs[generation]
        for _ in range(max(0, spec.replicas - len(svc.live(generation)))):
            self._start(svc, generation)

    @abc.abstractmethod
    def _signal(self, replica: Replica, signum: int) -> None:
        """Send ``signum`` to a replica (SIGTERM: drain and stop; SIGKILL: now)."""

    def _start(self, svc: Service, generation: int, delay: float = 0.0) -> None:
        self._seq += 1
        spec = svc.specs[generation]
        replica = Replica(id=f"r{self._seq}-v{spec.version.version}", generation=generation, spec=spec,
                          log_path=self._log_dir(spec) / f"r{self._seq}-v{spec.version.version}.log")
        svc.replicas[replica.id] = replica
        self._spawn_task(self._run(svc, replica, delay))

    @abc.abstractmethod
    async def _spawn(self, replica: Replica) -> None:
        """Start ``replica``'s process (set ``replica.proc`` and ``replica.url``)."""

    async def _run(self, svc: Service, replica: Replica, delay: float) -> None:
        if delay:
            await asyncio.sleep(delay)
        if replica.state != STARTING or svc.deleted:
            svc.replicas.pop(replica.id, None)
            return
        try:
            await self._spawn(replica)
        except Exception as exc:
            svc.replicas.pop(replica.id, None)
            self._fail(svc, replica.generation, {"type": type(exc).__name__, "message": f"replica could not start: {exc}"})
            return
        outcome = await self._until_ready(replica)
        if outcome is True:
            self._on_ready(svc, replica)
            await self._watch(replica)
        elif isinstance(outcome, dict):  # the instance could not be built: no use retrying
            self._signal(replica, signal.SIGKILL)
            await replica.proc.wait()
            svc.replicas.pop(replica.id, None)
            self._fail(svc, replica.generation, outcome)
            return
        code = await replica.proc.wait()
        self._on_exit(svc, replica, code)

    async def _until_ready(self, replica: Replica):
        """True when ready; the error dict if start-up failed; None if the process ended first."""
        deadline = time.monotonic() + self.startup_timeout
        delay = 0.005
        wait_exit = asyncio.ensure_future(replica.proc.wait())
        try:
            while time.monotonic() < deadline and replica.state == STARTING:
                try:
                    resp = await self.http.get(replica.url + "/readyz")
                    if resp.status_code == 200:
                        return True
                    if resp.status_code == 500:
                        body = resp.json()
                        return body.get("error") or {"type": "Error", "message": resp.text[:500]}
                except (httpx.HTTPError, ValueError):
                    pass
                done, _ = await asyncio.wait({wait_exit}, timeout=delay)
                if done:
                    return None
                delay = min(delay * 1.5, 0.1)
            if replica.state == STARTING:
                return {"type": "TimeoutError", "message": f"not ready after {self.startup_timeout:g} s"}
            return None
        finally:
            if not wait_exit.done():
                wait_exit.cancel()

    async def _watch(self, replica: Replica) -> None:
        """Until the process ends: kill it when /healthz stops answering (3 checks in a row)."""
        misses = 0
        while True:
            try:
                await asyncio.wait_for(asyncio.shield(replica.proc.wait()), self.health_interval)
                return
            except asyncio.TimeoutError:
                pass
            if replica.state != READY:
                continue
            try:
                ok = (await self.http.get(replica.url + "/healthz")).status_code == 200
            except httpx.HTTPError:
                ok = False
            misses = 0 if ok else misses + 1
            if misses >= 3:
                log.warning("replica %s stopped answering /healthz: killing it", replica.id)
                self._signal(replica, signal.SIGKILL)

    def _on_ready(self, svc: Service, replica: Replica) -> None:
        if replica.state != STARTING:
            return
        replica.state = READY
        gen = replica.generation
        if gen == svc.generation:
            svc.start_failures = 0
            if svc.serving != gen and (not svc.endpoints or len([r for r in svc.live(gen) if r.state == READY])
                                       >= svc.specs[gen].replicas):
                old = [r for r in svc.replicas.values() if r.generation != gen]
                svc.serving = gen
                self._route(svc)
                for r in old:
                    self._drain(svc, r)
        self._route(svc)
        if svc.endpoints:
            svc.status = "ready"
        svc.notify()

    def _route(self, svc: Service) -> None:
        svc.endpoints = [r.endpoint for r in svc.replicas.values() if r.state == READY and r.generation == svc.serving]

    def _on_exit(self, svc: Service, replica: Replica, code: int | None) -> None:
        was = replica.state
        svc.replicas.pop(replica.id, None)
        replica.state = "exited"
        self._route(svc)
        svc.notify()
        if was == DRAINING or svc.deleted or replica.generation not in (svc.generation, svc.serving):
            return
        log.warning("replica %s of %s exited (%s) while %s: restarting", replica.id, svc.spec.key, code, was)
        if was == STARTING:
            svc.start_failures += 1
            if svc.start_failures >= 3:
                tail = file_tail(replica.log_path)
                self._fail(svc, replica.generation, {
                    "type": "ReplicaExited", "message": f"the replica exited with code {code} before it was ready, "
                    f"3 times in a row; its output ends with:\n{tail}", "log": tail})
                return
        self._start(svc, replica.generation, delay=0.1 * (2 ** svc.start_failures) if was == STARTING else 0.0)

    def _fail(self, svc: Service, generation: int, error: dict) -> None:
        svc.failed_generations.add(generation)
        for r in list(svc.replicas.values()):
            if r.generation == generation:
                self._drain(svc, r, kill=True)
        spec = svc.specs.get(generation)
        label = f"version {spec.version.version}" if spec else "the service"
        if svc.serving and svc.serving != generation:
            svc.error = {**error, "message": f"rolling to {label} failed (still serving version "
                         f"{svc.specs[svc.serving].version.version}): {error.get('message', '')}"}
            svc.generation = svc.serving  # keep serving what works
            svc.spec = svc.specs[svc.serving]
            svc.status = "ready" if svc.endpoints or svc.live(svc.serving) else "scaled_to_zero"
        else:
            svc.status, svc.error = "failed", error
        svc.notify()

    def _drain(self, svc: Service, replica: Replica, kill: bool = False) -> None:
        """Stop routing to a replica, then stop it; uvicorn finishes the calls in flight."""
        if replica.state == DRAINING:
            return
        replica.state = DRAINING
        self._route(svc)
        self._spawn_task(self._stop(svc, replica, kill))

    async def _stop(self, svc: Service, replica: Replica, kill: bool) -> None:
        while replica.proc is None and replica.id in svc.replicas:
            await asyncio.sleep(0.05)
        if replica.proc is None:
            return
        if not kill:
            await asyncio.sleep(0.05)  # calls routed just before the switch reach it first
        self._signal(replica, signal.SIGKILL if kill else signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(replica.proc.wait()), self.drain)
        except asyncio.TimeoutError:
            self._signal(replica, signal.SIGKILL)

    async def _watch_idle(self, svc: Service) -> None:
        while not svc.deleted:
            idle = svc.spec.scale_to_zero
            await asyncio.sleep(1.0 if idle is None else min(max(idle / 4, 0.05), 1.0))
            if idle is None or not svc.endpoints or time.monotonic() - svc.last_active < idle:
                continue
            if any(r.state == STARTING for r in svc.replicas.values()):
                continue
            if await self._busy(svc):
                svc.last_active = time.monotonic()
                continue
            if time.monotonic() - svc.last_active < idle:
                continue  # a call came in meanwhile
            log.info("service %s idle for %.1f s: scaling to zero", svc.spec.key, idle)
            svc.status = "scaled_to_zero"
            for replica in list(svc.replicas.values()):
                self._drain(svc, replica)
            svc.notify()

    async def _busy(self, svc: Service) -> bool:
        for replica in list(svc.replicas.values()):
            if replica.state != READY:
                continue
            try:
                state = (await self.http.get(replica.url + "/readyz")).json()
            except (httpx.HTTPError, ValueError):
                continue
            if state.get("inflight") or state.get("waiting"):
                return True
        return False
