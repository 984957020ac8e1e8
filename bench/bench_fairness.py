"""One workspace cannot starve another: workspace B's warm-call latency, idle and while workspace A
keeps the machine busy with 20 CPU-bound runs and floods triggers that its open-runs quota refuses.

    python bench/bench_fairness.py [--calls 300] [--hogs 20]

Prints JSON: B's p50/p99 idle and under A's load, their ratio (the goal: p50 ratio <= 2 on 2
cores), and how many of A's flood requests were answered and how fast. Never asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from harness import pct, timed_calls

CODE = """
import time
from opbox import operator

@operator()
def spin(seconds=30.0):
    end = time.time() + seconds
    n = 0
    while time.time() < end:
        n += 1
    return n

@operator()
def echo(x=1):
    return x
"""


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--hogs", type=int, default=20)
    args = parser.parse_args()
    from platform_fixture import running_platform

    env = {"OPBOX_SANDBOX": "auto", "OPBOX_MAX_OPEN_RUNS": str(args.hogs + 5)}
    with tempfile.TemporaryDirectory() as tmp, running_platform(Path(tmp) / "home", extra_env=env) as plat:
        created = subprocess.run([sys.executable, "-m", "opbox.cli", "workspace", "create", "team-b", "--home",
                                  str(plat.home), "--json"], capture_output=True, text=True, check=True)
        a, b = plat.client(), plat.client(token=json.loads(created.stdout)["token"], workspace="team-b")
        code = Path(tmp) / "code"
        code.mkdir()
        (code / "fair_fns.py").write_text(CODE)
        sys.path.insert(0, str(code))
        import fair_fns

        spin, echo = fair_fns.spin.deploy(client=a, quiet=True), fair_fns.echo.deploy(client=b, quiet=True)
        timed_calls(echo, 50)  # warm
        idle = timed_calls(echo, args.calls)

        hogs = [spin.submit(60.0) for _ in range(args.hogs)]
        stop, flood = threading.Event(), {"sent": 0, "refused": 0, "seconds": 0.0}

        def flooder():
            http = a.http
            while not stop.is_set():
                t = time.perf_counter()
                answer = http.post(a.path("/job/spin/trigger"), json={"kwargs": {"seconds": 60.0}})
                flood["seconds"] += time.perf_counter() - t
                flood["sent"] += 1
                flood["refused"] += answer.status_code == 429

        threading.Thread(target=flooder, daemon=True).start()
        time.sleep(3.0)  # the hogs are running, the flood is on
        loaded = timed_calls(echo, args.calls)
        stop.set()
        for run in hogs:
            run.cancel()
        out = {
            "machine": {"cpus": os.cpu_count()},
            "b_idle_ms": {"p50": pct(idle, 0.5), "p99": pct(idle, 0.99)},
            "b_under_a_ms": {"p50": pct(loaded, 0.5), "p99": pct(loaded, 0.99)},
            "p50_ratio": round(statistics.median(loaded) / statistics.median(idle), 2),
            "a_flood": {**flood, "mean_ms": round(flood["seconds"] / max(1, flood["sent"]) * 1000, 3)},
        }
        out["a_flood"].pop("seconds")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
