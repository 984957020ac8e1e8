"""Where one 50 MiB argument + result round trip spends its time, stage by stage, on a fresh platform (local store).

The caller's stages are timed here, around the SDK's own functions (pickling, the upload, the wait for the run,
the result's download, unpickling); the gateway's and the worker's come from py-spy (``--subprocesses``,
``--idle``) attached to the gateway while the same round trips run again, as seconds of samples per round trip
in each stage (the worker's wait for its next lease is left out). py-spy slows what it samples: its seconds
say where the time goes, the unsampled wall times say how long it takes.

    python bench/profile_big_data.py [--mib 50] [--repeat 5] [--kinds bytes numpy dataframe] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

# py-spy frames (function (file)) that mark a stage, the first listed that a stack has wins; matched as substrings
STAGES = {
    "worker": [("download the arguments", ("download (transfer.py", "download (runtime/transfer.py")),
               ("unpickle the arguments", ("load_call (", "load_args (")),
               ("pickle the result", ("dump_result", "dumps_out_of_band", "dumps (opbox/libraries.py")),
               ("upload the result", ("offload (", "outgoing (transfer.py", "outgoing (runtime/transfer.py")),
               ("the user's function", ("echo (",))],
    "gateway": [("store: receive an upload", ("LocalStore._put_endpoint", "_Upload.", "BodyReceiver.", "receive_into (")),
                ("store: send a download", ("send_file (", "_sendfile (", "FileResponse")),
                ("threads: disk writes, fsync, sendfile (C calls)", ("_WorkItem.run (",)),
                ("uvicorn: parsing request bodies", ("HttpToolsProtocol.data_received", "HttpToolsProtocol.on_body",
                                                     "FlowControl.")),
                ("records (SQLite, checkpoints)", ("(records/",)),
                ("the rest of the routes", ("RequestResponseCycle.run_asgi",))],
}
IDLE = ("Condition.wait", "_worker (concurrent", "Event.wait", "select (selectors", "sleep", "Runner.run")


def values(mib: int, kinds) -> dict:
    from bench_big_data import values as make

    return {k: v for k, v in make(mib).items() if k in kinds}


class Timers:
    """Wall time spent in the SDK's stage functions, patched in place for the length of the run."""

    def __init__(self):
        self.spent: dict[str, float] = defaultdict(float)
        self.undo: list = []

    def wrap(self, module, name: str, stage: str) -> None:
        real = getattr(module, name, None)
        if real is None:
            return

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                self.spent[stage] += time.perf_counter() - t
        setattr(module, name, timed)
        self.undo.append((module, name, real))

    def restore(self) -> None:
        for module, name, real in reversed(self.undo):
            setattr(module, name, real)


def caller_stages(echo, value, repeat: int) -> dict:
    from opbox import client, offload, remote, serialization

    timers = Timers()
    for name in ("dump_args_pieces", "dump_args"):
        timers.wrap(offload.serialization, name, "pickle the arguments")
    timers.wrap(offload, "outgoing", "upload the arguments (and ask where)")
    timers.wrap(client.Client, "post_envelope", "wait for the run (gateway, worker)")
    timers.wrap(offload, "download", "download the result")
    timers.wrap(remote, "download", "download the result")  # (the call's own reference to it)
    timers.wrap(serialization, "load_body", "unpickle the result")
    walls = []
    try:
        for _ in range(repeat):
            t = time.perf_counter()
            echo(value)
            walls.append(time.perf_counter() - t)
    finally:
        timers.restore()
    out = {stage: round(s / repeat, 4) for stage, s in timers.spent.items()}
    out["round_trip_s (median)"] = round(statistics.median(walls), 4)
    return out


def sampled_stages(raw: Path, rate: int, round_trips: int) -> dict:
    found: dict[str, Counter] = {"worker": Counter(), "gateway": Counter()}
    others: dict[str, Counter] = {"worker": Counter(), "gateway": Counter()}
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        at = max((i for i, f in enumerate(frames) if f.startswith("process ")), default=0)
        proc = "worker" if "runtime" in frames[at] else "gateway"
        frames = frames[at + 1:]
        leaf = frames[-1] if frames else ""
        if leaf.startswith(IDLE):
            continue
        stage = "other"
        for name, marks in STAGES[proc]:
            if any(mark in f for f in frames for mark in marks):
                stage = name
                break
        if proc == "worker" and stage == "other" and "Channel.request" in stack:
            continue  # waiting for the next lease
        found[proc][stage] += int(count)
        if stage == "other":
            others[proc][leaf] += int(count)
    out = {proc: {stage: round(n / rate / round_trips, 4) for stage, n in c.most_common()} for proc, c in found.items()}
    for proc, c in others.items():  # what "other" is, by the frame sampled
        out[proc]["other, top frames"] = {f: round(n / rate / round_trips, 4) for f, n in c.most_common(6)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--kinds", nargs="+", default=["bytes", "numpy", "dataframe"])
    parser.add_argument("--rate", type=int, default=250)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from bench_big_data import CODE
    from conftest import user_module
    from platform_fixture import running_platform

    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    result: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "mib": args.mib,
                    "repeat": args.repeat, "loadavg_at_start": list(os.getloadavg())}
    with tempfile.TemporaryDirectory() as tmp, \
            running_platform(Path(tmp) / "home", extra_env={"OPBOX_MAX_PAYLOAD": str(2 * 1024**3)}) as plat, \
            user_module(Path(tmp), "bigprofile", CODE) as mod:
        echo = mod.echo.deploy(client=plat.client(), quiet=True)
        for kind, value in values(args.mib, args.kinds).items():
            echo(value[:1])
            echo(value)  # warm: the worker's imports, the first allocation of this size
            entry = {"caller_s_per_round_trip": caller_stages(echo, value, args.repeat)}
            raw = Path(tmp) / f"{kind}.txt"
            if not Path(spy).exists():
                entry["sampled_s_per_round_trip"] = "py-spy is not installed (make bench installs it)"
                result[kind] = entry
                continue
            proc = subprocess.Popen([spy, "record", "-p", str(plat.proc.pid), "--subprocesses", "--idle", "--rate",
                                     str(args.rate), "--format", "raw", "-o", str(raw)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.5)
            t = time.perf_counter()
            for _ in range(args.repeat):
                echo(value)
            entry["sampled_round_trip_s"] = round((time.perf_counter() - t) / args.repeat, 4)
            time.sleep(0.5)
            proc.send_signal(signal.SIGINT)
            proc.wait(60)
            if raw.exists():
                entry["sampled_s_per_round_trip"] = sampled_stages(raw, args.rate, args.repeat)
            else:
                entry["sampled_s_per_round_trip"] = "py-spy could not attach (root or ptrace_scope 0 needed)"
            result[kind] = entry
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
