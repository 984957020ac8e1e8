"""The SQLite WAL under a steady load: its size over time, who checkpoints, and what the callers see.

    python bench/bench_wal.py [--seconds 60] [--clients 50] [--perf]       # a gateway under load
    python bench/bench_wal.py --writer [--seconds 20]                      # the records layer alone

Run with any tree's python and that tree as the working directory (its ``tests`` and ``bench`` are
imported), so two trees can be measured in turns with the same script. The gateway mode starts a platform,
runs ``--clients`` concurrent callers of a trivial function and samples the WAL file's size every 0.5 s;
``--perf`` counts the gateway's ``fdatasync``s per thread (``perf stat``: the event-loop thread against the
checkpointer). The writer mode writes transactions of ~17 pages on one connection, ``--gap-us`` of CPU apart
(a gateway at full tilt spends ~250 µs between its commits) with the checkpointer running, and times each
transaction from ``Database.tx`` to its commit (what the event loop waits for a checkpoint, its own
or the thread's). Prints one JSON line. Never asserted in tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path[:0] = [str(Path.cwd() / "tests"), str(Path.cwd() / "bench")]


def wal_bytes(db: Path) -> int:
    try:
        return os.path.getsize(f"{db}-wal")
    except FileNotFoundError:
        return 0


class Sampler(threading.Thread):
    """The WAL file's size every ``every`` seconds."""

    def __init__(self, db: Path, every: float = 0.5):
        super().__init__(daemon=True)
        self.db, self.every, self.sizes, self.done = db, every, [], threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.every):
            self.sizes.append(wal_bytes(self.db))

    def summary(self) -> dict:
        self.done.set()
        self.join()
        mib = [round(s / 2**20, 1) for s in self.sizes]
        return {"wal_mib_max": max(mib, default=0), "wal_mib_last": mib[-1] if mib else 0,
                "wal_mib_every_5s": mib[::10]}


