"""Several gateways on one PostgreSQL: any of them answers, one leads (fires schedules, runs retention),
the lead moves when the leader dies, and a run that ends on one gateway wakes the long-polls of another.

The gateways share one OPBOX_HOME (the object store, the built environments, the platform's secret), as
replicas share a bucket and a volume or image registry on a cluster; each has its own log.
"""

from __future__ import annotations

import os
import re
import signal
import struct
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import user_module, wait_for
from platform_fixture import Gateway
from tcp_proxy import Failover

TOKEN = "opbox-gateways-test-token"
CODE = """
import os
import time
from pathlib import Path

from opbox import Period, operator

@operator(schedule=Period(seconds=2, overlap="allow"))
def beat():
    return os.getppid()

@operator(secrets=["hf"])
def read_secret():
    return os.environ["HF_TOKEN"]

@operator()
def square(i):
    time.sleep(0.002)
    return i * i

@operator()
def slow_square(i):
    time.sleep(0.4)
    return i * i

@operator()
def leak_token(path, marker):
    Path(path).write_text(os.environ["OPBOX_TOKEN"])  # its caller token (jobs calling jobs)
    while not Path(marker).exists():
        time.sleep(0.05)
    return "done"

@operator()
def start_child_then_fail(other_gateway, child_marker):
    from opbox import Operator
    from opbox.client import Client
    from opbox.config import ClientConfig

    elsewhere = Client(ClientConfig(other_gateway, os.environ["OPBOX_TOKEN"], os.environ["OPBOX_WORKSPACE"]))
    child = Operator.from_job("hold", client=elsewhere).submit(child_marker)  # stored (and run) on the other gateway
    while child.status()["status"] != "running":
        time.sleep(0.05)
    raise RuntimeError(f"failing with child {child.id} running")

@operator()
class Greeter:
    def __init__(self, greeting):
        self.greeting = greeting

    def hi(self, name):
        return f"{self.greeting}, {name}"

@operator()
def hold(marker):
    while not Path(marker).exists():
        time.sleep(0.05)
    return "released"
"""


@pytest.fixture
def database_url(pg_server) -> str:
    return pg_server.database()


@pytest.fixture
def gateways(tmp_path, database_url, request):
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "OPBOX_HOME": str(home), "OPBOX_DATABASE_URL": database_url, "OPBOX_SANDBOX": "off",
           "OPBOX_TOKEN": TOKEN, "OPBOX_WORKSPACE": "default", "PYTHONUNBUFFERED": "1",
           **getattr(request, "param", {})}
    env.pop("OPBOX_URL", None)
    started = [Gateway(home, "a", env, TOKEN)]
    started.append(Gateway(home, "b", env, TOKEN))
    yield home, started
    for gateway in started:
        gateway.stop()


def _client(home: Path, gateway: Gateway):
    from opbox.client import Client
    from opbox.config import ClientConfig

    return Client(ClientConfig(gateway.url, TOKEN, "default"))


def _schedule_runs(gateway: Gateway) -> list[dict]:
    runs = gateway.http.get("/runs", params={"trigger": "schedule", "limit": 500}).json()["runs"]
    return sorted(runs, key=lambda r: r["created_at"])


def test_the_lead_moves_when_the_leader_dies_and_no_fire_is_doubled(gateways, tmp_path):
    home, (a, b) = gateways
    assert a.leads() and not b.leads(), "the first gateway leads; the second follows"
    client = _client(home, b)
    (tmp_path / "proj").mkdir()
    with user_module(tmp_path / "proj", "gwmod", CODE) as mod:
        mod.beat.deploy(client=client, quiet=True)  # deployed through the follower: the leader fires it
    fired_by_a = wait_for(lambda: [r for r in _schedule_runs(b) if r["status"] == "succeeded"][:2])
    assert {b.http.get(f"/runs/{r['id']}/result").json()["result"] for r in fired_by_a} == {a.proc.pid}, \
        "the leader's own workers ran its fires"
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait(10)
    killed_at = time.time()
    wait_for(b.leads, timeout=30)
    after = wait_for(lambda: [r for r in _schedule_runs(b) if r["created_at"] > killed_at
                              and r["status"] == "succeeded"][:2], timeout=60)
    assert {b.http.get(f"/runs/{r['id']}/result").json()["result"] for r in after} == {b.proc.pid}
    # a gateway's runs run on its own workers: a ran nothing after its death; a fire a had open when it died was
    # taken over by b. No fire was lost (every run ends) or doubled (fires are the period apart, never closer).
    runs = wait_for(lambda: (r := _schedule_runs(b)) and all(x["status"] == "succeeded" for x in r) and r, timeout=60)
    ran_by = {"a": [], "b": []}
    for run in runs:
        pid = b.http.get(f"/runs/{run['id']}/result").json()["result"]
        ran_by["a" if pid == a.proc.pid else "b"].append(run["created_at"])
    assert max(ran_by["a"]) < killed_at and ran_by["b"], ran_by
    created = [r["created_at"] for r in runs]
    assert all(later - earlier > 1.0 for earlier, later in zip(created, created[1:])), created
    client.close()


