"""Warm calls alone: p50/p99 and CPU per call of the gateway, its workers and this client (from /proc),
for one deployed trivial function called one call after another. `--trees A B ...` measures several
source trees (e.g. `git archive main` unpacked) alternately, each on a fresh platform, in one sitting:
what survives a loaded machine is the CPU per call, not the wall time. Each tree needs its own
virtualenv (``TREE/.venv``, e.g. ``uv venv && uv pip install -e '.[platform]'``).

    python bench/bench_call.py [--calls 3000] [--rounds 1] [--trees DIR ...] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import PRODUCT_DEFAULTS, cpu_seconds, machine, pct, timed_calls, tree_cpu_seconds

HERE = Path(__file__).resolve().parent
CODE = """from opbox import operator


@operator()
def square(x=2):
    return x * x
"""


def measure(calls: int) -> dict:
    """In this process: a fresh platform (this interpreter's ``opbox``), ``calls`` warm calls measured."""
    from platform_fixture import running_platform  # tests/platform_fixture.py

    with tempfile.TemporaryDirectory() as tmp:
        code = Path(tmp) / "code"
        code.mkdir()
        (code / "bench_call_fns.py").write_text(CODE)
        sys.path.insert(0, str(code))
        import bench_call_fns

        with running_platform(Path(tmp) / "home", extra_env=PRODUCT_DEFAULTS) as plat:
            square = bench_call_fns.square.deploy(client=plat.client(), quiet=True)
            timed_calls(square, 200)
            pid = plat.proc.pid
            gw, workers, client, t = cpu_seconds(pid), tree_cpu_seconds(pid), time.process_time(), time.perf_counter()
            times = timed_calls(square, calls)
            took = time.perf_counter() - t
            per_call = lambda before, after: round((after - before) / calls * 1000, 4)  # noqa: E731
            return {"calls": calls, "p50_ms": pct(times, 0.5), "p99_ms": pct(times, 0.99),
                    "wall_ms_per_call": round(took / calls * 1000, 4),
                    "gateway_cpu_ms_per_call": per_call(gw, cpu_seconds(pid)),
                    "workers_cpu_ms_per_call": per_call(workers, tree_cpu_seconds(pid)),
                    "client_cpu_ms_per_call": per_call(client, time.process_time()),
                    "loadavg": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=1, help="with --trees: how many times each, alternating")
    parser.add_argument("--trees", nargs="*", type=Path, help="source trees to measure alternately (PYTHONPATH)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not args.trees:
        out = {"machine": machine(), "warm_calls": measure(args.calls)}
    else:
        out = {"machine": machine(), "runs": []}
        for round_ in range(args.rounds):
            for tree in args.trees:
                # each tree with its own virtualenv (its workers import opbox from there), from the tree itself
                python = tree / ".venv" / "bin" / "python"
                done = subprocess.run([str(python), str(HERE / "bench_call.py"), "--calls", str(args.calls)],
                                      cwd=tree, capture_output=True, text=True, check=True)
                figures = json.loads(done.stdout)["warm_calls"]
                out["runs"].append({"tree": str(tree), "round": round_, **figures})
                print(json.dumps(out["runs"][-1]), file=sys.stderr)
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
