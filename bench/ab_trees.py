"""Two source trees' gateways measured in turns, in one sitting: the gateway's CPU per warm call and 50
concurrent callers, each tree's platform up the whole time, the order alternating round by round, so that
the machine's other load falls on both alike. Each tree runs with its own virtualenv (``TREE/.venv``).

    python bench/ab_trees.py BEFORE_TREE AFTER_TREE [--rounds 6] [--calls 2000] [--seconds 4]

Prints one JSON line per measurement, then the medians per tree. Never asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

# run inside each tree (its own python), cwd = the tree: a platform, then one measurement per stdin line
SERVE = """
import json, sys, tempfile
from pathlib import Path
sys.path[:0] = ["tests", "bench"]
from harness import PRODUCT_DEFAULTS, cpu_seconds, timed_calls
from platform_fixture import running_platform
import bench
with tempfile.TemporaryDirectory() as tmp:
    code = Path(tmp) / "code"
    code.mkdir()
    (code / "bench_fns.py").write_text(bench.CODE)
    with running_platform(Path(tmp) / "home", extra_env=PRODUCT_DEFAULTS) as plat:
        square, _ = bench.deploy(plat, code, {})
        timed_calls(square, 300)
        print("ready", flush=True)
        for line in sys.stdin:
            kind, arg = line.split()
            if kind == "calls":
                r = bench.gateway_cpu(plat, square, int(arg))
                out = {"kind": "calls", "gateway_ms_per_call": r["gateway_ms_per_call"], "wall_ms": r["wall_ms_per_call"]}
            else:
                before = cpu_seconds(plat.proc.pid)
                c = bench.concurrent_callers(plat, square, 50, float(arg))
                used = cpu_seconds(plat.proc.pid) - before
                out = {"kind": "callers", "calls_per_s": c["calls_per_s"], "p99_ms": c["p99_ms"], "errors": c["errors"],
                       "gateway_ms_per_call": round(used / max(1, c["calls"]) * 1000, 3)}
            print(json.dumps(out), flush=True)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("trees", nargs=2, type=Path)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    names = [str(t) for t in args.trees]
    procs = {name: subprocess.Popen([str(Path(name) / ".venv" / "bin" / "python"), "-c", SERVE], cwd=name,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for name in names}
    results: dict[str, dict[str, list]] = {name: {"calls": [], "callers": []} for name in names}
    try:
        for proc in procs.values():
            while (line := proc.stdout.readline()) and line.strip() != "ready":
                pass
        for r in range(args.rounds):
            for command in (f"calls {args.calls}", f"callers {args.seconds}"):
                for name in (names if r % 2 == 0 else names[::-1]):
                    procs[name].stdin.write(command + "\n")
                    procs[name].stdin.flush()
                    out = json.loads(procs[name].stdout.readline())
                    out.update(tree=name, load=round(os.getloadavg()[0], 2))
                    print(json.dumps(out), flush=True)
                    results[name][out["kind"]].append(out)
    finally:
        for proc in procs.values():
            proc.stdin.close()
            proc.wait(timeout=120)
    median = lambda rows, key: statistics.median(r[key] for r in rows) if rows else None  # noqa: E731
    for name, rows in results.items():
        print(json.dumps({"tree": name, "median": {
            "gateway_ms_per_warm_call": median(rows["calls"], "gateway_ms_per_call"),
            "callers_per_s": median(rows["callers"], "calls_per_s"),
            "callers_gateway_ms_per_call": median(rows["callers"], "gateway_ms_per_call"),
            "callers_p99_ms": median(rows["callers"], "p99_ms")}}), file=sys.stderr)


if __name__ == "__main__":
    main()
