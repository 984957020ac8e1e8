"""Worker mode: a warm process that pulls runs of one job version from the gateway, one at a time.

Each request both hands back the last run's result and asks for the next run, so a busy
worker costs one round trip per run. The user's module is imported once and stays loaded
between runs (as in a warm serverless container); each run's output is captured apart.
"""

from __future__ import annotations

import os
import signal
import sys

from opbox import files
from opbox.serialization import dump_error

from . import transfer
from .capture import OutputCapture
from .channel import Channel, GatewayGone
from .execute import Executor, within_limit
from .items import ItemShipper
from .reaper import become_subreaper, end_leftovers
from .tracing import run_context


def _terminate(signum, frame):  # the platform stops this worker: unwind the user's code, then exit
    raise SystemExit(128 + signum)


class RunCancelled(BaseException):
    """Raised in the user's code by SIGUSR1: the platform cancelled the run in hand (``finally`` blocks run)."""


class _Lease:
    """Whether a run is in hand: a cancel signal that arrives between runs (meant for a run that has
    just ended) is ignored, so it can never end the next run or the worker."""

    held = False

    @classmethod
    def cancel(cls, signum, frame):
        if cls.held:
            raise RunCancelled("cancelled by request")


def _ok(answer) -> None:
    status, _, data = answer
    if status >= 300:
        raise RuntimeError(f"gateway answered {status}: {data[:200]!r}")


def main() -> int:
    env = os.environ
    pool, worker = env["OPBOX_POOL"], env["OPBOX_WORKER_ID"]
    token = env.get("OPBOX_WORKER_TOKEN") or env["OPBOX_RUN_TOKEN"]  # a cluster pod's comes from its Secret
    channel = Channel(env["OPBOX_GATEWAY_URL"], token, worker)
    logs = Channel(env["OPBOX_GATEWAY_URL"], token, worker, patience=10)
    execute = Executor(env["OPBOX_ENTRY"], env.get("OPBOX_CODE_DIR"))
    capture = OutputCapture(lambda run_id, data: _ok(logs.request("POST", f"/_internal/pools/{pool}/runs/{run_id}/logs", data)))
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGUSR1, _Lease.cancel)
    become_subreaper()
    execute.preload()  # before asking for work: the first run does not pay for the import
    next_path = f"/_internal/pools/{pool}/next?wait=10"
    runs_path = f"/_internal/pools/{pool}/runs"
    uploads_path = f"/_internal/pools/{pool}/payloads"  # signed uploads for large results
    files.install(transfer.RuntimeFiles(Channel(env["OPBOX_GATEWAY_URL"], token, worker), f"/_internal/pools/{pool}/files"))
    done_headers, body = None, b""
    while True:
        try:
            status, headers, data = channel.request("POST", next_path, body, done_headers)
        except GatewayGone as exc:
            print(f"opbox worker {worker}: {exc}; exiting", file=sys.stderr)
            return 1
        done_headers, body = None, b""
        if status == 204:
            if headers.get("X-Opbox-Action") == "exit":
                return 0
            continue
        if status != 200:
            print(f"opbox worker {worker}: gateway answered {status}: {data[:500]!r}; exiting", file=sys.stderr)
            return 1
        run_id = headers["X-Opbox-Run"]
        capture.start(run_id)
        _Lease.held = True
        try:
            items = ItemShipper(channel, f"{runs_path}/{run_id}/items", headers, uploads_path)
            with run_context(headers.get("X-Opbox-Traceparent"), execute.entry, run_id) as traced:
                outcome, body = transfer.call(execute, channel, headers, data, items)
                traced(outcome)
        except RunCancelled as exc:  # the platform has ended the run already; this result is ignored
            outcome, body = "failed", dump_error(exc, "")
        finally:
            _Lease.held = False
            end_leftovers()  # what the run started ends with it (before its last output is shipped)
            capture.stop()
        outcome, body = within_limit(outcome, body, headers.get("X-Opbox-Result-Limit"))
        outcome, body = transfer.outgoing(channel, uploads_path, headers, outcome, body)
        done_headers = {"X-Opbox-Done": run_id, "X-Opbox-Outcome": outcome,
                        "Content-Type": "application/x-opbox-envelope"}
