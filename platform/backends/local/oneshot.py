"""One-shot runs: a fresh ``python -m opbox.runtime run --run-id X`` process per run.

The local backend's ``isolation="run"`` mode, for code that must not share an interpreter
between runs. It is also exactly what a Kubernetes Job's pod does, so it exercises the
batch entrypoint end to end on one machine. At most ``max_procs`` runs execute at once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections import deque
from pathlib import Path

from ..base import RunEvents, RunTicket, VersionInfo
from ..pools import describe_exit
from ..runtime_env import runtime_env
from .process import child_setup, process_env


class OneShotProc:
    def __init__(self, ticket: RunTicket, version: VersionInfo):
        self.ticket, self.version = ticket, version
        self.proc: asyncio.subprocess.Process | None = None
        self.kill_reason: tuple[str, str] | None = None


class OneShotRunner:
    def __init__(self, *, gateway_url: str, log_dir: Path, token_for, max_procs: int):
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
        env = process_env(version, runtime_env(version, gateway_url=self.gateway_url,
                                               run=(ticket.run_id, self.token_for(f"run:{ticket.run_id}"))))
        log_path = self.log_dir / version.key / f"{ticket.run_id}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        timer = None
        try:
            with open(log_path, "ab") as out:
                one.proc = await asyncio.create_subprocess_exec(
                    version.artifact.python or sys.executable, "-m", "opbox.runtime", "run",
                    "--run-id", ticket.run_id, cwd=version.artifact.code_dir, env=env,
                    stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True, preexec_fn=child_setup)
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
        if one.proc is not None and one.proc.returncode is None:
            try:
                os.killpg(one.proc.pid, signum)
            except ProcessLookupError:
                pass

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
