"""A full disk under the platform: runs end saying why, API writes answer 507, and everything works
again once space returns, without a restart. The platform's home is a small tmpfs (root mounts it)."""

from __future__ import annotations

import asyncio
import errno
import os
import sqlite3
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.sqlite_only  # the full disk is the one under the SQLite state file (ON_SQLITE below)

from opbox import envelope
from opbox.errors import OpboxError, RunFailed, StorageFull
from opbox.platform.backends.base import RunTicket
from opbox.platform.control.runs import Runs
from opbox.platform.records.base import TERMINAL, NewRun, NewVersion
from opbox.platform.records.sqlite import open_sqlite
from opbox.resource import Resource
from opbox.serialization import dump_args
from conftest import require, user_module
from platform_fixture import ON_SQLITE, running_platform

MiB = 1024 * 1024
CODE = """
import time
from opbox import operator

@operator()
def blob(size):
    return b"x" * size

@operator()
def echo(data):
    return data

@operator()
def nap(seconds):
    time.sleep(seconds)
    return "rested"

@operator()
def mark(path, data):
    open(path, "w").write("ran")
    return len(data)
"""


class Filler:
    """Takes a file system's free space, all of it or all but ``leave`` bytes."""

    def __init__(self, path: Path):
        self.path = path

    def fill(self, leave: int = 0) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            for chunk in (b"\0" * MiB, b"\0" * 4096):
                try:
                    while os.write(fd, chunk):
                        pass
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
        finally:
            os.close(fd)
        if leave:
            os.truncate(self.path, max(0, self.path.stat().st_size - leave))

    def free(self) -> None:
        self.path.unlink(missing_ok=True)


@contextmanager
def tmpfs_platform(tmp_path_factory, size: str, env: dict | None = None):
    require(os.geteuid() == 0, "mounting a tmpfs for the platform's home needs root")
    home = tmp_path_factory.mktemp("tmpfs-home")
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(home)], check=True)
    try:
        # on SQLite whatever OPBOX_TEST_DATABASE says: the full disk must be under the records' own state file
        with running_platform(home, extra_env={**ON_SQLITE, **(env or {})}) as plat, \
                user_module(tmp_path_factory.mktemp("proj"), f"fullmod{len(env or {})}", CODE) as mod:
            client = plat.client()
            fns = {n: getattr(mod, n).deploy(client=client, quiet=True) for n in ("blob", "echo", "nap", "mark")}
            filler = Filler(home / "filler")
            try:
                yield plat, fns, filler, mod
            finally:
                filler.free()
    finally:
        subprocess.run(["umount", "-l", str(home)], check=False)


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    with tmpfs_platform(tmp_path_factory, "64m") as running:
        yield running


def test_a_result_the_disk_cannot_hold_fails_the_run_saying_so(full):
    plat, f, filler, _ = full
    filler.fill(leave=3 * MiB)
    try:
        run = f["blob"].submit(8 * MiB)
        with pytest.raises(RunFailed, match="could not be stored"):
            run.result(timeout=60)
        status = run.status()
        assert status["status"] == "failed" and "no space left" in status["exit_reason"]
        assert f["echo"](b"still here") == b"still here"  # small work goes on in what space is left
    finally:
        filler.free()
    assert f["blob"](8 * MiB) == b"x" * (8 * MiB)


def test_a_result_the_disk_cannot_hold_in_a_map_fails_that_item_saying_so(full):
    """A map long enough to be handed out in groups: the item whose result does not fit fails, saying so;
    the items around it succeed."""
    plat, f, filler, _ = full
    sizes = [10] * 24
    sizes[7] = 8 * MiB
    filler.fill(leave=3 * MiB)
    try:
        out = f["blob"].map(sizes, return_exceptions=True, progress=False)
    finally:
        filler.free()
    assert [o for i, o in enumerate(out) if i != 7] == [b"x" * 10] * 23
    assert isinstance(out[7], RunFailed) and "could not be stored" in str(out[7])


