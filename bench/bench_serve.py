"""Serving figures, printed as JSON (never asserted in tests).

    python bench/bench_serve.py [--seconds 3] [--clients 1,32] [--repeat 3] [--cold-starts 3]

Starts a fresh platform and deploys a class with a trivial method, then measures with a
small asyncio HTTP/1.1 keep-alive load generator (JSON calls, as curl makes them):
  - requests/s, p50/p95/p99 latency at 1 and 32 concurrent clients, through the gateway
    (auth, routing, proxy) and against the same class served directly by its uvicorn
    replica (``python -m opbox.runtime serve``): the gateway's cost is the difference;
  - cold start: the time from the first request to a service scaled to zero until its answer.
Client, gateway and replica share this machine's cores, so absolute figures are a floor.
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

from harness import PRODUCT_DEFAULTS, cpu_seconds, descendants, free_port, load, machine

CODE = '''
from opbox import operator


@operator()
class Echo:
    def ping(self, x: int = 0) -> int:
        return x
'''
BODY = b'{"x": 1}'


def median_run(runs: list[dict]) -> dict:
    return sorted(runs, key=lambda r: r["rps"])[len(runs) // 2]


def replica_pids(gateway_pid: int) -> list[int]:
    """The gateway's descendants that serve a class (the replicas, and a sandbox's wrapper around each)."""
    pids = []
    for pid in descendants(gateway_pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"opbox.runtime" in argv and b"serve" in argv:
            pids.append(pid)
    return pids


def cpu_of(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += cpu_seconds(pid)
        except OSError:
            pass
    return total


def measured(pids: dict[str, list[int]], run) -> dict:
    """``run()``'s figures with each process group's CPU per answered call, in microseconds: a figure
    that other work on the machine moves far less than throughput does."""
    before, client = {k: cpu_of(v) for k, v in pids.items()}, time.process_time()
    figures = run()
    calls = figures["requests"] + figures["warm_requests"] or 1  # the CPU was read around both
    figures["cpu_us_per_call"] = {k: round((cpu_of(v) - before[k]) / calls * 1e6, 1) for k, v in pids.items()}
    figures["cpu_us_per_call"]["load_generator"] = round((time.process_time() - client) / calls * 1e6, 1)
    return figures


def member_tokens(plat, count: int) -> list[str]:
    """``count`` new tokens of the platform's workspace: one per client, so that the per-token rate limit
    (OPBOX_RATE_LIMIT, 1,000/s by default) measures nothing here."""
    with plat.http() as http:
        return [http.post(f"/{plat.workspace}/tokens", json={"name": f"bench-{i}", "role": "member"}).json()["token"]
                for i in range(count)]


def gateway_vs_direct(plat, folder: Path, clients: list[int], seconds: float, repeat: int) -> dict:
    """The class behind the gateway (a token per client) and served directly by its uvicorn replica, ``repeat``
    interleaved runs per client count; the median run of each is kept (shared cores are noisy)."""
    import httpx

    folder.mkdir(exist_ok=True)
    (folder / "benchserve.py").write_text(CODE)
    sys.path.insert(0, str(folder))
    import benchserve

    client = plat.client()
    svc = benchserve.Echo.deploy(client=client, quiet=True, concurrency=64, queue=1024, scale_to_zero=None)
    gateway_url = f"{plat.url}/{plat.workspace}/serve/Echo/ping"
    json_headers = {"Content-Type": "application/json"}
    per_client = [{**json_headers, "Authorization": f"Bearer {t}"} for t in member_tokens(plat, max(clients))]
    port = free_port()
    env = {**os.environ, "OPBOX_ENTRY": "benchserve:Echo", "OPBOX_CODE_DIR": str(folder),
           "OPBOX_CONCURRENCY": "64", "OPBOX_QUEUE": "1024"}
    direct = subprocess.Popen([sys.executable, "-m", "opbox.runtime", "serve", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, cwd=folder, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        direct_base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(direct_base + "/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        figures = {}
        gateway_pids = {"gateway": [plat.proc.pid], "replica": replica_pids(plat.proc.pid)}
        for n in clients:
            runs_d, runs_g = [], []
            for _ in range(repeat):
                runs_d.append(measured({"replica": [direct.pid]},
                                       lambda: load(direct_base + "/call/ping", json_headers, BODY, n, seconds)))
                runs_g.append(measured(gateway_pids, lambda: load(gateway_url, per_client, BODY, n, seconds)))
            d, g = median_run(runs_d), median_run(runs_g)
            figures[f"{n}_clients"] = {
                "direct": d, "gateway": g,
                "gateway_share_of_direct_rps": round(g["rps"] / d["rps"], 3) if d["rps"] else None,
                "added_p50_ms": round(g["p50_ms"] - d["p50_ms"], 3),
                "added_p95_ms": round(g["p95_ms"] - d["p95_ms"], 3),
                "rps_of_each_run": {"direct": [r["rps"] for r in runs_d], "gateway": [r["rps"] for r in runs_g]},
                "gateway_cpu_us_per_call_of_each_run": [r["cpu_us_per_call"]["gateway"] for r in runs_g],
            }
    finally:
        direct.terminate()
        direct.wait(10)
    svc.delete()
    return figures


def cold_starts(plat, tries: int = 3) -> dict:
    """The time from a request to a service scaled to zero until its answer (benchserve is deployed)."""
    import benchserve

    cold = benchserve.Echo.deploy(name="cold", client=plat.client(), quiet=True, scale_to_zero=0.5)
    cold_url = f"{plat.url}/{plat.workspace}/serve/cold/ping"
    starts = []
    with plat.http() as http:
        for _ in range(tries):
            deadline = time.monotonic() + 30
            while cold.info()["status"] != "scaled_to_zero" or cold.info()["instances"]:
                if time.monotonic() > deadline:
                    raise SystemExit("the service did not scale to zero")
                time.sleep(0.1)
            started = time.perf_counter()
            resp = http.post(cold_url, json={"x": 1})
            starts.append(time.perf_counter() - started)
            assert resp.status_code == 200, resp.text
    return {"runs": [round(s, 3) for s in starts], "median": round(sorted(starts)[len(starts) // 2], 3)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--clients", default="1,32")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure; the median one is reported")
    parser.add_argument("--cold-starts", type=int, default=3, help="scale-from-zero starts to time (0: none)")
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]

    from platform_fixture import running_platform

    out = {"machine": machine(), "seconds_per_figure": args.seconds}
    with tempfile.TemporaryDirectory() as tmp, running_platform(Path(tmp) / "home", extra_env=PRODUCT_DEFAULTS) as plat:
        out["throughput_and_latency"] = gateway_vs_direct(plat, Path(tmp) / "proj", clients, args.seconds, args.repeat)
        if args.cold_starts:
            out["cold_start_from_zero_s"] = cold_starts(plat, args.cold_starts)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
