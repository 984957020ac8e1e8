"""Served classes on the local backend: each replica is a process of the version's virtualenv.

Readiness, restarts, scale to zero and rolling redeploys are ``Replicas``' own; this only
starts ``python -m opbox.runtime serve --fd N`` on the loopback socket the platform bound,
with the same process setup as the warm workers (own session, dies with the gateway).
"""

from __future__ import annotations

import asyncio
import sys

from ..replicas import Replica, Replicas, loopback_listener
from ..runtime_env import runtime_env
from .process import child_setup, process_env


class LocalServices(Replicas):
    async def _spawn(self, replica: Replica) -> None:
        spec, artifact = replica.spec, replica.spec.version.artifact
        sock, replica.url = loopback_listener()
        try:
            env = process_env(spec.version, runtime_env(spec.version, serve=spec, replica=replica.id,
                                                         init_file=str(self._init_path(spec))))
            replica.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(replica.log_path, "ab") as out:
                replica.proc = await asyncio.create_subprocess_exec(
                    artifact.python or sys.executable, "-m", "opbox.runtime", "serve", "--fd", str(sock.fileno()),
                    cwd=artifact.code_dir, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=out,
                    stderr=asyncio.subprocess.STDOUT, start_new_session=True, preexec_fn=child_setup,
                    pass_fds=(sock.fileno(),),
                )
        finally:
            sock.close()