def test_api_writes_answer_507_and_everything_recovers_without_a_restart(full, tmp_path):
    plat, f, filler, mod = full
    pid = plat.proc.pid
    big = b"y" * (2 * MiB)
    filler.fill()
    try:
        with pytest.raises(StorageFull, match="no space left|is full"):  # the upload's record, or its bytes
            f["echo"].submit(big)
        with plat.http() as http:
            resp = http.post(f"/{plat.workspace}/job/echo/trigger", content=dump_args((big,), {}),
                             headers={"Content-Type": envelope.CONTENT_TYPE})
            assert resp.status_code == 507 and resp.json()["error"] == "storage_full"
        (Path(mod.__file__).parent / "extra.py").write_text("VALUE = 1\n")  # new code: a new upload
        with pytest.raises(OpboxError) as refused:
            mod.echo.deploy(client=plat.client(), quiet=True)
        assert refused.value.status == 507, plat.log()[-3000:]
    finally:
        filler.free()
    assert plat.proc.poll() is None and plat.proc.pid == pid
    assert f["echo"](big) == big
    assert mod.echo.deploy(client=plat.client(), quiet=True)(b"z") == b"z"
    body = httpx.get(f"{plat.url}/{plat.workspace}/status", headers={"Authorization": f"Bearer {plat.token}"}).json()
    assert body["storage"]["bytes"] > 2 * MiB


@pytest.fixture(scope="module")
def full_state(tmp_path_factory):
    """Results kept in the state file (a high inline limit): what SQLite refuses when its disk is full."""
    with tmpfs_platform(tmp_path_factory, "64m", {"OPBOX_PAYLOAD_INLINE": str(64 * MiB)}) as running:
        yield running


def test_a_result_the_state_file_cannot_hold_fails_the_run_saying_so(full_state):
    plat, f, filler, _ = full_state
    run = f["nap"].submit(1.0)  # running before the disk fills
    assert run.wait(timeout=30)["status"] == "succeeded"
    # Leave room for the run's own small record (how much SQLite needs for it depends on its free
    # pages and WAL, so an entirely full disk could refuse the submit itself), none for 8 MiB.
    filler.fill(leave=1 * MiB)
    try:
        run = f["blob"].submit(8 * MiB)
        deadline = time.monotonic() + 60
        while (status := run.status())["status"] not in TERMINAL and time.monotonic() < deadline:
            time.sleep(0.2)
        assert status["status"] == "failed", status
        assert "could not be stored" in status["exit_reason"] and "full" in status["exit_reason"]
    finally:
        filler.free()
    assert f["blob"](8 * MiB) == b"x" * (8 * MiB)


def test_concurrent_calls_a_full_state_disk_refuses_all_answer_507_and_none_is_stored_or_run(full_state, tmp_path):
    """Calls arriving together (their runs' records written in the same moment, group commit or not) while the
    state file's disk is full: every one is answered 507 storage_full, no run of them is stored, none runs."""
    plat, f, filler, _ = full_state
    marks = tmp_path / "marks"
    marks.mkdir()
    before = plat.records_rows("SELECT COUNT(*) FROM runs")

    def call(i: int) -> httpx.Response:
        with plat.http() as http:  # 2 MiB of arguments, kept in the state file: more than its WAL has room for
            return http.post(f"/{plat.workspace}/job/mark/runs", params={"wait": 30},
                             content=dump_args((str(marks / str(i)), b"x" * (2 * MiB)), {}),
                             headers={"Content-Type": envelope.CONTENT_TYPE})

    empty_wal(plat.home / "state.db")
    filler.fill()
    try:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(call, range(8)))
    finally:
        filler.free()
    assert [(a.status_code, a.json()["error"]) for a in answers] == [(507, "storage_full")] * 8, plat.log()[-3000:]
    assert plat.records_rows("SELECT COUNT(*) FROM runs") == before
    assert f["mark"](str(marks / "after"), b"y") == 1  # queued after any of them, had one been dispatched
    assert sorted(p.name for p in marks.iterdir()) == ["after"]


def empty_wal(state: Path) -> None:
    """Checkpoint the state file's WAL and truncate it to nothing: a write must then grow it, which a full disk
    refuses. (SQLite writes over a WAL's old frames once it restarts: a WAL left large by the tests before
    takes megabytes of new writes with the disk full.)"""
    db = sqlite3.connect(state, timeout=10)
    try:
        deadline = time.monotonic() + 10
        while db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] and time.monotonic() < deadline:
            time.sleep(0.05)  # busy: the gateway's checkpointer or a write in progress
    finally:
        db.close()
    assert Path(f"{state}-wal").stat().st_size == 0


class RefusingRuns:
    """The SQLite run records, with a switch that makes them refuse writes as a full disk does."""

    def __init__(self, runs):
        self.runs = runs
        self.full = False

    def __getattr__(self, name):
        method = getattr(self.runs, name)
        if name in ("get", "args", "result") or not callable(method):
            return method

        def call(*args, **kwargs):
            if self.full:
                raise StorageFull("the disk is full")
            return method(*args, **kwargs)
        return call


