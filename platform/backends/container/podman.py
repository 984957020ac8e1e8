"""Workers as podman containers: ``podman run --network=host <image> worker`` (the image's
entrypoint is ``python -m opbox.runtime``), the container backend's ``Spawner``.

``Resource`` becomes container limits:

    memory     --memory and --memory-swap (the same value: no swap on top)
    cpu        --cpus
    gpu_count  --device nvidia.com/gpu=all, only when GPUs are asked for; it needs the NVIDIA
               Container Toolkit's CDI spec on the host (nvidia-ctk cdi generate). A GPU type
               (``gpu="..."``) cannot be chosen on one machine and is ignored.
    disk       not enforced (podman has no per-container disk quota on overlay without xfs)

Containers are killed with ``podman kill`` (cancel: SIGTERM, then SIGKILL after the grace
period; timeouts: SIGKILL). A container the kernel killed for passing its memory limit ends
its run failed with an ``OOMKilled`` reason: podman records it (``State.OOMKilled``), which
is why containers are removed after they are inspected rather than with ``--rm``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import shutil
import signal
from pathlib import Path

from opbox.errors import ConfigError

from ..base import VersionInfo, worker_caller_token
from ..pools import Worker, file_tail
from ..runtime_env import runtime_env
from .envfile import SecretEnvFile

log = logging.getLogger("opbox.container")

LABEL = "opbox.managed"
CGROUP_V1_MEMORY = Path("/sys/fs/cgroup/memory")


class MemoryCgroup:
    """cgroup v1 only: a parent memory cgroup of our own holding a container's memory limit.

    podman records ``State.OOMKilled`` from conmon, which misses OOM kills on some cgroup v1
    hosts; and the container's own cgroup is gone by the time it has exited. The kernel
    counts OOM kills in the cgroup whose limit was hit (``memory.oom_control: oom_kill N``),
    so the limit goes on a parent that we own and read after the container ends.
    """

    def __init__(self, name: str, limit: int):
        self.rel = f"/opbox/{name}"
        self.path = CGROUP_V1_MEMORY / "opbox" / name
        self.limit = limit
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "memory.limit_in_bytes").write_text(str(limit))
        try:
            (self.path / "memory.memsw.limit_in_bytes").write_text(str(limit))
        except OSError:  # no swap accounting: nothing to limit
            pass

    @staticmethod
    def usable() -> bool:
        return (CGROUP_V1_MEMORY / "memory.limit_in_bytes").exists() and os.access(CGROUP_V1_MEMORY, os.W_OK)

    def _read(self, name: str) -> str:
        try:
            return (self.path / name).read_text()
        except OSError:
            return ""

    def hit_limit(self) -> bool:
        """Whether the kernel OOM-killed in this cgroup (``oom_kill``), or, where that counter is
        not kept, whether usage ever hit the limit (``failcnt``, else the peak usage)."""
        for line in self._read("memory.oom_control").splitlines():
            if line.startswith("oom_kill ") and line.split()[1] != "0":
                return True
        if any(self._read(name).strip() not in ("", "0") for name in ("memory.failcnt", "memory.memsw.failcnt")):
            return True
        try:  # some kernels (and sandboxes) keep neither counter: the peak usage reached the limit
            return int(self._read("memory.max_usage_in_bytes")) >= self.limit - 2**20
        except ValueError:
            return False

    def remove(self) -> None:
        for controller in Path("/sys/fs/cgroup").iterdir():  # podman made the parent in every controller
            for path in sorted((controller / self.rel.lstrip("/")).glob("**/"), key=lambda p: -len(p.parts)):
                try:
                    path.rmdir()
                except OSError:
                    pass


def job_image(version: VersionInfo) -> str:
    if not version.artifact.image:
        raise ConfigError(f"version {version.key} has no image: the container backend needs the podman builder")
    return version.artifact.image


def container_env(version: VersionInfo, runtime: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """A container's environment as ``podman run`` flags, and the variables podman's own process must hold
    for them. The runtime's variables (tokens among them) go as ``-e NAME``, the value read from podman's
    environment, so they never appear on a command line; the version's ``Resource.env`` (settings, never
    secrets, named by the user) as ``-e NAME=VALUE``, so they never reach podman's own environment, where
    a name such as LD_PRELOAD would act on podman itself, on this host. The runtime's win over the user's."""
    user = [a for name, value in version.resource.env.items() if name not in runtime for a in ("-e", f"{name}={value}")]
    return [*user, *(a for name in runtime for a in ("-e", name))], runtime


def container_args(resource, *, memory: bool = True, gpu_device: str = "nvidia.com/gpu=all") -> list[str]:
    """``podman run`` flags for a ``Resource`` (``memory=False``: the limit is on a parent cgroup)."""
    args: list[str] = []
    if resource.memory_bytes and memory:
        args += ["--memory", str(resource.memory_bytes), "--memory-swap", str(resource.memory_bytes)]
    if resource.cpu_cores:
        args += ["--cpus", f"{resource.cpu_cores:g}"]
    if resource.gpu_count:
        args += ["--device", gpu_device]
    return args


class Container:
    """A running worker container: the attached ``podman run`` client and the container's name."""

    def __init__(self, spawner: "PodmanSpawner", worker: Worker, name: str, proc: asyncio.subprocess.Process,
                 log_path: Path, cgroup: MemoryCgroup | None = None):
        self.spawner, self.worker, self.name, self.proc, self.log_path = spawner, worker, name, proc, log_path
        self.cgroup = cgroup

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def wait(self) -> int:
        code = await self.proc.wait()
        oom = await self.spawner.oom_killed(self.name)
        if self.cgroup is not None and code == 128 + signal.SIGKILL:
            oom = oom or self.cgroup.hit_limit()
        self.spawner.remove(self.name, self.cgroup)
        if oom and self.worker.kill_reason is None:
            limit = self.worker.pool.version.resource.memory
            self.worker.kill_reason = ("failed", f"OOMKilled: the container passed its memory limit {limit}")
        if code > 128:  # 128 + N: the container's process was killed by signal N
            return -(code - 128)
        return code

    def output_tail(self, size: int = 4000) -> str:
        return file_tail(self.log_path, size)


