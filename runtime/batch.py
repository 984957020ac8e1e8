"""Batch mode: run exactly one Job-Run, from the store (code, args) to the store (result, logs).

This is what a Kubernetes Job's pod runs, and what the local backend runs in one-shot mode.
The exit code tells the orchestrator how it went: 0 succeeded, 1 the call failed, 2 the
run could not be started.
"""

from __future__ import annotations

import os
import socket
import sys

from opbox import files

from . import transfer
from .capture import OutputCapture
from .channel import Channel, GatewayGone
from .execute import Executor, within_limit
from .items import ItemShipper
from .reaper import become_subreaper, end_leftovers
from .tracing import run_context
from .worker import _ok


def main(run_id: str) -> int:
    env = os.environ
    channel = Channel(env["OPBOX_GATEWAY_URL"], env["OPBOX_RUN_TOKEN"], socket.gethostname())
    try:
        status, headers, args = channel.request("GET", f"/_internal/runs/{run_id}/args")
        if status != 200:
            print(f"opbox: run {run_id} cannot start: gateway answered {status}: {args[:500]!r}", file=sys.stderr)
            return 2
        logs = Channel(env["OPBOX_GATEWAY_URL"], env["OPBOX_RUN_TOKEN"], socket.gethostname(), patience=10)
        capture = OutputCapture(lambda rid, data: _ok(logs.request("POST", f"/_internal/runs/{rid}/logs", data)))
        uploads_path = f"/_internal/runs/{run_id}/payloads"  # signed uploads for large results
        files.install(transfer.RuntimeFiles(Channel(env["OPBOX_GATEWAY_URL"], env["OPBOX_RUN_TOKEN"],
                                                    socket.gethostname()), f"/_internal/runs/{run_id}/files"))
        execute = Executor(env["OPBOX_ENTRY"], env.get("OPBOX_CODE_DIR") or os.getcwd())
        become_subreaper()
        capture.start(run_id)
        try:
            items = ItemShipper(channel, f"/_internal/runs/{run_id}/items", headers, uploads_path)
            with run_context(headers.get("X-Opbox-Traceparent"), execute.entry, run_id) as traced:
                outcome, payload = transfer.call(execute, channel, headers, args, items)
                traced(outcome)
        finally:
            end_leftovers()
            capture.stop()
        outcome, payload = within_limit(outcome, payload, headers.get("X-Opbox-Result-Limit"))
        outcome, payload = transfer.outgoing(channel, uploads_path, headers, outcome, payload)
        status, _, data = channel.request("POST", f"/_internal/runs/{run_id}/result", payload,
                                          {"X-Opbox-Outcome": outcome, "Content-Type": "application/x-opbox-envelope"})
        if status >= 300:
            print(f"opbox: result of {run_id} not accepted: {status}: {data[:500]!r}", file=sys.stderr)
            return 2
    except GatewayGone as exc:
        print(f"opbox: {exc}", file=sys.stderr)
        return 2
    return 0 if outcome == "succeeded" else 1