def perf_fdatasyncs(pid: int):
    """``perf stat`` on ``pid``, per thread; stop it with the returned function to get {thread: count}."""
    proc = subprocess.Popen(["perf", "stat", "-x,", "--per-thread", "-p", str(pid), "-e",
                             "syscalls:sys_enter_fdatasync,syscalls:sys_enter_fsync"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def stop() -> dict:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        counts: dict[str, int] = {}
        for line in err.splitlines():
            fields = line.split(",")
            if len(fields) > 3 and fields[1].strip().isdigit():
                thread = "event loop" if fields[0].rsplit("-", 1)[-1] == str(pid) else fields[0].rsplit("-", 1)[0]
                counts[thread] = counts.get(thread, 0) + int(fields[1])
        return counts
    return stop


async def callers(url: str, headers: list[dict], body: bytes, clients: int, seconds: float) -> dict:
    from harness import _client

    warm: list = []
    until = time.perf_counter() + 1.0
    await asyncio.gather(*(_client(url, headers[i % len(headers)], body, until, warm, []) for i in range(clients)))
    latencies: list[float] = []
    errors: list = []
    started = time.perf_counter()
    until = started + seconds
    await asyncio.gather(*(_client(url, headers[i % len(headers)], body, until, latencies, errors)
                           for i in range(clients)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    at = lambda q: round(latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000, 1)  # noqa: E731
    return {"calls": len(latencies), "calls_per_s": round(len(latencies) / elapsed), "errors": len(errors),
            "p50_ms": at(0.5), "p99_ms": at(0.99), "p999_ms": at(0.999), "max_ms": round(latencies[-1] * 1000, 1)}


def gateway(args) -> dict:
    import bench
    from bench_serve import member_tokens
    from harness import PRODUCT_DEFAULTS, cpu_seconds, timed_calls
    from platform_fixture import running_platform

    from opbox import serialization

    with tempfile.TemporaryDirectory() as tmp:
        code = Path(tmp) / "code"
        code.mkdir()
        (code / "bench_fns.py").write_text(bench.CODE)
        with running_platform(Path(tmp) / "home", extra_env=PRODUCT_DEFAULTS) as plat:
            square, _ = bench.deploy(plat, code, {})
            timed_calls(square, 300)
            url = f"{plat.url}/{plat.workspace}/job/{square.job_id}/runs?wait=60"
            headers = [{"Authorization": f"Bearer {t}", "Content-Type": serialization.CONTENT_TYPE}
                       for t in member_tokens(plat, args.clients)]
            pid = plat.proc.pid
            sampler = Sampler(plat.home / "state.db")
            stop_perf = perf_fdatasyncs(pid) if args.perf else None
            cpu = cpu_seconds(pid)
            sampler.start()
            out = asyncio.run(callers(url, headers, serialization.dump_args((1,), {}), args.clients, args.seconds))
            cpu = cpu_seconds(pid) - cpu  # includes the 1 s warm-up's calls: a slight overestimate
            out.update(sampler.summary())
            out["gateway_cpu_ms_per_call"] = round(cpu / out["calls"] * 1000, 3)
            if stop_perf:
                out["fdatasyncs_by_thread"] = stop_perf()
    return out


def writer(args) -> dict:
    """Transactions of ~17 pages (three rows in four indexes, time-ordered keys as the gateway's, a hot row), ``--gap-us`` of CPU apart."""
    from opbox.platform.records.sqlite.connection import Database

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "state.db"
        database = Database(path)
        db = database.db
        db.execute("CREATE TABLE bench_rows (id TEXT PRIMARY KEY, a TEXT, b TEXT, c TEXT, body BLOB)")
        for column in "abc":
            db.execute(f"CREATE INDEX bench_rows_{column} ON bench_rows ({column})")
        db.execute("CREATE TABLE bench_hot (id INTEGER PRIMARY KEY, n INTEGER)")
        db.execute("INSERT INTO bench_hot VALUES (1, 0)")
        sampler = Sampler(path)
        sampler.start()
        waits: list[float] = []  # each transaction, from asking for it to its commit
        body = os.urandom(600)
        until = time.perf_counter() + args.seconds
        i = 0
        while time.perf_counter() < until:
            t = time.perf_counter()
            with database.tx():
                for _ in range(3):
                    key = f"{time.time_ns():020d}{i:08d}"
                    db.execute("INSERT INTO bench_rows VALUES (?, ?, ?, ?, ?)", (key, key, "x" + key, "y" + key, body))
                    i += 1
                db.execute("UPDATE bench_hot SET n = n + 1 WHERE id = 1")
            waits.append(time.perf_counter() - t)
            spin = time.perf_counter() + args.gap_us / 1e6  # the gateway's other work between commits
            while time.perf_counter() < spin:
                pass
        out = sampler.summary()
        checkpointer = database.checkpointer
        out.update(restarts=getattr(checkpointer, "restarts", None), passes_copying=checkpointer.checkpoints)
        database.close()
    waits.sort()
    at = lambda q: round(waits[min(len(waits) - 1, int(q * len(waits)))] * 1000, 3)  # noqa: E731
    out.update(transactions=len(waits), tx_per_s=round(len(waits) / args.seconds),
               tx_p50_ms=at(0.5), tx_p999_ms=at(0.999), tx_max_ms=round(waits[-1] * 1000, 3),
               tx_over_1ms=sum(w > 0.001 for w in waits), tx_over_1ms_total_ms=round(sum(w for w in waits if w > 0.001) * 1000))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--perf", action="store_true", help="count fdatasyncs per thread with perf stat")
    parser.add_argument("--writer", action="store_true", help="the records layer alone, no gateway")
    parser.add_argument("--gap-us", type=float, default=250, help="writer: CPU spent between commits, µs")
    args = parser.parse_args()
    out = writer(args) if args.writer else gateway(args)
    out.update(tree=str(Path.cwd()), load=round(os.getloadavg()[0], 2), at=time.strftime("%H:%M:%S"))
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
