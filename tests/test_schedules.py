"""Schedules: the firing rules with a stepped clock (catch-up, overlap, daylight saving time, durability), and
end to end against a real gateway (deploy with a schedule, runs it starts, the API and the CLI, 422s)."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from zoneinfo import ZoneInfo

import pytest

from conftest import wait_for
from opbox import Cron, Jobs, Period, ValidationError
from opbox.platform.control.schedules import Schedules
from opbox.platform.records.base import JobRecord, NewRun
from opbox.platform.records.sqlite import open_sqlite
from platform_fixture import running_platform

BERLIN = ZoneInfo("Europe/Berlin")


def berlin(*args) -> float:
    return dt.datetime(*args, tzinfo=BERLIN).timestamp()


def fires(spec: Cron, start: float, count: int) -> list[str]:
    out, when = [], start
    for _ in range(count):
        when = spec.next_after(when)
        out.append(dt.datetime.fromtimestamp(when, BERLIN).strftime("%m-%d %H:%M%z"))
    return out


def test_cron_follows_daylight_saving_time_as_cron_does():
    daily = Cron("30 2 * * *", timezone="Europe/Berlin")
    # spring forward: 02:30 does not exist on March 29; it runs right after the change, once
    assert fires(daily, berlin(2026, 3, 28, 12), 3) == ["03-29 03:00+0200", "03-30 02:30+0200", "03-31 02:30+0200"]
    # fall back: 02:30 happens twice on October 25; a fixed-time job runs once
    assert fires(daily, berlin(2026, 10, 24, 12), 3) == ["10-25 02:30+0200", "10-26 02:30+0100", "10-27 02:30+0100"]
    hourly = Cron("0 * * * *", timezone="Europe/Berlin")  # a wildcard hour runs in each real hour
    assert fires(hourly, berlin(2026, 10, 25, 1, 30), 3) == ["10-25 02:00+0200", "10-25 02:00+0100", "10-25 03:00+0100"]


def test_bad_schedules_fail_when_made():
    for make, match in [(lambda: Cron("61 * * * *"), "invalid cron"), (lambda: Cron("0 2 * *"), "invalid cron"),
                        (lambda: Cron("0 2 * * *", timezone="Mars/Olympus"), "unknown time zone"),
                        (lambda: Cron("0 0 31 2 *"), "never fires"),
                        (lambda: Period(), "at least"), (lambda: Period(seconds=float("nan")), "Period seconds"),
                        (lambda: Period(days=1e300), "Period days"), (lambda: Period(minutes=5, catchup="some"), "catchup"),
                        (lambda: Cron("0 2 * * *", overlap="stack"), "overlap")]:
        with pytest.raises(ValidationError, match=match):
            make()


@dataclass
class FakeRun:
    id: str
    status: str = "queued"


class FakeRuns:
    """What Schedules asks of Runs: create a run, find it; the test ends runs by setting their status."""

    def __init__(self):
        self.made: list[FakeRun] = []

    def create(self, version, payload, trigger, schedule_id=None, write=None):
        assert trigger == "schedule" and schedule_id
        run_id = f"r-{len(self.made):021x}"
        if write is not None and not write(NewRun(run_id, "default", JOB.id, 1, trigger, 0.0, 0, None, None, None,
                                                  schedule_id), payload):
            return None  # Runs.create: the records declined (the schedule changed since it was read)
        self.made.append(FakeRun(run_id))
        return run_id

    def find(self, run_id):
        return next((r for r in self.made if r.id == run_id), None)

    def end_all(self):
        for run in self.made:
            run.status = "succeeded"


class FakeDeploys:
    def resolve(self, workspace, ref):
        return None, f"{ref}@latest"


JOB = JobRecord("j-1", "default", "nightly", "function", 0.0, 1)


@pytest.fixture(params=["sqlite", "postgres"])
def stepped(tmp_path, request):
    """Schedules over real records (a state file, or a PostgreSQL database), with a clock the test moves."""
    now = [1_000_000.0]
    if request.param == "sqlite":
        records = open_sqlite(tmp_path / "state.db")
    else:
        from opbox.platform.records.postgres import open_postgres

        records = open_postgres(request.getfixturevalue("pg_server").database())
    runs = FakeRuns()

    def make():
        return Schedules(records, runs, FakeDeploys(), clock=lambda: now[0])

    yield make, now, runs, records
    records.close()


def test_a_fire_happens_once_when_a_leader_fires_what_another_fired_after_reading_it(stepped):
    """A leader reads a due schedule and stalls (or dies) before it fires; the next leader fires it. The first one's
    fire, from what it read, starts nothing: the run is written with the fire, only if the schedule is unchanged."""
    make, now, runs, records = stepped
    stale, leader = make(), make()
    row = leader.set("default", JOB, Period(minutes=15))
    now[0] += 900
    seen = records.schedules.get("default", JOB.id)
    leader.tick(now[0])
    assert len(runs.made) == 1
    stale._fire(seen, 1, seen.next_fire_at + 900, now[0])
    assert len(runs.made) == 1 and records.runs.get(f"r-{1:021x}") is None
    after = records.schedules.get("default", JOB.id)
    assert (after.last_run_id, after.next_fire_at) == (runs.made[0].id, row.next_fire_at + 900)
    assert records.runs.get(runs.made[0].id).schedule_id == row.id


def test_a_period_fires_on_time_and_its_next_fire_is_durable(stepped):
    make, now, runs, records = stepped
    schedules = make()
    row = schedules.set("default", JOB, Period(minutes=15))
    assert row.next_fire_at == now[0] + 900
    assert schedules.tick(now[0] + 899) == row.next_fire_at and runs.made == []
    now[0] += 900
    schedules.tick(now[0])
    assert len(runs.made) == 1
    after = records.schedules.get("default", JOB.id)
    assert after.last_run_id == runs.made[0].id and after.next_fire_at == row.next_fire_at + 900
    runs.end_all()
    again = make()  # a restarted gateway reads the next fire time from the state file
    assert again.get("default", JOB).next_fire_at == after.next_fire_at


@pytest.mark.parametrize("catchup, expected", [("last", 1), ("none", 0), ("all", 10)])
def test_fires_missed_while_down_follow_catchup(stepped, catchup, expected):
    make, now, runs, records = stepped
    make().set("default", JOB, Period(minutes=1, catchup=catchup, overlap="allow"))
    now[0] += 10 * 60 + 30  # ten fires passed while the platform was down
    make().tick(now[0], starting=True)
    assert len(runs.made) == expected
    assert records.schedules.get("default", JOB.id).next_fire_at == 1_000_000.0 + 11 * 60


def test_catchup_all_is_bounded(stepped):
    make, now, runs, _ = stepped
    from opbox.schedules import MAX_CATCHUP

    make().set("default", JOB, Period(seconds=1, catchup="all", overlap="allow"))
    now[0] += 100_000
    make().tick(now[0], starting=True)
    assert len(runs.made) == MAX_CATCHUP


def test_overlap_skip_drops_a_fire_while_the_previous_run_is_open(stepped):
    make, now, runs, records = stepped
    schedules = make()
    schedules.set("default", JOB, Period(minutes=1, overlap="skip"))
    now[0] += 60
    schedules.tick(now[0])
    now[0] += 60
    schedules.tick(now[0])  # r0 still queued: skipped
    assert len(runs.made) == 1 and not records.schedules.get("default", JOB.id).pending
    runs.end_all()
    now[0] += 60
    schedules.tick(now[0])
    assert len(runs.made) == 2


def test_overlap_queue_runs_once_the_previous_run_ends(stepped):
    make, now, runs, records = stepped
    schedules = make()
    schedules.set("default", JOB, Period(minutes=1, overlap="queue"))
    now[0] += 60
    schedules.tick(now[0])
    now[0] += 60
    wake = schedules.tick(now[0])
    assert len(runs.made) == 1 and records.schedules.get("default", JOB.id).pending
    assert wake <= now[0] + 1  # it looks again soon for the previous run's end
    runs.end_all()
    now[0] += 1
    schedules.tick(now[0])
    assert len(runs.made) == 2 and not records.schedules.get("default", JOB.id).pending


def test_overlap_allow_runs_alongside(stepped):
    make, now, runs, _ = stepped
    schedules = make()
    schedules.set("default", JOB, Period(minutes=1, overlap="allow"))
    for _ in range(3):
        now[0] += 60
        schedules.tick(now[0])
    assert len(runs.made) == 3 and all(r.status == "queued" for r in runs.made)


def test_a_paused_schedule_does_not_fire_and_resumes_from_now(stepped):
    make, now, runs, _ = stepped
    schedules = make()
    schedules.set("default", JOB, Period(minutes=1))
    assert schedules.pause("default", JOB, True).paused
    now[0] += 600
    schedules.tick(now[0], starting=True)
    assert runs.made == []
    resumed = schedules.pause("default", JOB, False)
    assert not resumed.paused and now[0] < resumed.next_fire_at <= now[0] + 60
    schedules.tick(now[0])
    assert runs.made == []  # fires while paused are not caught up


# -- end to end ------------------------------------------------------------------------
CODE = """
from opbox import Period, operator

