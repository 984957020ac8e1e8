"""Services under load and faults: only documented 429s, and clear errors when a replica dies.

OPBOX_SERVE_LOAD_SECONDS sets how long the 200 clients run (default 30, the full size).
"""

from __future__ import annotations

import asyncio
import importlib
import os
import signal
import sys
import threading
import time

import httpx
import pytest

CODE = '''
import os, time
from opbox import operator

@operator()
class Echo:
    def __init__(self, pause: float = 0.0):
        self.pause = pause

    def echo(self, i: int = 0) -> dict:
        time.sleep(self.pause)
        return {"i": i, "pid": os.getpid()}
'''
SECONDS = float(os.environ.get("OPBOX_SERVE_LOAD_SECONDS", "30"))


@pytest.fixture(scope="module")
def echo_mod(plat, tmp_path_factory):
    folder = tmp_path_factory.mktemp("serveload_proj")
    (folder / "serveloadmod.py").write_text(CODE)
    sys.path.insert(0, str(folder))
    yield importlib.import_module("serveloadmod")
    sys.modules.pop("serveloadmod", None)


def test_200_concurrent_clients_get_answers_or_documented_429s(plat, client, echo_mod):
    echo_mod.Echo.deploy(name="loaded", replicas=2, concurrency=8, queue=16, client=client, quiet=True)
    url = f"{plat.url}/{plat.workspace}/serve/loaded/echo"
    counts: dict = {}
    bad: list = []

    async def clients():
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx.AsyncClient(limits=limits, timeout=60,
                                     headers={"Authorization": f"Bearer {plat.token}"}) as http:
            deadline = time.monotonic() + SECONDS

            async def one(n):
                i = 0
                while time.monotonic() < deadline:
                    i += 1
                    try:
                        resp = await http.post(url, json={"i": i})
                    except httpx.HTTPError as exc:
                        bad.append(repr(exc))
                        continue
                    counts[resp.status_code] = counts.get(resp.status_code, 0) + 1
                    if resp.status_code == 200:
                        assert resp.json()["i"] == i
                    elif resp.status_code == 429:
                        assert resp.headers.get("retry-after"), "a 429 says when to come back"
                        await asyncio.sleep(float(resp.headers["retry-after"]) / 10)
                    else:
                        bad.append((resp.status_code, resp.text[:200]))

            await asyncio.gather(*(one(n) for n in range(200)))

    asyncio.run(clients())
    assert not bad, bad[:5]
    assert counts.get(200, 0) > 0 and set(counts) <= {200, 429}, counts
    print(f"200 clients for {SECONDS:g} s: {counts}")


def test_a_replica_crash_under_load_fails_in_flight_calls_clearly_then_recovers(plat, client, echo_mod):
    svc = echo_mod.Echo.deploy(0.3, name="crashy", replicas=1, concurrency=16, client=client, quiet=True)
    pid = svc.echo()["pid"]
    url = f"{plat.url}/{plat.workspace}/serve/crashy/echo"
    outcomes: list = []
    stop = threading.Event()

    def hammer():
        with httpx.Client(headers={"Authorization": f"Bearer {plat.token}"}, timeout=60) as http:
            i = 0
            while not stop.is_set():
                i += 1
                resp = http.post(url, json={"i": i})
                outcomes.append((time.monotonic(), resp.status_code, resp.json()))

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    time.sleep(3.0)
    stop.set()
    for t in threads:
        t.join(60)
    failures = [(s, body) for _, s, body in outcomes if s != 200]
    assert failures, "in-flight calls at the moment of the kill must fail (with a clear error)"
    for status, body in failures:
        assert status == 503 and body["error"] == "unavailable", (status, body)
        assert "crashy" in body["message"]
    late = [(at, s, body) for at, s, body in outcomes if at > killed_at + 0.5]
    assert late and all(s == 200 for _, s, _ in late[-8:]), "new calls succeed once a replica is back"
    assert {body["pid"] for _, s, body in late if s == 200} - {pid}, "answered by the new replica"
