"""Where the gateway's CPU goes: py-spy samples the gateway process of a fresh platform (as `make run`
runs it) during N warm calls, during C concurrent callers and while 32 clients call a served class, during
50 MiB argument+result round trips (bytes, numpy, DataFrame), and this prints each profile's top frames.

    python bench/profile_gateway.py [--calls 10000] [--callers 50] [--seconds 30] [--payload-mib 50] [--out bench/results]
    python bench/profile_gateway.py --summarize bench/results/warm_call.txt

py-spy (`make bench` installs it into .venv) must be allowed to read the gateway's memory (root, or
ptrace_scope 0). Each phase leaves OUT/<phase>.txt (collapsed stacks, py-spy's raw format: speedscope or any
flame graph tool draws it); the summary (self and inclusive shares of the sampled CPU,
by function and by package) is printed as JSON. Sampling costs the gateway little but shares the cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from harness import PRODUCT_DEFAULTS, cpu_seconds, machine

HERE = Path(__file__).resolve().parent

# py-spy names a frame's file by its path below sys.path: the first folder says whose code it is
PLATFORM = ("gateway/", "control/", "backends/", "proxy/", "store/", "notify.py", "core.py", "server.py", "ids.py",
            "settings.py")


def frame_package(frame: str) -> str:
    where = frame.rpartition(" (")[2].rstrip(")")
    if where.startswith("records/"):
        return "opbox records (SQLite)"
    if where.startswith(PLATFORM):
        return "opbox platform"
    if where.startswith("opbox/"):
        return "opbox sdk/envelope"
    return where.split("/", 1)[0].removesuffix(".py")


# py-spy's idle detection does not work on this kind of machine (a VM): parked threads are sampled as busy.
# Stacks ending in these frames are threads waiting for work (the thread pool, the checkpointer's sleep),
# and a stack that is only the event loop (Runner.run on top) is uvloop's C loop: epoll waits and C-level
# callbacks, which the sampler cannot tell apart. Both are left out of the shares; the JSON counts them.
PARKED = ("Condition.wait (threading.py)", "_worker (concurrent/futures/thread.py)", "Event.wait (threading.py)")
LOOP = "Runner.run (asyncio/runners.py)"


def summarize(raw: Path, top: int = 25) -> dict:
    self_, incl, pkg = Counter(), Counter(), Counter()
    total = parked = loop = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        raw_frames = stack.split(";")
        frames = raw_frames
        if frames[-1] in PARKED:
            parked += n
            continue
        if frames[-1] == LOOP:
            loop += n
            continue
        total += n
        self_[frames[-1]] += n
        pkg[frame_package(frames[-1])] += n
        for f in set(frames):
            incl[f] += n
    share = lambda c: round(100 * c / total, 1) if total else 0.0  # noqa: E731
    return {"samples_attributed": total, "samples_parked_threads": parked, "samples_event_loop_c": loop,
            "self_by_package_pct": {k: share(v) for k, v in pkg.most_common()},
            "self_pct": [[f, share(c)] for f, c in self_.most_common(top)],
            "inclusive_pct": [[f, share(c)] for f, c in incl.most_common(top * 3)]}


def record(pid: int, out: Path, rate: int):
    """py-spy record of ``pid`` until stopped (SIGINT); collapsed stacks in out.txt."""
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if spy is None:
        raise SystemExit("py-spy is not installed: `make bench` installs it into .venv")
    return subprocess.Popen([spy, "record", "--pid", str(pid), "--rate", str(rate), "--nolineno", "--format", "raw",
                             "-o", str(out.with_suffix(".txt"))], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def stop(spy: subprocess.Popen) -> None:
    time.sleep(0.5)
    spy.send_signal(signal.SIGINT)
    try:
        spy.wait(60)
    except subprocess.TimeoutExpired:
        spy.kill()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--callers", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--served-seconds", type=float, default=10.0, help="0: no served-class phase")
    parser.add_argument("--payload-mib", type=int, default=50, help="0: no payload phase")
    parser.add_argument("--rate", type=int, default=250, help="samples a second")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--summarize", type=Path, help="only print the summary of one collapsed-stacks file")
    args = parser.parse_args()
    if args.summarize:
        print(json.dumps(summarize(args.summarize), indent=2))
        return

    from bench import CODE, concurrent_callers, payloads
    from harness import timed_calls
    from platform_fixture import running_platform

    args.out.mkdir(parents=True, exist_ok=True)
    out: dict = {"machine": machine()}
    with tempfile.TemporaryDirectory() as tmp, running_platform(Path(tmp) / "home", extra_env=PRODUCT_DEFAULTS) as plat:
        code = Path(tmp) / "code"
        code.mkdir()
        (code / "bench_fns.py").write_text(CODE)
        sys.path.insert(0, str(code))
        import bench_fns

        square = bench_fns.square.deploy(client=plat.client(), quiet=True)
        echo = bench_fns.echo.deploy(client=plat.client(), quiet=True)
        timed_calls(square, 200)
        pid = plat.proc.pid

        spy = record(pid, args.out / "warm_call", args.rate)
        time.sleep(1.0)  # py-spy attaches
        before, t = cpu_seconds(pid), time.perf_counter()
        timed_calls(square, args.calls)
        out["warm_call"] = {"calls": args.calls, "wall_ms_per_call": round((time.perf_counter() - t) / args.calls * 1e3, 4),
                            "gateway_cpu_ms_per_call": round((cpu_seconds(pid) - before) / args.calls * 1e3, 4)}
        stop(spy)
        out["warm_call"]["profile"] = summarize(args.out / "warm_call.txt")

        spy = record(pid, args.out / "concurrent_callers", args.rate)
        time.sleep(1.0)
        out["concurrent_callers"] = concurrent_callers(plat, square, args.callers, args.seconds)
        stop(spy)
        out["concurrent_callers"]["profile"] = summarize(args.out / "concurrent_callers.txt")

        if args.served_seconds:  # the gateway's part only: the direct runs leave it idle (not sampled)
            from bench_serve import gateway_vs_direct

            spy = record(pid, args.out / "served", args.rate)
            time.sleep(1.0)
            served = gateway_vs_direct(plat, Path(tmp) / "serve", [32], args.served_seconds, 1)["32_clients"]
            stop(spy)
            out["served"] = {k: served[k] for k in ("gateway_share_of_direct_rps", "added_p95_ms")}
            out["served"]["profile"] = summarize(args.out / "served.txt")

        if args.payload_mib:
            spy = record(pid, args.out / "payload", args.rate)
            time.sleep(1.0)
            out["payload"] = payloads(echo, args.payload_mib, 3)
            stop(spy)
            out["payload"]["profile"] = summarize(args.out / "payload.txt")
    out["machine"]["loadavg_at_end"] = list(__import__("os").getloadavg())
    text = json.dumps(out, indent=2)
    (args.out / "profile.json").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
