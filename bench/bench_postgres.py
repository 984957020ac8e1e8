"""Calls/s and map items/s with the records on SQLite (one gateway) and on PostgreSQL (1, 2 and 3 gateways).

Everything runs on this machine: the gateways, their workers, PostgreSQL (a fresh server from
tests/pg_server.py, on a Unix socket) and the clients share its cores, so more gateways compete for the
same CPUs: the figures say what the records cost, not how far several machines scale.

    .venv/bin/python bench/bench_postgres.py [--calls 1000] [--items 5000] [--clients 8] [--out file.json]

With N gateways the clients and maps are spread over them (client i calls gateway i mod N; one map per
gateway, run at once), as replicas behind a Service would be.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from opbox.client import Client  # noqa: E402
from opbox.config import ClientConfig  # noqa: E402
from opbox.remote import RemoteFunction  # noqa: E402
from pg_server import PostgresServer, find_bin  # noqa: E402
from platform_fixture import Gateway  # noqa: E402

TOKEN = "opbox-bench-postgres-token"
CODE = """
from opbox import operator

@operator()
def square(x=2):
    return x * x
"""


def records_calls(url: str, folder: Path, cycles: int) -> dict:
    """The records alone, in this process: a call's five records calls (create, start, get, finish, result),
    ``cycles`` times, on SQLite and on PostgreSQL (the gateway's event loop makes the same calls)."""
    from opbox.platform.records.base import NewRun
    from opbox.platform.records.postgres import open_postgres
    from opbox.platform.records.sqlite import open_sqlite

    out = {}
    for name, records in (("sqlite", open_sqlite(folder / "records.db")), ("postgres", open_postgres(url))):
        start = time.perf_counter()
        for i in range(cycles):
            run_id = f"r-{i:07d}"
            records.runs.create(NewRun(run_id, "ws", "j", 1, "api", 1.0, 0, None), b"x" * 100)
            records.runs.start(run_id, "w", 2.0)
            run = records.runs.get(run_id)
            records.runs.finish(run, "succeeded", 3.0, None, None, b"y" * 100)
            records.runs.result(run_id)
        elapsed = time.perf_counter() - start
        out[name] = {"call_cycles_per_s": round(cycles / elapsed), "us_per_records_call": round(elapsed / cycles / 5 * 1e6)}
        records.close()
    return out


def measure(gateways: list[Gateway], fns: list, calls: int, items: int, clients: int) -> dict:
    fns[0](3)  # warm
    start = time.perf_counter()
    for i in range(calls):
        fns[0](i)
    sequential = calls / (time.perf_counter() - start)
    per_client = max(1, calls // clients)

    def caller(i):
        fn = fns[i % len(fns)]
        for x in range(per_client):
            fn(x)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    concurrent = clients * per_client / (time.perf_counter() - start)
    each = max(1, items // len(fns))
    results: list = [None] * len(fns)

    def mapper(i):
        results[i] = fns[i].map(range(each), progress=False)

    threads = [threading.Thread(target=mapper, args=(i,)) for i in range(len(fns))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    mapped = each * len(fns) / (time.perf_counter() - start)
    assert all(r == [x * x for x in range(each)] for r in results)
    return {"gateways": len(gateways), "calls_per_s": round(sequential, 1),
            f"calls_per_s_{clients}_clients": round(concurrent, 1), "map_items_per_s": round(mapped, 1)}


def run(label: str, env: dict, count: int, args, folder: Path) -> dict:
    home = folder / f"home-{label}"
    home.mkdir()
    env = {**os.environ, **env, "OPBOX_HOME": str(home), "OPBOX_SANDBOX": "off", "OPBOX_TOKEN": TOKEN,
           "OPBOX_WORKSPACE": "default", "PYTHONUNBUFFERED": "1"}
    env.pop("OPBOX_URL", None)
    gateways = []
    try:
        for i in range(count):
            gateways.append(Gateway(home, f"{label}-{i}", env, TOKEN))
        clients = [Client(ClientConfig(g.url, TOKEN, "default")) for g in gateways]
        (folder / "proj").mkdir(exist_ok=True)
        (folder / "proj" / "benchpg.py").write_text(CODE)
        sys.path.insert(0, str(folder / "proj"))
        sys.modules.pop("benchpg", None)
        import benchpg

        first = benchpg.square.deploy(client=clients[0], quiet=True)
        fns = [first] + [RemoteFunction(first.job_id, first.name, first.version, c) for c in clients[1:]]
        out = {"records": label.split("-")[0], **measure(gateways, fns, args.calls, args.items, args.clients)}
        for c in clients:
            c.close()
        return out
    finally:
        for g in gateways:
            g.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--items", type=int, default=5000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--gateways", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--cycles", type=int, default=2000, help="records-only call cycles (in process)")
    parser.add_argument("--records-only", action="store_true", help="only the in-process records figures")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    server = PostgresServer(find_bin()).start()
    figures, records = [], {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            records = records_calls(server.database(), folder, args.cycles)
            print(json.dumps({"records_in_process": records}), flush=True)
            if args.records_only:
                args.gateways = []
            else:
                figures.append(run("sqlite", {}, 1, args, folder))
                print(json.dumps(figures[-1]), flush=True)
            for count in args.gateways:
                figures.append(run(f"postgres-{count}", {"OPBOX_DATABASE_URL": server.database()}, count, args, folder))
                print(json.dumps(figures[-1]), flush=True)
    finally:
        server.stop()
    result = {"cpus": os.cpu_count(), "load_average": os.getloadavg(), "records_in_process": records,
              "calls": args.calls, "items": args.items, "figures": figures,
              "caveat": "gateways, workers, PostgreSQL and clients share this machine's cores"}
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
