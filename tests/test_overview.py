"""The dashboard's overview counts: settled hours are counted once and kept (``run_hours``), the rest live,
and what is kept always equals a count of the runs as they are now, through every way runs change; on SQLite and
on PostgreSQL."""

from __future__ import annotations

import secrets
import sqlite3
import time
from pathlib import Path

import pytest

from opbox.platform.control.views import Views
from opbox.platform.core import open_records
from opbox.platform.records.base import NewRun, NewVersion

HOUR = 3600


def run_id_at(when: float) -> str:
    return f"r-{int(when * 1000):011x}{secrets.token_hex(5)}"


class Database:
    """The records' own database, read and changed behind their back: the SQLite file or the PostgreSQL database."""

    def __init__(self, state: Path | None, url: str | None):
        self.state, self.url = state, url

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        if self.url is None:
            db = sqlite3.connect(self.state)
            try:
                rows = db.execute(sql, params).fetchall()
                db.commit()
                return rows
            finally:
                db.close()
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            cur = conn.execute(sql.replace("?", "%s"), params)
            return cur.fetchall() if cur.description else []


@pytest.fixture(params=["sqlite", "postgres"])
def world(tmp_path, request):
    url = request.getfixturevalue("pg_server").database() if request.param == "postgres" else None
    records = open_records(tmp_path, url)
    now = (time.time() // HOUR) * HOUR + 1800.0  # the middle of the current hour
    jobs = []
    for name in ("etl", "train"):
        job, version = records.jobs.add_version("ws", name, "function", NewVersion(
            "m:f", "ws/code.zip", "0" * 64, "3.11", "3.1", {}, now - 30 * HOUR))
        records.jobs.version_ready(job.id, version, {}, "", "built", now - 30 * HOUR)
        jobs.append(job.id)
    yield records, Views(records), now, jobs, Database(tmp_path / "state.db", url)
    records.close()


def add_run(records, job: str, when: float, status: str | None, run_id: str | None = None) -> str:
    run_id = run_id or run_id_at(when)
    records.runs.create(NewRun(run_id, "ws", job, 1, "call", when, 0, None), b"args")
    if status is not None:
        records.runs.finish(records.runs.get(run_id), status, when + 1, None, None, b"result")
    return run_id


def truth(state: Database, now: float, hours: int = 24) -> tuple[dict, dict]:
    """The overview's per-hour status counts and per-job totals, counted from the runs table in full."""
    start = (int(now) // HOUR - hours + 1) * HOUR
    per_hour: dict[int, dict[str, int]] = {start + HOUR * h: {} for h in range(hours)}
    per_job: dict[str, list[int]] = {}
    for run_id, job, status in state.query("SELECT id, job_id, status FROM runs WHERE workspace = 'ws'"):
        hour = int(run_id[2:13], 16) // 3_600_000 * HOUR
        if hour in per_hour:
            per_hour[hour][status] = per_hour[hour].get(status, 0) + 1
            counts = per_job.setdefault(job, [0, 0])
            counts[0] += 1
            counts[1] += status in ("failed", "timed_out")
    return per_hour, per_job


def check(views: Views, state, now: float) -> dict:
    got = views.overview("ws", now=now)
    per_hour, per_job = truth(state, now)
    assert {h["start"]: h["counts"] for h in got["hours"]} == per_hour
    assert {j["job_id"]: [j["runs"], j["failed"]] for j in got["busiest_jobs"]} == per_job
    totals: dict[str, int] = {}
    for counts in per_hour.values():
        for status, n in counts.items():
            totals[status] = totals.get(status, 0) + n
    assert got["totals"] == totals
    return got


def kept_hours(state: Database) -> set[int]:
    return {h for (h,) in state.query("SELECT hour FROM run_hours WHERE workspace = 'ws' AND job_id = ''")}


def test_settled_hours_are_kept_and_the_open_hour_counted_live(world):
    records, views, now, (etl, train), state = world
    for h in range(1, 30):
        add_run(records, etl, now - h * HOUR, "succeeded")
        add_run(records, train, now - h * HOUR + 60, "failed" if h % 5 == 0 else "succeeded")
    add_run(records, etl, now - 60, "succeeded")  # the open hour
    check(views, state, now)
    this_hour = int(now) // HOUR * HOUR
    assert kept_hours(state) == {this_hour - h * HOUR for h in range(1, 24)}  # every closed hour of the window
    add_run(records, etl, now + 10, "succeeded")  # the open hour moves on: counted live
    check(views, state, now + 20)
    # what is kept is what the overview shows: a change made behind its back to a kept hour shows (proof it is read)
    state.query("UPDATE run_hours SET n = n + 100 WHERE workspace = 'ws' AND hour = ? AND job_id = ?",
                (this_hour - 2 * HOUR, etl))
    shown = views.overview("ws", now=now + 20)
    assert {h["start"]: h["counts"] for h in shown["hours"]}[this_hour - 2 * HOUR] == {"succeeded": 2 + 100}


def test_an_hour_with_a_run_still_open_is_not_kept_until_it_ends(world):
    records, views, now, (etl, _), state = world
    add_run(records, etl, now - 5 * HOUR, "succeeded")
    stuck = add_run(records, etl, now - 3 * HOUR, None)  # queued for hours
    add_run(records, etl, now - 2 * HOUR, "succeeded")
    check(views, state, now)
    this_hour = int(now) // HOUR * HOUR
    assert max(kept_hours(state)) == this_hour - 4 * HOUR  # from the open run's hour on: counted live
    assert records.runs.start(stuck, "w1", now)
    check(views, state, now)
    records.runs.finish(records.runs.get(stuck), "timed_out", now, "timed out", None, b"r")
    got = check(views, state, now)
    assert got["totals"] == {"succeeded": 2, "timed_out": 1}
    assert this_hour - 3 * HOUR in kept_hours(state)


def test_a_map_still_taking_items_keeps_its_hours_live(world):
    records, views, now, (etl, _), state = world
    created = now - 4 * HOUR
    batch = f"b-{int(created * 1000):011x}{secrets.token_hex(5)}"
    records.batches.create(batch, "ws", etl, 1, None, created)
    add_run(records, etl, now - 6 * HOUR, "succeeded")
    check(views, state, now)
    assert max(kept_hours(state)) == int(now) // HOUR * HOUR - 5 * HOUR  # the map's hour on: live
    # its items arrive now, with ids of its creation time, run and end between two reads of the overview
    items = [NewRun(f"r-{batch[2:]}.{i}", "ws", etl, 1, "map", now, 0, None, batch, i) for i in range(3)]
    records.batches.add_items(batch, items, [b"a"] * 3)
    for item in items:
        records.runs.finish(records.runs.get(item.id), "succeeded", now, None, None, b"r")
    check(views, state, now)
    records.batches.seal(batch, 3)
    got = check(views, state, now)
    assert got["totals"] == {"succeeded": 4}
    assert int(now) // HOUR * HOUR - 4 * HOUR in kept_hours(state)


def test_deleting_runs_drops_their_kept_hours(world):
    records, views, now, (etl, train), state = world
    for h in range(1, 6):
        add_run(records, etl, now - h * HOUR, "succeeded")
        add_run(records, train, now - h * HOUR, "failed")
    check(views, state, now)
    records.jobs.delete(train)  # a job deleted: its runs go, and their counts with them
    got = check(views, state, now)
    assert got["totals"] == {"succeeded": 5} and [j["job_id"] for j in got["busiest_jobs"]] == [etl]
    dropped = records.runs.delete_finished(2.5 / 24, now, 100)  # retention: runs finished over 2.5 hours ago
    assert dropped.runs == 3
    got = check(views, state, now)
    assert got["totals"] == {"succeeded": 2}
