"""Durable streaming for generator functions: ``f.remote_gen(...)`` and ``f.remote_gen.aio(...)`` receive each
value as the remote run yields it; the platform stores every item (large ones in the object store), counts it
in the workspace's usage and drops it with the run (retention); a reader resumes after the last item it saw
(``run.items(after=N)``, ``GET /runs/{run}/items?after=N``); ``f(...)`` still returns the list."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from opbox import RunHandle
from opbox.client import Client
from opbox.config import ClientConfig
from opbox.remote import RemoteFunction
from opbox.errors import Gone, StorageQuotaExceeded
from conftest import user_module
from platform_fixture import running_platform
from tcp_proxy import SwitchableProxy

CODE = """
import asyncio, os, time
from opbox import operator

def _wait_for(path):
    end = time.monotonic() + 60
    while not os.path.exists(path):
        if time.monotonic() > end:
            raise TimeoutError("the caller never saw the first item")
        time.sleep(0.02)

@operator()
def gated(gate):
    # the second value waits for a file the caller writes once it has the first: the first must reach the
    # caller while the run still goes on
    yield "first"
    _wait_for(gate)
    yield {"second": 2}

@operator()
async def agated(gate):
    yield "first"
    while not os.path.exists(gate):
        await asyncio.sleep(0.02)
    yield "second"

@operator()
def count(n, size=0):
    for i in range(n):
        yield (i, "x" * size) if size else i

@operator()
def fails_after(n):
    for i in range(n):
        yield i
    raise ValueError(f"broke after {n}")

@operator()
def endless(marker):
    i = 0
    while True:
        yield i
        i += 1
        if i == 3:
            open(marker, "w").close()
        time.sleep(0.01)

@operator()
def plain(x):
    return x + 1

@operator(max_retries=1)
def flaky(marker):
    yield 0
    yield 1
    if not os.path.exists(marker):  # the first attempt breaks after two items; the retry yields them again
        open(marker, "w").close()
        raise RuntimeError("the first attempt breaks")
    yield 2

@operator()
def chunks(n):
    for i in range(n):
        yield bytes([i]) * 300_000
