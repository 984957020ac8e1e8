"""Services on the container backend: each replica is a podman container of the version's image
running ``python -m opbox.runtime serve`` on a loopback socket the platform binds and hands in as
fd 3 (so no port can be taken in between). Everything else, readiness, restarts, scale to zero
and rolling redeploys, is ``Replicas``' own; only starting and signalling a replica differ."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import signal

from ..replicas import Replica, Replicas, loopback_listener
from ..base import service_caller_token
from ..runtime_env import runtime_env
from .envfile import SecretEnvFile
from .podman import LABEL, container_args, container_env, job_image


class ContainerServices(Replicas):
    def __init__(self, home, podman, token_for=None, **options):
        super().__init__(home, **options)
        self.podman = podman  # the backend's PodmanSpawner: its podman binary and `podman` runner
        self.token_for = token_for  # replicas call their workspace's jobs and services with a token of their own
        self.names: dict[str, str] = {}  # replica id -> container name

    async def _spawn(self, replica: Replica) -> None:
        spec = replica.spec
        version = spec.version
        image = job_image(version)
        name = "opbox-svc-" + re.sub(r"[^a-zA-Z0-9_.-]", "-", f"{spec.key}-{replica.id}-{secrets.token_hex(3)}")
        caller = service_caller_token(self.token_for, spec.key) if self.token_for else None
        env_args, env = container_env(version, runtime_env(
            version, in_image=True, serve=spec, replica=replica.id, replica_token=replica.token,
            init_file="/opbox/init", gateway_url=self.podman.gateway_url, caller=caller))
        secret_env = SecretEnvFile(version.secret_env) if version.secret_env else None
        cmd = [self.podman._exe(), "run", "--rm", "--name", name, "--network=host", "--init", "--pull=never",
               "--label", f"{LABEL}=1", "--label", f"opbox.service={spec.key}",
               "--preserve-fds=1", "-v", f"{self._init_path(spec)}:/opbox/init:ro",
               *container_args(version.resource), *(secret_env.args() if secret_env else []),
               *env_args, image, "serve", "--fd", "3"]
        sock, replica.url = loopback_listener()
        try:
            fd = sock.fileno()
            replica.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(replica.log_path, "ab") as out:
                replica.proc = await asyncio.create_subprocess_exec(  # cwd: conmon drops files there
                    *cmd, env={**os.environ, **env}, stdin=asyncio.subprocess.DEVNULL, stdout=out,
                    stderr=asyncio.subprocess.STDOUT, start_new_session=True, cwd=str(replica.log_path.parent),
                    pass_fds=(3,), preexec_fn=lambda: os.dup2(fd, 3))  # podman passes fds from 3 on
            self.names[replica.id] = name
        except BaseException:
            if secret_env:
                secret_env.discard()
            raise
        finally:
            sock.close()
        if secret_env:
            self.podman._background(secret_env.feed(replica.proc))

    def _signal(self, replica: Replica, signum: int) -> None:
        name = self.names.get(replica.id)
        if name is None or replica.proc is None or replica.proc.returncode is not None:
            return
        self.podman._background(self.podman._podman("kill", "--signal", signal.Signals(signum).name, name))
