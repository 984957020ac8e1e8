"""The runs API and the dashboard at 1,000,000 stored runs: query plans and times, printed as JSON.

    python bench/bench_views.py [--runs 1000000] [--repeat 20]

Fills a fresh OPBOX_HOME's state file with ``--runs`` finished runs (20 jobs, 30 days, a few maps,
2% failed, some queued and running), then starts a real gateway on it and measures, per request,
the median and worst wall time seen by a client on loopback (an upper bound of the server's time):
every runs API filter, a deep page, the maps listing, and each dashboard page (the overview's first
read after the start apart: it counts the day's settled hours, which later reads take as kept). Also
prints the plan SQLite chooses for each filter. Figures are never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from opbox.platform.core import open_records  # noqa: E402
from opbox.platform.records.base import NewVersion  # noqa: E402

DAY = 86400.0
JOBS = 20
STATUSES = ["succeeded"] * 97 + ["failed"] * 2 + ["cancelled"]


def fill(home: Path, count: int, now: float) -> dict:
    """``count`` runs of workspace "default", spread over 30 days; returns ids the timings need."""
    records = open_records(home)
    jobs = []
    for j in range(JOBS):
        job, version = records.jobs.add_version("default", f"job{j}", "function", NewVersion(
            "m:f", f"default/code/{j}.zip", "0" * 64, "3.11", "3.1", {}, now - 31 * DAY))
        records.jobs.version_ready(job.id, version, {}, "", "built", now - 31 * DAY)
        jobs.append(job.id)
    records.close()
    db = sqlite3.connect(home / "state.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=OFF")
    rng = random.Random(7)
    batches = []
    step = 30 * DAY / count
    db.execute("BEGIN")
    rows = []
    for i in range(count):
        at = now - 30 * DAY + i * step
        ms = f"{int(at * 1000):011x}"
        job = jobs[rng.randrange(JOBS) if rng.random() < 0.7 else 0]  # job0 is the busiest
        if i % 50_000 == 0:  # a map of 2,000 items now and then
            batch = f"b-{ms}{secrets.token_hex(5)}"
            batches.append(batch)
            db.execute("INSERT INTO batches(id, workspace, job_id, version, total, submitted, done, created_at) "
                       "VALUES (?, 'default', ?, 1, 2000, 2000, 2000, ?)", (batch, job, at))
        if batches and i % 50_000 < 2000:
            run_id, trigger, batch_id, index = f"r-{batches[-1][2:]}.{i % 50_000}", "map", batches[-1], i % 50_000
        else:
            run_id, trigger, batch_id, index = f"r-{ms}{secrets.token_hex(5)}", rng.choice(("call", "call", "trigger")), None, None
        status = rng.choice(STATUSES) if i < count - 20 else rng.choice(("queued", "running"))
        rows.append((run_id, "default", job, 1, status, trigger, at, at + 0.01, at + 0.5, batch_id, index))
        if len(rows) == 50_000:
            db.executemany("INSERT INTO runs(id, workspace, job_id, version, status, trigger, created_at, started_at, "
                           "finished_at, batch_id, batch_index) VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows)
            rows = []
    if rows:
        db.executemany("INSERT INTO runs(id, workspace, job_id, version, status, trigger, created_at, started_at, "
                       "finished_at, batch_id, batch_index) VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows)
    db.execute("COMMIT")
    last = db.execute("SELECT id FROM runs ORDER BY id DESC LIMIT 1").fetchone()[0]
    db.close()
    return {"jobs": jobs, "batches": batches, "last_run": last}


def plans(home: Path, made: dict) -> dict:
    """The plan SQLite picks for each runs filter, as the records adapter asks it."""
    from opbox.platform.records.sqlite.runs import SELECT
    db = sqlite3.connect(home / "state.db")
    out = {}
    queries = {
        "all": ("", ()),
        "job": (" AND job_id = ?", (made["jobs"][3],)),
        "status": (" AND status = ?", ("failed",)),
        "trigger": (" AND trigger = ?", ("trigger",)),
        "batch": (" AND batch_id = ?", (made["batches"][5],)),
        "job+status": (" AND job_id = ? AND status = ?", (made["jobs"][3], "failed")),
    }
    for name, (extra, params) in queries.items():
        narrow = "+" if "job_id" in extra or "batch_id" in extra else ""  # as SqliteRuns.search writes it
        sql = f"EXPLAIN QUERY PLAN {SELECT} WHERE {narrow}workspace = ?{extra} AND id < ? ORDER BY id DESC LIMIT 51"
        out[name] = "; ".join(r[3] for r in db.execute(sql, ("default", *params, "\uffff")))
    db.close()
    return out


def timed(http, url: str, repeat: int) -> dict:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        resp = http.get(url)
        times.append(time.perf_counter() - t)
        assert resp.status_code == 200, (url, resp.status_code, resp.text[:300])
    return {"median_ms": round(statistics.median(times) * 1000, 1), "max_ms": round(max(times) * 1000, 1)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()

    from platform_fixture import running_platform  # tests/platform_fixture.py

    out = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}, "runs": args.runs}
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        home.mkdir()
        now = time.time()
        t = time.perf_counter()
        made = fill(home, args.runs, now)
        out["fill_s"] = round(time.perf_counter() - t, 1)
        out["plans"] = plans(home, made)
        with running_platform(home) as plat, plat.http() as http:
            job, batch = made["jobs"][3], made["batches"][5]
            deep = http.get("/default/runs", params={"until": now - 15 * DAY, "limit": 1}).json()["runs"][0]["id"]
            api = {
                "runs": "/default/runs",
                "runs?job": f"/default/runs?job={job}",
                "runs?status=failed": "/default/runs?status=failed",
                "runs?trigger=trigger": "/default/runs?trigger=trigger",
                "runs?batch": f"/default/runs?batch={batch}",
                "runs?job&status=failed": f"/default/runs?job={job}&status=failed",
                "runs?since&until (a day, 15 days ago)": f"/default/runs?since={now - 16 * DAY}&until={now - 15 * DAY}",
                "runs?cursor (15 days deep)": f"/default/runs?cursor={deep}",
                "runs?limit=1000": "/default/runs?limit=1000",
                "batches": "/default/batches",
            }
            out["api"] = {name: timed(http, url, args.repeat) for name, url in api.items()}
            out["pages"] = dashboard_pages(plat, made)(args.repeat)
    print(json.dumps(out, indent=2))


def dashboard_pages(plat, made):
    """Each dashboard page, timed with a logged-in session: the client's wall time and the server's own
    (its Server-Timing "app" figure)."""
    import re

    import httpx

    browser = httpx.Client(base_url=plat.url, timeout=60)
    form = browser.get("/_ui/login").text
    csrf = re.search(r'name="csrf" value="([^"]+)"', form).group(1)
    assert browser.post("/_ui/login", data={"token": plat.token, "csrf": csrf}).status_code == 303
    job, batch, run = made["jobs"][3], made["batches"][5], made["last_run"]
    pages = {
        "overview": "/_ui/", "jobs": "/_ui/jobs", "job": f"/_ui/jobs/{job}", "runs": "/_ui/runs",
        "runs?status=failed": "/_ui/runs?status=failed", "runs?job": f"/_ui/runs?job={job}",
        "runs?batch": f"/_ui/runs?batch={batch}", "run": f"/_ui/runs/{run}", "run log": f"/_ui/runs/{run}/log",
        "maps": "/_ui/maps", "map": f"/_ui/maps/{batch}", "services": "/_ui/services", "tokens": "/_ui/tokens",
    }

    def measure(repeat: int) -> dict:
        # the overview's first read counts the window's settled hours (then kept): timed apart from the rest
        t = time.perf_counter()
        resp = browser.get("/_ui/")
        first = {"server_ms": float(re.search(r"app;dur=([\d.]+)", resp.headers["server-timing"]).group(1)),
                 "wall_ms": round((time.perf_counter() - t) * 1000, 1)}
        out = {"overview (first read after start)": first}
        for name, url in pages.items():
            wall, server = [], []
            for _ in range(repeat):
                t = time.perf_counter()
                resp = browser.get(url)
                wall.append(time.perf_counter() - t)
                assert resp.status_code in (200, 286), (url, resp.status_code, resp.text[:300])  # 286: a log fragment's end
                server.append(float(re.search(r"app;dur=([\d.]+)", resp.headers["server-timing"]).group(1)))
            out[name] = {"server_median_ms": round(statistics.median(server), 1), "server_max_ms": round(max(server), 1),
                         "wall_median_ms": round(statistics.median(wall) * 1000, 1)}
        return out
    return measure


if __name__ == "__main__":
    main()
