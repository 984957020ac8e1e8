"""Several gateways on one PostgreSQL: any of them answers, one leads (fires schedules, runs retention),
the lead moves when the leader dies, and a run that ends on one gateway wakes the long-polls of another.

The gateways share one OPBOX_HOME (the object store, the built environments, the platform's secret), as
replicas share a bucket and a volume or image registry on a cluster; each has its own log.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from conftest import user_module, wait_for
from platform_fixture import Gateway

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
def hold(marker):
    while not Path(marker).exists():
        time.sleep(0.05)
    return "released"
"""


@pytest.fixture
def gateways(tmp_path, pg_server):
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "OPBOX_HOME": str(home), "OPBOX_DATABASE_URL": pg_server.database(), "OPBOX_SANDBOX": "off",
           "OPBOX_TOKEN": TOKEN, "OPBOX_WORKSPACE": "default", "PYTHONUNBUFFERED": "1"}
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
    # a gateway's runs run on its own workers: while a led, b fired nothing, and a fired nothing after its death
    fired_by = {"a": [], "b": []}
    for run in _schedule_runs(b):
        if run["status"] == "succeeded":
            pid = b.http.get(f"/runs/{run['id']}/result").json()["result"]
            fired_by["a" if pid == a.proc.pid else "b"].append(run["created_at"])
    assert max(fired_by["a"]) < killed_at < min(fired_by["b"]), fired_by
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
