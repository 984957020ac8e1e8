"""One-shot runs: a fresh ``python -m opbox.runtime run --run-id X`` process per run.

The local backend's ``isolation="run"`` mode, for code that must not share an interpreter
between runs. It is also exactly what a Kubernetes Job's pod does, so it exercises the
batch entrypoint end to end on one machine. At most ``max_procs`` runs execute at once.
"""

from __future__ import annotations

import asyncio
import signal
from collections import deque
from pathlib import Path

from ..base import RunEvents, RunTicket, VersionInfo, run_caller_token
from ..pools import describe_exit
from ..runtime_env import runtime_env
from .process import signal_runtime, start_runtime
from .sandbox import Sandbox


class OneShotProc:
    def __init__(self, ticket: RunTicket, version: VersionInfo):
        self.ticket, self.version = ticket, version
        self.proc: asyncio.subprocess.Process | None = None
        self.kill_reason: tuple[str, str] | None = None


class OneShotRunner:
    def __init__(self, *, gateway_url: str, log_dir: Path, token_for, max_procs: int, sandbox: Sandbox | None = None):
        self.sandbox = sandbox
        self.gateway_url = gateway_url
        self.log_dir = log_dir
        self.token_for = token_for
        self.max_procs = max_procs
        self.events: RunEvents | None = None
        self.queue: deque[tuple[RunTicket, VersionInfo]] = deque()
        self.running: dict[str, OneShotProc] = {}
        self._tasks: set[asyncio.Task] = set()

    def submit(self, ticket: RunTicket, version: VersionInfo) -> None:
        self.queue.append((ticket, version))
        self._fill()

    def _fill(self) -> None:
        while self.queue and len(self.running) < self.max_procs:
            ticket, version = self.queue.popleft()
            one = self.running[ticket.run_id] = OneShotProc(ticket, version)
            task = asyncio.ensure_future(self._run(one))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, one: OneShotProc) -> None:
        ticket, version = one.ticket, one.version
        runtime = runtime_env(version, gateway_url=self.gateway_url,
                              run=(ticket.run_id, self.token_for(f"run:{ticket.run_id}")), secrets=True,
                              caller=run_caller_token(self.token_for, ticket.run_id))
        log_path = self.log_dir / version.key / f"{ticket.run_id}.log"
        timer = None
        try:
            one.proc = await start_runtime(version, runtime, ["run", "--run-id", ticket.run_id], log_path,
                                           self.sandbox)
            if ticket.timeout:
                timer = asyncio.get_running_loop().call_later(
                    ticket.timeout, self.kill, one, "timed_out", f"timed out after {ticket.timeout:g} s")
            code = await one.proc.wait()
            status, reason = one.kill_reason or ("failed", describe_exit(code))
            # a run that reported its result is terminal already, and this is ignored
            self.events.run_lost(ticket.run_id, reason, status)
        except Exception as exc:
            self.events.run_lost(ticket.run_id, f"could not start the run's process: {exc}")
        finally:
            if timer:
                timer.cancel()
            self.running.pop(ticket.run_id, None)
            self._fill()

    def kill(self, one: OneShotProc, status: str, reason: str, signum: int = signal.SIGKILL) -> None:
        if one.kill_reason is None:
            one.kill_reason = (status, reason)
        signal_runtime(one.proc, signum, self.sandbox is not None)

    async def cancel(self, run_id: str, grace: float) -> None:
        one = self.running.get(run_id)
        if one is None:
            return
        self.kill(one, "cancelled", "cancelled by request", signal.SIGTERM)
        await asyncio.sleep(grace)
        self.kill(one, "cancelled", "cancelled by request")

    def busy(self):
        """(pid, memory limit in bytes, kill callback) for each run in progress."""
        for one in list(self.running.values()):
            if one.proc is not None and one.version.resource.memory_bytes:
                yield one.proc.pid, one.version.resource, lambda reason, one=one: self.kill(one, "failed", reason)

    async def close(self) -> None:
        for one in list(self.running.values()):
            self.kill(one, "failed", "platform stopped", signal.SIGTERM)
        for task in list(self._tasks):
            task.cancel()
