"""Served classes on the local backend: each replica is a process of the version's virtualenv.

Readiness, restarts, scale to zero and rolling redeploys are ``Replicas``' own; this only
starts ``python -m opbox.runtime serve --fd N`` on the loopback socket the platform bound,
with the same process setup as the warm workers (own session, dies with the gateway).
"""

from __future__ import annotations

import os

from ..base import service_caller_token
from ..replicas import Replica, Replicas, loopback_listener
from ..runtime_env import runtime_env
from .process import signal_runtime, start_runtime
from .sandbox import Sandbox


class LocalServices(Replicas):
    def __init__(self, home, *, sandbox: Sandbox | None = None, gateway_url: str | None = None, token_for=None,
                 **options):
        super().__init__(home, **options)
        self.sandbox = sandbox
        self.gateway_url = gateway_url  # with token_for: replicas may call their workspace's jobs and services
        self.token_for = token_for

    async def _spawn(self, replica: Replica) -> None:
        spec = replica.spec
        init = self._init_path(spec)
        if self.sandbox is not None:  # the constructor's arguments: readable by the workspace's uid only
            uid = self.sandbox.uids.uid(spec.workspace)
            os.chown(init, uid, uid)
        sock, replica.url = loopback_listener()
        try:
            caller = service_caller_token(self.token_for, spec.key) if self.token_for else None
            runtime = runtime_env(spec.version, serve=spec, replica=replica.id, init_file=str(init),
                                  replica_token=replica.token, secrets=True, gateway_url=self.gateway_url,
                                  caller=caller)
            replica.proc = await start_runtime(spec.version, runtime, ["serve", "--fd", str(sock.fileno())],
                                               replica.log_path, self.sandbox, readable=(str(init),),
                                               pass_fds=(sock.fileno(),))
        finally:
            sock.close()

    def _signal(self, replica: Replica, signum: int) -> None:
        signal_runtime(replica.proc, signum, self.sandbox is not None)