@operator(schedule=Period(seconds=1))
def heartbeat(note="tick"):
    print(note, flush=True)
    return note

@operator()
def later():
    return "later"
"""



@pytest.fixture(scope="module")
def plat(tmp_path_factory, state_env):
    """This module runs on SQLite and on PostgreSQL (conftest.state_env)."""
    with running_platform(tmp_path_factory.mktemp("home"), extra_env=state_env) as running:
        yield running


@pytest.fixture(scope="module")
def deployed(plat, client, tmp_path_factory):
    from conftest import user_module

    with user_module(tmp_path_factory.mktemp("sched_proj"), "schedmod", CODE) as mod:
        yield {"heartbeat": mod.heartbeat.deploy(client=client, quiet=True),
               "later": mod.later.deploy(client=client, quiet=True)}


def test_a_deployed_schedule_makes_the_platform_start_runs(deployed, client):
    fn = deployed["heartbeat"]
    schedule = next(s for s in client.get("/schedules").json()["schedules"] if s["job"] == "heartbeat")
    assert schedule["schedule"]["every"] == 1.0 and not schedule["paused"]
    run = wait_for(lambda: next((r for r in fn.runs() if r["trigger"] == "schedule" and r["status"] == "succeeded"),
                                None))
    assert run["schedule_id"] == schedule["id"]
    assert client.get(f"/runs/{run['id']}/result").json()["result"] == "tick"
    client.post("/job/heartbeat/schedule/pause")
    paused = client.get("/job/heartbeat/schedule").json()
    assert paused["paused"] and paused["next_fire_at"] is None
    client.request("DELETE", "/job/heartbeat/schedule")
    assert "heartbeat" not in [s["job"] for s in client.get("/schedules").json()["schedules"]]


def test_jobs_schedule_sets_a_cron_in_a_time_zone(deployed, client):
    row = Jobs("later", client).schedule(Cron("0 2 * * *", timezone="Europe/Berlin", catchup="none"))
    assert row["schedule"] == {"cron": "0 2 * * *", "timezone": "Europe/Berlin", "catchup": "none", "overlap": "skip"}
    fire = dt.datetime.fromtimestamp(row["next_fire_at"], BERLIN)
    assert (fire.hour, fire.minute) == (2, 0) and row["next_fire_at"] > time.time()
    assert Jobs("later", client).schedule(None) is None
    assert client.http.get(client.path("/job/later/schedule")).status_code == 404


@pytest.mark.parametrize("body, match", [({"cron": "61 * * * *"}, "invalid cron"),
                                         ({"cron": "0 2 * * *", "timezone": "Mars/Olympus"}, "unknown time zone"),
                                         ({"every": 0.1}, "at least"), ({"cron": "0 2 * * *", "every": 5}, "schedule"),
                                         ({"every": 60, "overlap": "stack"}, "overlap")])
def test_invalid_schedules_answer_422_with_the_reason(deployed, client, body, match):
    resp = client.http.put(client.path("/job/later/schedule"), json=body)
    assert resp.status_code == 422 and match in resp.json()["message"]


def test_a_deploy_with_an_invalid_schedule_is_refused_before_building(client):
    body = {"name": "nightly", "entry": "main:nightly", "code_sha256": "0" * 64, "python": "3.11",
            "schedule": {"cron": "0 25 * * *", "timezone": "UTC"}}  # as an old or foreign client could send it
    resp = client.http.post(client.path("/jobs"), json=body)
    assert resp.status_code == 422 and "invalid cron expression '0 25 * * *'" in resp.json()["message"]
    assert "nightly" not in [j["name"] for j in client.get("/jobs").json()["jobs"]]


def test_the_cli_sets_lists_pauses_resumes_and_deletes(plat, deployed):
    env = {**os.environ, "OPBOX_URL": plat.url, "OPBOX_TOKEN": plat.token, "OPBOX_WORKSPACE": plat.workspace}

    def cli(*args, check=True):
        out = subprocess.run([sys.executable, "-m", "opbox.cli", *args], env=env, capture_output=True, text=True,
                             timeout=60)
        if check:
            assert out.returncode == 0, out.stderr
        return out

    assert "next run at" in cli("schedules", "set", "later", "*/5 * * * *", "--timezone", "Europe/Berlin").stdout
    listed = cli("schedules", "list").stdout
    assert "later" in listed and "*/5 * * * * Europe/Berlin" in listed
    assert "paused" in cli("schedules", "pause", "later").stdout
    assert json.loads(cli("schedules", "list", "--json").stdout)[0]["paused"] is True
    assert "resumed" in cli("schedules", "resume", "later").stdout
    bad = cli("schedules", "set", "later", "not a cron", check=False)
    assert bad.returncode == 1 and "invalid cron" in bad.stderr
    cli("schedules", "delete", "later")
    assert "later" not in cli("schedules", "list").stdout


def test_the_readme_schedules_example_runs_as_written(plat, tmp_path):
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("### Schedules", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "reports.py").write_text(code)
    env = {**os.environ, "OPBOX_URL": plat.url, "OPBOX_TOKEN": plat.token, "OPBOX_WORKSPACE": plat.workspace}
    out = subprocess.run([sys.executable, "reports.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    client = plat.client()
    try:
        rows = {s["job"]: s["schedule"] for s in client.get("/schedules").json()["schedules"]}
    finally:
        client.close()
    assert rows["nightly_report"] == {"cron": "0 2 * * *", "timezone": "Europe/Berlin", "catchup": "last",
                                      "overlap": "skip"}
    assert rows["refresh_features"]["every"] == 3600.0
