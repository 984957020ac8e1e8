"""The awaitable SDK against a real gateway: ``f.aio``, ``submit.aio``, ``map.aio``, ``result.aio``, service
methods' ``.aio``; cancelling the awaiting task cancels the remote run; ``async def`` and generator functions
and methods run remotely."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from opbox import RunHandle
from conftest import user_module

CODE = """
import asyncio, os, time
from opbox import operator

@operator()
def square(x):
    return x * x

@operator()
async def asquare(x):
    await asyncio.sleep(0)
    return x * x

@operator()
async def afail(x):
    await asyncio.sleep(0)
    raise ValueError(f"async bad {x}")

@operator()
def countdown(n):
    for i in range(n, 0, -1):
        yield i

@operator()
async def acountdown(n):
    for i in range(n, 0, -1):
        await asyncio.sleep(0)
        yield i

@operator()
def wait_for(path, patience=60.0):
    end = time.monotonic() + patience
    while not os.path.exists(path):
        if time.monotonic() > end:
            return "never saw it"
        time.sleep(0.02)
    return "seen"

@operator()
def hang(path):
    open(path, "w").close()
    time.sleep(300)


@operator()
class Meeting:
    def __init__(self):
        self.arrived = 0
        self.all_here = None

    async def meet(self, n):
        # returns only once n calls are inside at the same time: proof that async calls run concurrently
        if self.all_here is None:
            self.all_here = asyncio.Event()
        self.arrived += 1
        if self.arrived >= n:
            self.all_here.set()
        await asyncio.wait_for(self.all_here.wait(), 60)
        return self.arrived

    def double(self, x):
        return 2 * x


@operator()
class Streamer:
    def tokens(self, gate: str):
        # the second value waits for a file the caller writes once it has read the first: the first value
        # must reach the caller through the gateway while the method still runs (no buffering)
        yield "first"
        end = time.monotonic() + 60
        while not os.path.exists(gate):
            if time.monotonic() > end:
                yield "the caller never saw the first value"
                return
            time.sleep(0.02)
        yield {"second": 2}

    async def acount(self, n: int):
        for i in range(n):
            await asyncio.sleep(0)
            yield i
        raise ValueError("after the values")
