"""SIGTERM stops the gateway within its grace even with a log follower, a map result stream and a
long-poll open: long-polls answer, streams end saying why (the SDK's map reconnects and finishes after
the restart), and a run that completes within the grace hands its result in and never runs again."""

from __future__ import annotations

import signal
import threading
import time

import httpx

from conftest import user_module
from platform_fixture import start, stop

CODE = """
import os, time
from opbox import operator

@operator()
def nap(seconds, tally=None, tag=""):
    if tally:
        with open(os.path.join(tally, tag or "untagged"), "a") as f:
            f.write("ran\\n")
    time.sleep(seconds)
    return tag or seconds
"""

GRACE = 5.0


def test_sigterm_with_streams_long_polls_and_a_map_in_flight(tmp_path):
    home = tmp_path / "home"
    tally = tmp_path / "tally"
    tally.mkdir()
    plat = start(home, extra_env={"OPBOX_SHUTDOWN_GRACE": str(GRACE)})
    port = int(plat.url.rsplit(":", 1)[1])
    client = plat.client()
    try:
        (tmp_path / "proj").mkdir()
        with user_module(tmp_path / "proj", "shutmod", CODE) as mod:
            nap = mod.nap.deploy(client=client, quiet=True)
            quick = nap.submit(2.0, str(tally), "quick")  # finishes inside the grace
            slow = nap.submit(120.0)  # does not
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not (quick.status()["status"] == slow.status()["status"] == "running"):
                time.sleep(0.05)

            answers: dict = {}
            http = httpx.Client(base_url=plat.url, headers={"Authorization": f"Bearer {plat.token}"}, timeout=400)

            def long_poll():
                answers["poll"] = http.get(f"/{plat.workspace}/runs/{slow.id}/result", params={"wait": 300})

            def follow():
                with http.stream("GET", f"/{plat.workspace}/runs/{slow.id}/logs", params={"follow": 1}) as resp:
                    answers["log"] = b"".join(resp.iter_bytes())

            def mapping():
                answers["map"] = nap.map([0.5] * 8, kwargs={"tally": str(tally)}, concurrency=1, progress=False)

            threads = [threading.Thread(target=t, daemon=True) for t in (long_poll, follow, mapping)]
            for t in threads:
                t.start()
            time.sleep(1.0)  # all three are waiting on the gateway now

            stopped_at = time.monotonic()
            plat.proc.send_signal(signal.SIGTERM)
            plat.proc.wait(GRACE + 10)
            took = time.monotonic() - stopped_at
            assert took < GRACE + 5, f"the gateway took {took:.1f} s to stop"
            threads[0].join(5)
            threads[1].join(5)
            assert answers["poll"].status_code == 202  # answered with the run as it is, not held open
            assert b"the platform is shutting down" in answers["log"]
            assert threads[2].is_alive()  # the map waits for a gateway to reconnect to

            (home / "gateway.log").rename(home / "gateway.first.log")
            plat = start(home, port=port, extra_env={"OPBOX_SHUTDOWN_GRACE": str(GRACE)})
            threads[2].join(120)
            assert answers.get("map") == [0.5] * 8  # every item once, in order, after the restart
            assert quick.result(timeout=30) == "quick"
            assert quick.status()["attempt"] == 0
            assert (tally / "quick").read_text() == "ran\n"  # handed in during the grace: never ran again
            http.close()
    finally:
        client.close()
        stop(plat)


def test_sigterm_while_a_worker_holds_a_group_hands_back_the_runs_it_has_not_started(tmp_path):
    """A map handed out in groups (one worker): on SIGTERM the worker finishes its run in hand and starts no
    other of its group; those wait, queued, for the restart. Each item runs once (its tag file has one line)."""
    home, tally = tmp_path / "home", tmp_path / "tally"
    tally.mkdir()
    env = {"OPBOX_SHUTDOWN_GRACE": str(GRACE), "OPBOX_MAX_WORKERS": "1"}
    plat = start(home, extra_env=env)
    port = int(plat.url.rsplit(":", 1)[1])
    client = plat.client()
    try:
        (tmp_path / "proj").mkdir()
        with user_module(tmp_path / "proj", "shutgroups", CODE) as mod:
            nap = mod.nap.deploy(client=client, quiet=True)
            assert nap.map([0.0] * 4, progress=False) == [0.0] * 4  # a few runs one at a time: groups from now on
            answers: dict = {}
            tags = [f"item{i}" for i in range(16)]
            mapping = threading.Thread(target=lambda: answers.update(map=nap.starmap(
                [(0.5, str(tally), tag) for tag in tags], progress=False)), daemon=True)
            mapping.start()

            def held() -> int:
                return sum(p["held"] for p in client.get("/status").json()["pools"] if p["job_id"] == nap.job_id)

            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not (held() > 1 and any(tally.iterdir())):
                time.sleep(0.05)
            assert held() > 1, "the worker holds a group"
            plat.proc.send_signal(signal.SIGTERM)
            plat.proc.wait(GRACE + 10)
            assert "still running" not in plat.log(), "the run in hand ended within the grace; no other started"
            (home / "gateway.log").rename(home / "gateway.first.log")
            plat = start(home, port=port, extra_env=env)
            mapping.join(120)
            assert answers.get("map") == tags
            assert {p.name: p.read_text() for p in tally.iterdir()} == {tag: "ran\n" for tag in tags}
    finally:
        client.close()
        stop(plat)