def test_a_long_poll_on_one_gateway_answers_when_the_run_ends_on_another(gateways, tmp_path):
    home, (a, b) = gateways
    marker = tmp_path / "release"
    client = _client(home, a)
    (tmp_path / "proj").mkdir()
    with user_module(tmp_path / "proj", "gwmod2", CODE) as mod:
        fn = mod.hold.deploy(client=client, quiet=True)
        handle = fn.submit(str(marker))
        wait_for(lambda: handle.status()["status"] == "running")
        answer = {}

        def poll():
            started = time.monotonic()
            answer["body"] = a.http.get(f"/runs/{handle.id}/result", params={"wait": 120}).json()
            answer["waited"] = time.monotonic() - started

        thread = threading.Thread(target=poll)
        thread.start()
        time.sleep(0.5)  # the long-poll is parked on a
        cancelled = b.http.post(f"/runs/{handle.id}/cancel").json()  # the run ends on gateway b
        assert cancelled["status"] == "cancelled"
        thread.join(130)
        # b's cancel reached a, whose worker ran it: the worker stopped the run (the marker never came)
        assert wait_for(lambda: all(p["busy"] == 0 for p in a.http.get("/status").json()["pools"]), timeout=30)
        marker.write_text("go")
    assert answer["body"]["status"] == "cancelled"
    # woken by b's notice, not by the end of its 120 s wait
    assert answer["waited"] < 60, answer
    client.close()


def test_a_secret_changed_on_one_gateway_is_used_by_the_next_run_on_another(gateways, tmp_path):
    home, (a, b) = gateways
    client = _client(home, a)
    assert b.http.request("PUT", "/secrets/hf", json={"values": {"HF_TOKEN": "first"}}).status_code == 200
    (tmp_path / "proj").mkdir()
    with user_module(tmp_path / "proj", "gwmod3", CODE) as mod:
        fn = mod.read_secret.deploy(client=client, quiet=True)
        assert fn() == "first"  # gateway a resolved the version with its secrets, and keeps it
        assert b.http.request("PUT", "/secrets/hf", json={"values": {"HF_TOKEN": "second"}}).status_code == 200
        assert wait_for(lambda: fn() == "second", timeout=30), "gateway a resolves the version again"
    client.close()


def _address(gateway: Gateway) -> tuple[str, int]:
    host, port = gateway.url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def _gateway_id(gateway: Gateway) -> str:
    return re.search(r"gateway (g[0-9a-f]+) leads", gateway.log()).group(1)


