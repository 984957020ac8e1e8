"""Ray's figures on this machine, in the shapes of bench/bench.py (a warm call, a 10,000-task fan-out),
for ratios measured in one sitting. Ray lives in its own virtualenv, never in opbox's:

    uv venv /tmp/raybench && VIRTUAL_ENV=/tmp/raybench uv pip install "ray==2.*"
    /tmp/raybench/bin/python bench/bench_ray.py
"""

from __future__ import annotations

import json
import time

import ray


def pct(v, q):
    v = sorted(v)
    return round(v[min(len(v) - 1, int(q * len(v)))] * 1000, 3)

ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)

@ray.remote
def square(x):
    return x * x

for i in range(50):
    ray.get(square.remote(i))
times = []
for i in range(2000):
    t = time.perf_counter()
    ray.get(square.remote(i))
    times.append(time.perf_counter() - t)
t = time.perf_counter()
out = ray.get([square.remote(i) for i in range(10000)])
took = time.perf_counter() - t
print(json.dumps({"ray": ray.__version__, "warm_call_ms": {"p50": pct(times, 0.5), "p99": pct(times, 0.99)},
                  "map": {"items": 10000, "runs_per_s": round(10000 / took, 1)}}))
