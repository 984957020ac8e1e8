"""The peers' figures on this machine, in the shapes of bench/bench.py, for ratios measured in one run:
Ray core (local, ``num_cpus`` = cores) and Dask distributed (a LocalCluster of processes, one per core,
one thread each), each doing a warm call of a trivial function (``f.remote(i)`` / ``submit(f, i)``,
waited for one at a time: p50, p99) and a fan-out of N trivial tasks (tasks/s).

They live in their own virtualenv, never in opbox's dependencies (``make bench-peers`` makes it):

    .bench-peers/bin/python bench/peers.py [--calls 2000] [--map 10000] [--only ray,dask]

Prints one JSON object: {"ray": {...}, "dask": {...}}; a peer that cannot run says why under "error".
bench/bench.py runs this as a subprocess and prints opbox's figures as ratios to these.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback


def pct(values, q):
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 3)


def square(x):
    return x * x


def timed(call, n: int) -> dict:
    for i in range(50):
        call(i)
    times = []
    for i in range(n):
        t = time.perf_counter()
        call(i)
        times.append(time.perf_counter() - t)
    return {"p50": pct(times, 0.5), "p99": pct(times, 0.99), "mean": round(sum(times) / n * 1000, 3), "n": n}


def fan_out(run, n: int) -> dict:
    t = time.perf_counter()
    out = run(n)
    took = time.perf_counter() - t
    assert out == [x * x for x in range(n)]
    return {"items": n, "seconds": round(took, 3), "tasks_per_s": round(n / took, 1)}


def ray_figures(calls: int, items: int) -> dict:
    import ray

    cores = os.cpu_count()
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        remote_square = ray.remote(square)
        return {"version": ray.__version__, "num_cpus": cores,
                "warm_call_ms": timed(lambda i: ray.get(remote_square.remote(i)), calls),
                "map": fan_out(lambda n: ray.get([remote_square.remote(i) for i in range(n)]), items)}
    finally:
        ray.shutdown()


def dask_figures(calls: int, items: int) -> dict:
    import dask
    from dask.distributed import Client, LocalCluster

    cores = os.cpu_count()
    with LocalCluster(n_workers=cores, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=40) as cluster, Client(cluster) as client:
        client.submit(square, 0, pure=False).result()
        return {"version": dask.__version__, "workers": cores,
                "warm_call_ms": timed(lambda i: client.submit(square, i, pure=False).result(), calls),
                "map": fan_out(lambda n: client.gather(client.map(square, range(n), pure=False)), items)}


PEERS = {"ray": ray_figures, "dask": dask_figures}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--map", type=int, default=10000)
    parser.add_argument("--only", default=",".join(PEERS))
    args = parser.parse_args()
    out = {"python": sys.version.split()[0]}
    for name in args.only.split(","):
        try:
            out[name] = PEERS[name](args.calls, args.map)
        except Exception as exc:  # one peer failing still reports the other
            out[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=3)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