class PodmanSpawner:
    def __init__(self, gateway_url: str, log_dir: Path, podman: str = "podman"):
        self.gateway_url = gateway_url
        self.log_dir = log_dir
        self.podman = podman
        self._tasks: set[asyncio.Task] = set()

    def _exe(self) -> str:
        exe = shutil.which(self.podman)
        if not exe:
            raise ConfigError(f"{self.podman} not found: the container backend needs podman (scripts/setup-podman.sh)")
        return exe

    async def spawn(self, worker: Worker) -> Container:
        version = worker.pool.version
        image = job_image(version)
        name = "opbox-" + re.sub(r"[^a-zA-Z0-9_.-]", "-", f"{worker.pool.id}-{worker.id}-{secrets.token_hex(3)}")
        env_args, env = container_env(version, runtime_env(
            version, in_image=True, gateway_url=self.gateway_url, worker=(worker.pool.id, worker.id, worker.token),
            caller=worker_caller_token(worker.pool.id, worker.id, worker.token)))
        secret_env = SecretEnvFile(version.secret_env) if version.secret_env else None
        cgroup = None
        if version.resource.memory_bytes and MemoryCgroup.usable():
            cgroup = MemoryCgroup(name, version.resource.memory_bytes)
        cmd = [self._exe(), "run", "--name", name, "--network=host", "--init", "--pull=never",
               "--label", f"{LABEL}=1", "--label", f"opbox.pool={worker.pool.id}",
               # conmon (and podman's exit cleanup) stay out of the limited cgroup: only the container counts
               *(["--cgroups=no-conmon", "--cgroup-parent", cgroup.rel] if cgroup else []), *container_args(version.resource, memory=not cgroup),
               *(secret_env.args() if secret_env else []), *env_args, image, "worker"]
        log_path = self.log_dir / worker.pool.id / f"{worker.id}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(log_path, "ab") as out:
                proc = await asyncio.create_subprocess_exec(  # cwd: conmon drops files (such as "oom") there
                    *cmd, env={**os.environ, **env}, stdin=asyncio.subprocess.DEVNULL, stdout=out,
                    stderr=asyncio.subprocess.STDOUT, start_new_session=True, cwd=str(log_path.parent))
        except BaseException:
            if secret_env:
                secret_env.discard()
            raise
        if secret_env:
            self._background(secret_env.feed(proc))
        return Container(self, worker, name, proc, log_path, cgroup)

    def signal(self, worker: Worker, signum: int) -> None:
        handle = worker.handle
        if handle is None or handle.proc.returncode is not None:
            return
        self._background(self._podman("kill", "--signal", signal.Signals(signum).name, handle.name))

    async def oom_killed(self, name: str) -> bool:
        code, out = await self._podman("inspect", "--type", "container", "--format", "{{.State.OOMKilled}}", name)
        return code == 0 and out.strip() == "true"

    def remove(self, name: str, cgroup: MemoryCgroup | None = None) -> None:
        async def rm() -> None:
            await self._podman("rm", "--force", "--time", "0", name)
            if cgroup is not None:
                cgroup.remove()

        self._background(rm())

    async def _podman(self, *args: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(self._exe(), *args, stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await proc.communicate()
        return proc.returncode, out.decode(errors="replace")

    def _background(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self, timeout: float = 10.0) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)
