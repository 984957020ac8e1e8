"""Worker mode: a warm process that pulls runs of one job version from the gateway, one at a time.

Each request both hands back the last run's result and asks for the next run, so a busy
worker costs one round trip per run. While a map keeps every worker busy the gateway hands a
worker a group of runs at once: it runs them in order and streams each result back on one request
as soon as it has it (so the gateway knows which run is in hand), whose answer is its next lease.

The user's module is imported once and stays loaded
between runs (as in a warm serverless container); each run's output is captured apart.
"""

from __future__ import annotations

import os
import signal
import struct
import sys

from opbox import envelope, files
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
    just ended) is ignored, so it can never end the next run or the worker. Holding a group, the worker
    asks the gateway which of its runs are cancelled (``ask``): it stops the one in hand only if it is
    one of them, and skips the others when their turn comes."""

    held: str | None = None  # the run in hand
    ask = None  # holding a group: () -> the group's cancelled runs, as the gateway says
    skip: set = set()
    asking = again = False  # a signal during the question: ask once more after it

    @classmethod
    def cancel(cls, signum, frame):
        if cls.ask is None:
            if cls.held is not None:
                raise RunCancelled("cancelled by request")
            return
        if cls.asking:
            cls.again = True
            return
        cls.asking = True
        try:
            cls.again = True
            while cls.again:
                cls.again = False
                cls.skip = cls.skip | cls.ask()
        finally:
            cls.asking = False
        if cls.held is not None and cls.held in cls.skip:
            raise RunCancelled("cancelled by request")


def _ok(answer) -> None:
    status, _, data = answer
    if status >= 300:
        raise RuntimeError(f"gateway answered {status}: {data[:200]!r}")


# a group's frames (platform/gateway/routes_internal.py has the same)
LEASE_HEAD = struct.Struct(">HI")
RESULT_HEAD = struct.Struct(">BHI")
OUTCOME_CODES = {"failed": 0, "succeeded": 1, "skipped": 2}
STOP_GROUP = "*stop"  # the gateway is stopping: start no other run of the group (hand them back skipped)


def group_runs(headers, data: bytes) -> list[tuple[str, dict, bytes]]:
    """A group lease's runs: (run id, its lease headers, its arguments) in order."""
    runs, pos, view = [], 0, memoryview(data)
    common = {"X-Opbox-Inline": headers.get("X-Opbox-Inline"), "X-Opbox-Result-Limit": headers.get("X-Opbox-Result-Limit")}
    while pos < len(data):
        meta_len, size = LEASE_HEAD.unpack_from(data, pos)
        pos += LEASE_HEAD.size
        run_id, timeout, traceparent, url = bytes(view[pos:pos + meta_len]).decode().split("\t")
        pos += meta_len
        runs.append((run_id, {**common, "X-Opbox-Run": run_id, "X-Opbox-Timeout": timeout or None,
                              "X-Opbox-Traceparent": traceparent or None, envelope.URL_HEADER: url or None},
                     bytes(view[pos:pos + size])))
        pos += size
    return runs


def main() -> int:
    env = os.environ
    pool, worker = env["OPBOX_POOL"], env["OPBOX_WORKER_ID"]
    token = env.get("OPBOX_WORKER_TOKEN") or env["OPBOX_RUN_TOKEN"]  # a cluster pod's comes from its Secret
    channel = Channel(env["OPBOX_GATEWAY_URL"], token, worker)
    logs = Channel(env["OPBOX_GATEWAY_URL"], token, worker, patience=10)
    side = Channel(env["OPBOX_GATEWAY_URL"], token, worker)  # a group's runs' own requests (items, uploads)
    asks = Channel(env["OPBOX_GATEWAY_URL"], token, worker, patience=10)
    execute = Executor(env["OPBOX_ENTRY"], env.get("OPBOX_CODE_DIR"))
    capture = OutputCapture(lambda run_id, data: _ok(logs.request("POST", f"/_internal/pools/{pool}/runs/{run_id}/logs", data)))
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGUSR1, _Lease.cancel)
    become_subreaper()
    execute.preload()  # before asking for work: the first run does not pay for the import
    next_path = f"/_internal/pools/{pool}/next?wait=10"
    runs_path = f"/_internal/pools/{pool}/runs"
    uploads_path = f"/_internal/pools/{pool}/payloads"  # signed uploads for large results
    cancelled_path = f"/_internal/pools/{pool}/cancelled"
    files.install(transfer.RuntimeFiles(Channel(env["OPBOX_GATEWAY_URL"], token, worker), f"/_internal/pools/{pool}/files"))

    def run(run_id: str, headers, data: bytes, line: Channel) -> tuple[str, bytes]:
        """Run one leased run; its outcome and the result to hand in (``line``: for its items and uploads)."""
        capture.start(run_id)
        try:
            _Lease.held = run_id
            if run_id in _Lease.skip:  # cancelled while it was being taken up (the signal came before ``held``)
                raise RunCancelled("cancelled by request")
            items = ItemShipper(line, f"{runs_path}/{run_id}/items", headers, uploads_path)
            with run_context(headers.get("X-Opbox-Traceparent"), execute.entry, run_id) as traced:
                outcome, body = transfer.call(execute, line, headers, data, items)
                traced(outcome)
        except RunCancelled as exc:  # the platform has ended the run already; this result is ignored
            outcome, body = "failed", dump_error(exc, "")
        finally:
            _Lease.held = None
            end_leftovers()  # what the run started ends with it (before its last output is shipped)
            capture.stop()
        outcome, body = within_limit(outcome, body, headers.get("X-Opbox-Result-Limit"))
        return transfer.outgoing(line, uploads_path, headers, outcome, body)

    def ask_cancelled() -> set:
        status, _, data = asks.request("GET", cancelled_path)
        return set(data.decode().split()) if status == 200 else set()

    def group_results(runs):
        """Run a group's runs in order, each result a frame sent as soon as it is there; a run cancelled before
        its turn is skipped (never started)."""
        for run_id, headers, data in runs:
            if run_id in _Lease.skip or STOP_GROUP in _Lease.skip:
                outcome, body = "skipped", b""
            else:
                outcome, body = run(run_id, headers, data, side)
            yield RESULT_HEAD.pack(OUTCOME_CODES[outcome], len(run_id.encode()), len(body)) + run_id.encode() + body

    done_headers, body, group = None, b"", None
    while True:
        try:
            if group is not None:  # the group's results go on one request, its answer is the next lease
                _Lease.ask, _Lease.skip = ask_cancelled, set()
                try:
                    status, headers, data = channel.stream("POST", next_path, group_results(group),
                                                           {"X-Opbox-Group": str(len(group))})
                finally:
                    _Lease.ask, _Lease.skip = None, set()
            else:
                status, headers, data = channel.request("POST", next_path, body, done_headers)
        except GatewayGone as exc:
            print(f"opbox worker {worker}: {exc}; exiting", file=sys.stderr)
            return 1
        done_headers, body, group = None, b"", None
        if status == 204:
            if headers.get("X-Opbox-Action") == "exit":
                return 0
            continue
        if status != 200:
            print(f"opbox worker {worker}: gateway answered {status}: {data[:500]!r}; exiting", file=sys.stderr)
            return 1
        if headers.get("X-Opbox-Group"):
            group = group_runs(headers, data)
            continue
        run_id = headers["X-Opbox-Run"]
        outcome, body = run(run_id, headers, data, channel)
        done_headers = {"X-Opbox-Done": run_id, "X-Opbox-Outcome": outcome,
                        "Content-Type": "application/x-opbox-envelope"}
