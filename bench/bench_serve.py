"""Serving figures, printed as JSON (never asserted in tests).

    python bench/bench_serve.py [--seconds 3] [--clients 1,32] [--repeat 3]

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
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

CODE = '''
from opbox import operator


@operator()
class Echo:
    def ping(self, x: int = 0) -> int:
        return x
'''


PRODUCT_DEFAULTS = {"OPBOX_SANDBOX": "auto"}  # measure what `make run` runs (the test fixture turns it off)

def pct(values, q):
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 3)


async def _client(url: str, token: str | None, body: bytes, until: float, latencies: list, errors: list) -> None:
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    request = (f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n{auth}Content-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    while time.perf_counter() < until:
        started = time.perf_counter()
        writer.write(request)
        status = int((await reader.readline()).split()[1])
        length = 0
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b""):
                break
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        await reader.readexactly(length)
        latencies.append(time.perf_counter() - started)
        if status != 200:
            errors.append(status)
    writer.close()


async def _load(url: str, token: str | None, clients: int, seconds: float) -> dict:
    body = b'{"x": 1}'
    warm_until = time.perf_counter() + 0.5
    await asyncio.gather(*(_client(url, token, body, warm_until, [], []) for _ in range(clients)))
    latencies, errors = [], []
    started = time.perf_counter()
    until = started + seconds
    await asyncio.gather(*(_client(url, token, body, until, latencies, errors) for _ in range(clients)))
    elapsed = time.perf_counter() - started
    return {"clients": clients, "requests": len(latencies), "rps": round(len(latencies) / elapsed),
            "p50_ms": pct(latencies, 0.50), "p95_ms": pct(latencies, 0.95), "p99_ms": pct(latencies, 0.99),
            "errors": len(errors)}


def load(url, token, clients, seconds) -> dict:
    try:
        import uvloop

        return uvloop.run(_load(url, token, clients, seconds))
    except ImportError:
        return asyncio.run(_load(url, token, clients, seconds))


def median_run(runs: list[dict]) -> dict:
    return sorted(runs, key=lambda r: r["rps"])[len(runs) // 2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--clients", default="1,32")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure; the median one is reported")
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]

    import httpx

    from platform_fixture import running_platform

    out = {"python": sys.version.split()[0], "cores": os.cpu_count(), "seconds_per_figure": args.seconds}
    with tempfile.TemporaryDirectory() as tmp, running_platform(Path(tmp) / "home", extra_env=PRODUCT_DEFAULTS) as plat:
        folder = Path(tmp) / "proj"
        folder.mkdir()
        (folder / "benchserve.py").write_text(CODE)
        sys.path.insert(0, str(folder))
        import benchserve

        client = plat.client()
        svc = benchserve.Echo.deploy(client=client, quiet=True, concurrency=64, queue=1024, scale_to_zero=None)
        gateway_url = f"{plat.url}/{plat.workspace}/serve/Echo/ping"

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
            for n in clients:
                runs_d, runs_g = [], []
                for _ in range(args.repeat):  # interleaved; the median run of each is kept (shared cores are noisy)
                    runs_d.append(load(direct_base + "/call/ping", None, n, args.seconds))
                    runs_g.append(load(gateway_url, plat.token, n, args.seconds))
                d, g = median_run(runs_d), median_run(runs_g)
                figures[f"{n}_clients"] = {
                    "direct": d, "gateway": g,
                    "gateway_share_of_direct_rps": round(g["rps"] / d["rps"], 3) if d["rps"] else None,
                    "added_p50_ms": round(g["p50_ms"] - d["p50_ms"], 3),
                    "added_p95_ms": round(g["p95_ms"] - d["p95_ms"], 3),
                    "rps_of_each_run": {"direct": [r["rps"] for r in runs_d], "gateway": [r["rps"] for r in runs_g]},
                }
            out["throughput_and_latency"] = figures
        finally:
            direct.terminate()
            direct.wait(10)
        svc.delete()

        cold = benchserve.Echo.deploy(name="cold", client=client, quiet=True, scale_to_zero=0.5)
        cold_url = f"{plat.url}/{plat.workspace}/serve/cold/ping"
        starts = []
        with plat.http() as http:
            for _ in range(3):
                deadline = time.monotonic() + 30
                while cold.info()["status"] != "scaled_to_zero" or cold.info()["instances"]:
                    if time.monotonic() > deadline:
                        raise SystemExit("the service did not scale to zero")
                    time.sleep(0.1)
                started = time.perf_counter()
                resp = http.post(cold_url, json={"x": 1})
                starts.append(time.perf_counter() - started)
                assert resp.status_code == 200, resp.text
        out["cold_start_from_zero_s"] = {"runs": [round(s, 3) for s in starts], "median": round(sorted(starts)[1], 3)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
