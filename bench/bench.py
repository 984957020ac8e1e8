"""Hot-path figures of the embedded platform, printed as JSON (never asserted in tests).

    python bench/bench.py [--calls 2000] [--map 10000]

Starts a fresh platform (its own OPBOX_HOME, a free port) and measures:
  - warm round trip of a trivial deployed call (p50, p99, ms),
  - .map over N trivial items (runs/s),
  - deploy-to-first-result with cached requirements (s),
  - ProcessPoolExecutor.submit().result() on the same machine, the cross-process floor.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))


PRODUCT_DEFAULTS = {"OPBOX_SANDBOX": "auto"}  # measure what `make run` runs (the test fixture turns it off)

def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1000


def _square(x):
    return x * x


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--map", type=int, default=10000)
    args = parser.parse_args()

    from platform_fixture import running_platform  # tests/platform_fixture.py

    out = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}}
    with ProcessPoolExecutor(1) as pool:
        pool.submit(_square, 1).result()
        times = []
        for i in range(args.calls):
            t = time.perf_counter()
            pool.submit(_square, i).result()
            times.append(time.perf_counter() - t)
    out["process_pool_floor_ms"] = {"p50": round(pct(times, 0.5), 3), "p99": round(pct(times, 0.99), 3)}

    with tempfile.TemporaryDirectory() as tmp, running_platform(Path(tmp) / "home", extra_env=PRODUCT_DEFAULTS) as plat:
        code = Path(tmp) / "code"
        code.mkdir()
        (code / "bench_fn.py").write_text("from opbox import operator\n\n@operator()\ndef square(x=2):\n    return x * x\n")
        sys.path.insert(0, str(code))
        import bench_fn

        client = plat.client()
        t = time.perf_counter()
        remote = bench_fn.square.deploy(client=client, quiet=True)
        remote(3)
        out["first_deploy_to_first_result_s"] = round(time.perf_counter() - t, 3)
        (code / "bench_fn.py").write_text((code / "bench_fn.py").read_text() + "\n# changed\n")
        t = time.perf_counter()
        remote = bench_fn.square.deploy(client=client, quiet=True)
        remote(3)
        out["redeploy_cached_requirements_to_first_result_s"] = round(time.perf_counter() - t, 3)

        for i in range(50):
            remote(i)
        times = []
        for i in range(args.calls):
            t = time.perf_counter()
            remote(i)
            times.append(time.perf_counter() - t)
        out["warm_call_ms"] = {"p50": round(pct(times, 0.5), 3), "p99": round(pct(times, 0.99), 3),
                               "mean": round(statistics.mean(times) * 1000, 3), "n": args.calls}

        items = list(range(args.map))
        t = time.perf_counter()
        result = remote.map(items, progress=False)
        took = time.perf_counter() - t
        assert result == [x * x for x in items]
        out["map"] = {"items": args.map, "seconds": round(took, 3), "runs_per_s": round(args.map / took, 1)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