class Recording:
    name = "recording"
    abilities = frozenset()

    def __init__(self):
        self.submitted = []

    def submit(self, ticket, version):
        self.submitted.append(ticket.run_id)


def test_a_run_end_the_records_refuse_is_written_once_space_returns(tmp_path):
    async def scenario():
        records = open_sqlite(tmp_path / "state.db")
        refusing = RefusingRuns(records.runs)
        records.runs = refusing
        backend = Recording()
        runs = Runs(records, backend)
        job, number = records.jobs.add_version("w", "job", "function", NewVersion(
            "m:f", "w/code/x.zip", "0" * 64, "3.11", "3", Resource().to_dict(), time.time()))
        records.jobs.version_ready(job.id, number, {}, "", "", time.time())
        version = runs.version_info(job.id, number)
        run_id = runs.create(version, envelope.json_args([1]), "call")
        assert backend.submitted == [run_id]
        refusing.full = True
        assert runs.run_started(run_id, "worker-1") is False  # refused: dispatched again once there is room
        refusing.full = False
        await asyncio.sleep(1.5)
        assert backend.submitted == [run_id, run_id]
        assert runs.run_started(run_id, "worker-1")
        refusing.full = True
        runs.run_finished(run_id, "succeeded", envelope.pack({"kind": "result", "json": 7}))
        assert records.runs.get(run_id).status == "running" and runs.stalled
        await asyncio.sleep(1.5)
        assert records.runs.get(run_id).status == "running"  # still full: it waits
        refusing.full = False
        waiter = asyncio.ensure_future(runs.wait("w", run_id, 10))
        run = await waiter
        assert run.status == "succeeded" and not runs.stalled
        assert envelope.read_header(runs.result(run_id))["json"] == 7
        records.close()

    asyncio.run(scenario())


def test_a_group_the_records_refuse_is_written_run_by_run_once_space_returns(tmp_path):
    """A warm worker's group: its start and its results go in one transaction each; when a full disk refuses
    one, every run of it is dispatched again, or its end written, once there is room (as for a single run)."""
    async def scenario():
        records = open_sqlite(tmp_path / "state.db")
        refusing = RefusingRuns(records.runs)
        records.runs = refusing
        backend = Recording()
        runs = Runs(records, backend)
        job, number = records.jobs.add_version("w", "job", "function", NewVersion(
            "m:f", "w/code/x.zip", "0" * 64, "3.11", "3", Resource().to_dict(), time.time()))
        records.jobs.version_ready(job.id, number, {}, "", "", time.time())
        version = runs.version_info(job.id, number)
        ids = [runs.create(version, envelope.json_args([i]), "call") for i in range(3)]
        tickets = [RunTicket(run_id, "w", job.id, number, None) for run_id in ids]
        refusing.full = True
        assert runs.runs_started(tickets, "worker-1") == [False, False, False]
        refusing.full = False
        await asyncio.sleep(1.5)
        assert backend.submitted == ids + ids  # each dispatched again once there is room
        assert runs.runs_started(tickets, "worker-1") == [True, True, True]
        assert set(runs.runs_args(ids)) == set(ids)
        refusing.full = True
        runs.runs_finished([(t, "succeeded", envelope.pack({"kind": "result", "json": i})) for i, t in enumerate(tickets)])
        assert all(records.runs.get(run_id).status == "running" for run_id in ids) and len(runs.stalled) == 3
        refusing.full = False
        for run_id in ids:
            assert (await runs.wait("w", run_id, 10)).status == "succeeded"
        assert [envelope.read_header(runs.result(run_id))["json"] for run_id in ids] == [0, 1, 2]
        assert not runs.stalled
        records.close()

    asyncio.run(scenario())


def test_output_a_full_disk_refused_is_reported_in_the_log(tmp_path):
    records = open_sqlite(tmp_path / "state.db")
    refusing = RefusingRuns(records.runs)
    records.runs = refusing
    runs = Runs(records, Recording())
    records.runs.runs.create(NewRun("r-1", "w", "j", 1, "call", time.time(), 0, None), b"args")
    refusing.full = True
    runs.append_log("r-1", b"lost line\n")
    refusing.full = False
    runs.append_log("r-1", b"kept line\n")
    text = b"".join(data for _, data in runs.logs_after("r-1", -2)).decode()
    assert text == "[opbox: 10 bytes of output were lost: the platform's disk was full]\nkept line\n"
    records.close()