"""

NAMES = ("gated", "agated", "count", "fails_after", "endless", "plain", "flaky")
SECONDS = 1.5
ENV = {"OPBOX_PAYLOAD_INLINE": "2048", "OPBOX_RETENTION_DAYS": str(SECONDS / 86400), "OPBOX_GC_MIN_AGE": "0",
       "OPBOX_GC_INTERVAL": "3600"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, state_env):  # on SQLite and on PostgreSQL
    with running_platform(tmp_path_factory.mktemp("home"), extra_env={**ENV, **state_env}) as plat:
        client = plat.client()
        with user_module(tmp_path_factory.mktemp("stream_proj"), "streammod", CODE) as mod:
            yield plat, client, {n: getattr(mod, n).deploy(client=client, quiet=True) for n in NAMES}
        client.close()


def test_items_arrive_as_they_are_yielded(setup, tmp_path):
    _, _, f = setup
    gate = tmp_path / "gate"
    seen = []
    for value in f["gated"].remote_gen(str(gate)):
        seen.append(value)
        gate.touch()  # only now can the run yield its second value
    assert seen == ["first", {"second": 2}]
    assert f["count"](4) == [0, 1, 2, 3], "a plain call of a generator function still returns the list"


def test_async_remote_gen_streams_an_async_generator(setup, tmp_path):
    _, _, f = setup
    gate = tmp_path / "agate"

    async def main():
        seen = []
        async for value in f["agated"].remote_gen.aio(str(gate)):
            seen.append(value)
            gate.touch()
        return seen

    assert asyncio.run(main()) == ["first", "second"]


def test_a_reader_resumes_after_the_last_item_it_saw(setup):
    plat, client, f = setup
    assert f["count"].submit(6).result(timeout=30) == [0, 1, 2, 3, 4, 5], "a plain run's result is the list"
    streamed = f["count"].submit_gen(6)
    assert list(streamed.items()) == [0, 1, 2, 3, 4, 5]
    assert list(streamed.items(after=4)) == [4, 5], "a second reader, from item 5 on"
    assert streamed.result() == 6, "a streaming run's result is its number of items"
    with plat.http() as http:
        lines = [json.loads(x) for x in http.get(f"/{plat.workspace}/runs/{streamed.id}/items",
                                                 params={"after": 3}).text.splitlines()]
    assert [x["seq"] for x in lines[:-1]] == [4, 5, 6]
    assert lines[-1] == {"end": True, "status": "succeeded", "items": 6}
    assert [base64.b64decode(x["payload"])[:4] for x in lines[:-1]] == [b"OPBX"] * 3

    async def resume():
        return [v async for v in streamed.items.aio(after=5)]

    assert asyncio.run(resume()) == [5]


def test_a_broken_connection_resumes_where_it_was(setup, tmp_path):
    plat, _, f = setup
    proxy = SwitchableProxy("127.0.0.1", int(plat.url.rsplit(":", 1)[1]))
    proxy.up()
    client = Client(ClientConfig(proxy.url, plat.token, plat.workspace))
    gate, seen = tmp_path / "gate", []
    try:
        for value in RemoteFunction(f["gated"].job_id, client=client).remote_gen(str(gate)):
            seen.append(value)
            if len(seen) == 1:  # cut the stream while the run waits, then let it go on
                proxy.down()
                proxy.up()
                gate.touch()
    finally:
        proxy.down()
        client.close()
    assert seen == ["first", {"second": 2}], "each item once, in order, across the reconnect"


def test_a_retried_run_goes_on_from_the_items_it_had_sent(setup, tmp_path):
    _, _, f = setup
    run = f["flaky"].submit_gen(str(tmp_path / "first-attempt"))
    assert list(run.items()) == [0, 1, 2], "each item once: the retry's repeats of items 1 and 2 are dropped"
    assert run.status()["attempt"] == 1 and run.result() == 3


def test_items_count_against_the_storage_quota(tmp_path_factory):
    with running_platform(tmp_path_factory.mktemp("quota_home"), extra_env={"OPBOX_STORAGE_QUOTA": "1Mi"}) as plat, \
            user_module(tmp_path_factory.mktemp("quota_proj"), "streamquota", CODE) as mod:
        chunks = mod.chunks.deploy(client=plat.client(), quiet=True)
        seen = []
        with pytest.raises(StorageQuotaExceeded, match="quota is 1048576"):
            for value in chunks.remote_gen(10):
                seen.append(value)
        assert 1 <= len(seen) < 4 and seen[0] == bytes([0]) * 300_000, "the items that fitted came first"


def test_a_failed_run_raises_after_its_items(setup):
    _, _, f = setup
    seen = []
    with pytest.raises(ValueError, match="broke after 2") as info:
        for value in f["fails_after"].remote_gen(2):
            seen.append(value)
    assert seen == [0, 1]
    assert "fails_after" in info.value.remote_traceback


def test_stopping_early_cancels_the_run(setup, tmp_path):
    _, client, f = setup
    marker = tmp_path / "three"
    stream = f["endless"].remote_gen(str(marker))
    assert next(stream) == 0
    run_id = client.get(f"/job/{f['endless'].job_id}/runs", params={"limit": 1}).json()["runs"][0]["id"]
    stream.close()
    assert RunHandle(run_id, client).wait(timeout=30)["status"] == "cancelled"


def test_remote_gen_of_a_plain_function_says_how_to_call_it(setup):
    _, _, f = setup
    with pytest.raises(TypeError, match=r"not a generator: call it with f\(\.\.\.\)"):
        list(f["plain"].remote_gen(1))


def test_large_items_live_in_the_object_store_count_in_usage_and_expire(setup):
    plat, client, f = setup
    before = client.get("/status").json()["storage"]["bytes"]
    started = f["count"].submit_gen(3, 10_000)
    values = list(started.items())
    assert values == [(i, "x" * 10_000) for i in range(3)]
    with plat.http() as http:
        lines = [json.loads(x) for x in http.get(f"/{plat.workspace}/runs/{started.id}/items").text.splitlines()]
    assert all(x.get("stored") for x in lines[:-1]) and len(lines) == 4, "above OPBOX_PAYLOAD_INLINE: stored apart"
    grew = client.get("/status").json()["storage"]["bytes"] - before
    assert grew >= 3 * 10_000, "the items count in the workspace's storage usage"
    time.sleep(SECONDS + 0.5)
    out = subprocess.run([sys.executable, "-m", "opbox.cli", "gc", "--home", str(plat.home), "--json"],
                         capture_output=True, text=True, timeout=60, env=plat.env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["payload_bytes"] >= 3 * 10_000
    with pytest.raises(Gone, match="items of run .* expired"):
        list(started.items())
    assert client.get("/status").json()["storage"]["bytes"] < before + grew - 3 * 10_000


def test_the_readme_example_runs(setup, tmp_path):
    plat, _, _ = setup
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("### Streaming a generator function's values"):]
    (tmp_path / "countdown_example.py").write_text(section.split("```python\n", 1)[1].split("```", 1)[0])
    env = {**plat.env, "OPBOX_URL": plat.url, "OPBOX_TOKEN": plat.token, "OPBOX_WORKSPACE": plat.workspace}
    out = subprocess.run([sys.executable, "countdown_example.py"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["3", "2", "1", "[3, 2, 1]", "3", "2", "1", "[5, 4, 3, 2, 1] 5", "[2, 1]"]