def test_the_leader_killed_mid_map_leaves_every_item_done_once_and_the_map_finishes_on_the_other(
        gateways, database_url, tmp_path):
    """10,000 items sent through a front that picks the first live gateway (a Service would spread them: this
    puts the whole map on the leader), the leader SIGKILLed a fifth of the way: the other gateway takes its queued
    and running items over and the map ends with each item's result once, in order, no run lost or doubled."""
    import psycopg

    from opbox.client import Client
    from opbox.config import ClientConfig

    items = 10_000
    home, (a, b) = gateways
    front = Failover([_address(a), _address(b)])
    front.up()
    client = Client(ClientConfig(front.url, TOKEN, "default"))
    (tmp_path / "proj").mkdir()
    with user_module(tmp_path / "proj", "gwmod4", CODE) as mod, psycopg.connect(database_url, autocommit=True) as db:
        fn = mod.square.deploy(client=client, quiet=True)
        out: dict = {}

        def run_map():
            try:
                out["results"] = fn.map(range(items))
            except BaseException as exc:  # noqa: BLE001 - asserted below
                out["error"] = exc

        thread = threading.Thread(target=run_map)
        thread.start()
        wait_for(lambda: (db.execute("SELECT max(done) FROM batches").fetchone()[0] or 0) >= items // 5, timeout=120)
        gateway_a = _gateway_id(a)
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait(10)
        killed_at = time.time()
        thread.join(300)
        assert not thread.is_alive() and "error" not in out, out.get("error")
        assert out["results"] == [i * i for i in range(items)]

        (batch_id, total, submitted, done), = db.execute("SELECT id, total, submitted, done FROM batches").fetchall()
        assert total == submitted == done == items
        rows = db.execute("SELECT batch_index, status, done_seq, worker, finished_at FROM runs WHERE batch_id = %s",
                          (batch_id,)).fetchall()
        assert len(rows) == items and sorted(r[0] for r in rows) == list(range(items)), "every item is one run"
        assert {r[1] for r in rows} == {"succeeded"}
        assert sorted(r[2] for r in rows) == list(range(1, items + 1)), "each run ended once"
        gateway_b = _gateway_id(b)
        ran_on = {g: [r for r in rows if r[3].startswith(g + "/")] for g in (gateway_a, gateway_b)}
        assert len(ran_on[gateway_a]) + len(ran_on[gateway_b]) == items
        assert ran_on[gateway_a] and max(r[4] for r in ran_on[gateway_a]) < killed_at + 1
        assert len(ran_on[gateway_b]) >= items // 2, "the map finished on the other gateway"
        assert re.search(r"took over \d+ open runs of gateways that stopped", b.log()), b.log()[-3000:]
    assert front.served[_address(b)] > 0 and front.served[_address(a)] > 0
    front.down()
    client.close()


def _frames(values: range) -> bytes:
    from opbox.serialization import dump_args

    return b"".join(struct.pack(">I", len(p)) + p for p in (dump_args((i,), {}) for i in values))


def test_a_maps_concurrency_holds_when_two_gateways_dispatch_its_items(gateways, database_url, tmp_path):
    """A map with concurrency=2 whose items were stored half through one gateway and half through the other (a
    Service spreading its requests): each gateway dispatches its own, and the records' count of the map's running
    items keeps them at 2 at once in all, not 2 per gateway."""
    import psycopg

    home, (a, b) = gateways
    client = _client(home, a)
    (tmp_path / "proj").mkdir()
    with user_module(tmp_path / "proj", "gwmod5", CODE) as mod, psycopg.connect(database_url, autocommit=True) as db:
        fn = mod.slow_square.deploy(client=client, quiet=True)
        batch = a.http.post(f"/job/{fn.job_id}/batches", json={"concurrency": 2}).json()["batch_id"]
        octets = {"Content-Type": "application/octet-stream"}
        assert a.http.post(f"/batches/{batch}/items", params={"start": 0}, content=_frames(range(0, 6)),
                           headers=octets).status_code == 200
        assert b.http.post(f"/batches/{batch}/items", params={"start": 6}, content=_frames(range(6, 12)),
                           headers=octets).status_code == 200
        assert a.http.post(f"/batches/{batch}/seal", json={"total": 12}).status_code == 200
        wait_for(lambda: b.http.get(f"/batches/{batch}").json()["done"] == 12, timeout=120)
        rows = db.execute("SELECT batch_index, status, started_at, finished_at, worker FROM runs WHERE batch_id = %s",
                          (batch,)).fetchall()
    assert sorted(r[0] for r in rows) == list(range(12)) and {r[1] for r in rows} == {"succeeded"}
    assert len({r[4].split("/")[0] for r in rows}) == 2, "each gateway ran the items it stored"
    # the most items running at once (each 0.4 s long), from the records' start and end times; an end and the
    # start it made room for may be recorded a moment out of order (two gateways' clocks read before their
    # statements), so each interval is taken from 0.1 s after its start
    edges = sorted([(r[2] + 0.1, 1) for r in rows] + [(r[3], -1) for r in rows], key=lambda e: (e[0], e[1]))
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    assert peak == 2, edges
    client.close()


@pytest.mark.parametrize("gateways", [{"OPBOX_MAX_OPEN_RUNS": "3"}], indirect=True)
def test_the_open_runs_quota_counts_the_runs_of_every_gateway(gateways, tmp_path):
    from opbox.serialization import dump_args

    home, (a, b) = gateways
    client = _client(home, a)
    marker = tmp_path / "release"
    (tmp_path / "proj").mkdir()
    with user_module(tmp_path / "proj", "gwmod6", CODE) as mod:
        fn = mod.hold.deploy(client=client, quiet=True)
        args = {"content": dump_args((str(marker),), {}), "headers": {"Content-Type": "application/x-opbox-envelope"}}
        assert [a.http.post(f"/job/{fn.job_id}/runs", **args).status_code for _ in range(2)] == [202, 202]
        time.sleep(2.5)  # each gateway counts the others' open runs every second
        answers = [b.http.post(f"/job/{fn.job_id}/runs", **args) for _ in range(2)]
        assert [r.status_code for r in answers] == [202, 429], [r.text for r in answers]
        assert "may have at most 3" in answers[1].json()["message"]
        marker.write_text("go")
    client.close()


def test_a_token_revoked_on_one_gateway_stops_working_on_the_other(gateways):
    home, (a, b) = gateways
    made = a.http.post("/tokens", json={"name": "temp", "role": "member"}).json()
    with httpx.Client(base_url=f"{b.url}/default", headers={"Authorization": f"Bearer {made['token']}"}) as other:
        assert other.get("/jobs").status_code == 200  # b knows it now (and keeps it cached)
        assert a.http.delete(f"/tokens/{made['id']}").status_code == 200
        assert wait_for(lambda: other.get("/jobs").status_code == 401, timeout=10)


@pytest.mark.parametrize("gateways", [{"OPBOX_ISOLATION": "run"}], indirect=True)  # a one-shot run's token
def test_a_runs_caller_token_ends_on_every_gateway_when_the_run_ends(gateways, tmp_path):
    home, (a, b) = gateways
    client = _client(home, a)
    leaked, marker = tmp_path / "token", tmp_path / "release"
    (tmp_path / "proj").mkdir()
    with user_module(tmp_path / "proj", "gwmod7", CODE) as mod:
        fn = mod.leak_token.deploy(client=client, quiet=True)
        run = fn.submit(str(leaked), str(marker))  # runs on a
        token = wait_for(lambda: leaked.exists() and leaked.read_text())
        with httpx.Client(base_url=f"{b.url}/default", headers={"Authorization": f"Bearer {token}"}) as caller:
            assert caller.get(f"/runs/{run.id}").status_code == 200, "valid on b while its run runs on a"
            marker.write_text("go")
            assert run.result(timeout=60) == "done"
            assert wait_for(lambda: caller.get(f"/runs/{run.id}").status_code == 401, timeout=10)
    client.close()


@pytest.mark.parametrize("gateways", [{"OPBOX_ISOLATION": "run"}], indirect=True)  # a one-shot run's token
def test_a_child_started_through_another_gateway_is_cancelled_when_its_parent_fails(gateways, tmp_path):
    home, (a, b) = gateways
    client = _client(home, a)
    (tmp_path / "proj").mkdir()
    with user_module(tmp_path / "proj", "gwmod8", CODE) as mod:
        mod.hold.deploy(client=client, quiet=True)
        parent = mod.start_child_then_fail.deploy(client=client, quiet=True)
        run = parent.submit(b.url, str(tmp_path / "never"))  # the parent runs on a, its child on b
        with pytest.raises(Exception, match="failing with child"):
            run.result(timeout=60)
        children = wait_for(lambda: b.http.get("/runs", params={"parent": run.id}).json()["runs"])
        (child,) = children
        done = wait_for(lambda: (c := b.http.get(f"/runs/{child['id']}").json())["status"] != "running" and c,
                        timeout=30)
        assert done["status"] == "cancelled" and f"parent run {run.id} failed" in done["exit_reason"], done
    client.close()


def test_a_service_deployed_on_one_gateway_is_served_by_the_other_and_follows_its_changes(gateways, tmp_path):
    home, (a, b) = gateways
    client = _client(home, a)

    def hi_through_b():
        return b.http.post("/serve/Greeter/hi", json={"name": "b"})

    (tmp_path / "proj").mkdir()
    with user_module(tmp_path / "proj", "gwmod9", CODE) as mod:
        mod.Greeter.deploy("hello", client=client, quiet=True)  # on a
        answer = hi_through_b()  # b has no replica yet: it starts one from the record
        assert answer.status_code == 200 and answer.json() == "hello, b", answer.text
        mod.Greeter.deploy("bonjour", client=client, quiet=True)  # deployed again on a: b's replicas follow
        assert wait_for(lambda: hi_through_b().json() == "bonjour, b", timeout=60)
        assert a.http.delete("/services/Greeter").status_code in (200, 204)
        assert wait_for(lambda: hi_through_b().status_code == 404, timeout=30)
    client.close()