"""

NAMES = ("square", "asquare", "afail", "countdown", "acountdown", "wait_for", "hang")


@pytest.fixture(scope="module")
def fns(plat, client, tmp_path_factory):
    with user_module(tmp_path_factory.mktemp("async_proj"), "asyncmod", CODE) as mod:
        deployed = {name: getattr(mod, name).deploy(client=client, quiet=True) for name in NAMES}
        deployed["Meeting"] = mod.Meeting.deploy(client=client, quiet=True, concurrency=4)
        deployed["Streamer"] = mod.Streamer.deploy(client=client, quiet=True)
        yield deployed


def test_aio_call_submit_and_result(fns):
    async def main():
        run = await fns["square"].submit.aio(4)
        assert isinstance(run, RunHandle)
        return await fns["square"].aio(3), await fns["asquare"].aio(5), await run.result.aio(), await run.status.aio()

    nine, twenty_five, sixteen, status = asyncio.run(main())
    assert (nine, twenty_five, sixteen) == (9, 25, 16)
    assert status["status"] == "succeeded"


def test_the_event_loop_runs_on_while_a_call_waits(fns, tmp_path):
    """The remote function waits for a file that a coroutine of the same loop writes after the call
    has started: a blocking call would keep that coroutine from running until the function gave up."""
    marker = tmp_path / "go"

    async def writer():
        await asyncio.sleep(0.3)
        marker.touch()

    async def main():
        seen, _ = await asyncio.gather(fns["wait_for"].aio(str(marker)), writer())
        return seen

    assert asyncio.run(main()) == "seen"


def test_async_def_and_generators_run_remotely(fns):
    assert fns["asquare"](7) == 49
    assert fns["countdown"](3) == [3, 2, 1]
    assert fns["acountdown"](4) == [4, 3, 2, 1]
    with pytest.raises(ValueError, match="async bad 2") as info:
        fns["afail"](2)
    assert "afail" in info.value.remote_traceback


def test_map_aio_in_input_order(fns):
    async def numbers():
        for i in range(5):
            yield i

    async def main():
        plain = [r async for r in fns["square"].map.aio(range(30))]
        from_async = [r async for r in fns["asquare"].map.aio(numbers())]
        errors = [r async for r in fns["afail"].map.aio([1], return_exceptions=True)]
        return plain, from_async, errors

    plain, from_async, errors = asyncio.run(main())
    assert plain == [i * i for i in range(30)]
    assert from_async == [0, 1, 4, 9, 16]
    assert isinstance(errors[0], ValueError) and "async bad 1" in str(errors[0])


def _wait_until(path: Path):
    async def wait():
        while not path.exists():
            await asyncio.sleep(0.05)
    return asyncio.wait_for(wait(), 120)


def test_cancelling_the_awaiting_task_cancels_the_run(fns, tmp_path):
    marker = tmp_path / "started"
    hang = fns["hang"]

    async def main():
        task = asyncio.ensure_future(hang.aio(str(marker)))
        await _wait_until(marker)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    run = hang.runs(limit=1)[0]
    assert RunHandle(run["id"], hang.client).wait(timeout=60)["status"] == "cancelled"


def test_a_task_cancelled_before_its_runs_id_is_back_still_cancels_the_run(fns, tmp_path, monkeypatch):
    """The run starts before the submit's answer reaches the caller; cancelling then, with the event loop
    ending right after (asyncio.run cancels what is left), still cancels it."""
    marker = tmp_path / "started"
    hang = fns["hang"]
    before = {r["id"] for r in hang.runs(limit=100)}
    apost = hang.client.apost

    async def slow_answer(*args, **kwargs):  # the run is made and running; its id comes back late
        resp = await apost(*args, **kwargs)
        await _wait_until(marker)
        await asyncio.sleep(0.5)
        return resp

    monkeypatch.setattr(hang.client, "apost", slow_answer)

    async def main():
        task = asyncio.ensure_future(hang.aio(str(marker)))
        await _wait_until(marker)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    (run,) = [r for r in hang.runs(limit=100) if r["id"] not in before]
    assert RunHandle(run["id"], hang.client).wait(timeout=60)["status"] == "cancelled"


def test_cancelling_a_map_aio_cancels_its_runs(fns, tmp_path):
    hang = fns["hang"]
    before = {r["id"] for r in hang.runs(limit=100)}
    markers = [tmp_path / f"m{i}" for i in range(3)]

    async def main():
        async def consume():
            return [r async for r in hang.map.aio([str(m) for m in markers])]

        task = asyncio.ensure_future(consume())
        await _wait_until(markers[0])
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    runs = [r for r in hang.runs(limit=100) if r["id"] not in before]
    assert len(runs) == 3
    assert {RunHandle(r["id"], hang.client).wait(timeout=60)["status"] for r in runs} == {"cancelled"}


def test_service_methods_aio_and_async_methods_run_concurrently(fns):
    meeting = fns["Meeting"]

    async def main():
        arrived = await asyncio.gather(*(meeting.meet.aio(3) for _ in range(3)))
        doubled = [r async for r in meeting.double.map.aio(range(10), concurrency=3)]
        return arrived, doubled

    arrived, doubled = asyncio.run(main())
    assert sorted(arrived) == [3, 3, 3]
    assert doubled == [2 * i for i in range(10)]


def test_one_async_client_per_event_loop(client):
    async def grab():
        first, second = client.async_http, client.async_http
        assert first is second
        return first

    in_one, in_another = asyncio.run(grab()), asyncio.run(grab())
    assert in_one is not in_another


def test_a_served_generator_method_streams_through_the_gateway(fns, plat, tmp_path):
    gate = tmp_path / "gate"
    url = fns["Streamer"].url
    with plat.http() as http:
        with http.stream("POST", f"{url}/tokens", json={"gate": str(gate)}) as resp:
            assert resp.headers["content-type"].startswith("application/x-ndjson")
            lines = resp.iter_lines()
            assert json.loads(next(lines)) == "first"
            gate.touch()
            assert [json.loads(line) for line in lines if line] == [{"second": 2}]
        events = http.post(f"{url}/acount", json={"n": 3}, headers={"Accept": "text/event-stream"})
    assert events.headers["content-type"].startswith("text/event-stream")
    data = [json.loads(line[len("data: "):]) for line in events.text.splitlines() if line.startswith("data: ")]
    assert data[:3] == [0, 1, 2]
    assert data[3]["error"] == "remote_error" and data[3]["message"] == "after the values"
    assert data[3]["details"]["type"].endswith("ValueError")


def test_a_served_generator_method_called_from_python_returns_the_list(fns, tmp_path):
    gate = tmp_path / "open"
    gate.touch()
    assert fns["Streamer"].tokens(str(gate)) == ["first", {"second": 2}]
