"""Served classes on the local backend: each replica is a process of the version's virtualenv.

Readiness, restarts, scale to zero and rolling redeploys are ``Replicas``' own; this only
starts ``python -m opbox.runtime serve --fd N`` on the loopback socket the platform bound,
with the same process setup as the warm workers (own session, dies with the gateway).
"""

from __future__ import annotations

import os

from ..replicas import Replica, Replicas, loopback_listener
from ..runtime_env import runtime_env
from .process import signal_runtime, start_runtime
from .sandbox import Sandbox


class LocalServices(Replicas):
    def __init__(self, home, *, sandbox: Sandbox | None = None, **options):
        super().__init__(home, **options)
        self.sandbox = sandbox

    async def _spawn(self, replica: Replica) -> None:
        spec = replica.spec
        init = self._init_path(spec)
        if self.sandbox is not None:  # the constructor's arguments: readable by the workspace's uid only
            uid = self.sandbox.uids.uid(spec.workspace)
            os.chown(init, uid, uid)
        sock, replica.url = loopback_listener()
        try:
            runtime = runtime_env(spec.version, serve=spec, replica=replica.id, init_file=str(init),
                                  replica_token=replica.token, secrets=True)
            replica.proc = await start_runtime(spec.version, runtime, ["serve", "--fd", str(sock.fileno())],
                                               replica.log_path, self.sandbox, readable=(str(init),),
                                               pass_fds=(sock.fileno(),))
        finally:
            sock.close()

    def _signal(self, replica: Replica, signum: int) -> None:
        signal_runtime(replica.proc, signum, self.sandbox is not None)
