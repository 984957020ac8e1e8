"""Large arguments and results live in the object store, not the state file, and the gateway
streams them: 20 readers of a 60 MiB result at once keep its memory bounded."""

from __future__ import annotations

import hashlib
import pickle
import threading

import pytest

from opbox import envelope
from conftest import user_module
from platform_fixture import running_platform

CODE = """
from opbox import operator

@operator()
def echo(data):
    return data

@operator()
def blob(size):
    return b"x" * size

@operator()
def size_of(data):
    return len(data)
"""
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    with running_platform(tmp_path_factory.mktemp("home")) as plat, \
            user_module(tmp_path_factory.mktemp("proj"), "payloadsmod", CODE) as mod:
        client = plat.client()
        yield plat, {n: getattr(mod, n).deploy(client=client, quiet=True) for n in ("echo", "blob", "size_of")}


def inline_sizes(plat) -> list[int]:
    return [r[0] for r in plat.records_rows("SELECT length(data) FROM payloads")]


def stored_objects(plat) -> list:
    folder = plat.home / "store" / plat.workspace / "payloads"
    return sorted(folder.iterdir()) if folder.exists() else []


def test_large_arguments_and_results_round_trip_through_the_object_store(big):
    plat, f = big
    data = bytes(range(256)) * (5 * MiB // 256)  # 5 MiB, not compressible into anything small
    before = len(stored_objects(plat))
    assert f["echo"](data) == data
    assert f["size_of"](data) == len(data)
    assert f["echo"](b"small") == b"small"  # below the inline limit: as before
    after = stored_objects(plat)
    assert len(after) - before >= 3  # echo's argument and result, size_of's argument
    assert max(p.stat().st_size for p in after) >= 5 * MiB
    assert max(inline_sizes(plat)) < MiB  # the records hold references and heads only


def test_a_stored_result_reads_as_json_route_and_as_envelope(big):
    plat, f = big
    run = f["blob"].submit(3 * MiB)
    assert run.result(timeout=60) == b"x" * (3 * MiB)
    with plat.http() as http:
        body = http.get(f"/{plat.workspace}/runs/{run.id}/result").json()
        assert body["status"] == "succeeded" and body["result_is_json"] is False
        resp = http.get(f"/{plat.workspace}/runs/{run.id}/result", headers={"Accept": envelope.CONTENT_TYPE})
        assert resp.status_code == 200 and int(resp.headers["content-length"]) == len(resp.content) > 3 * MiB
        header, body = envelope.unpack(resp.content)
        assert header["kind"] == envelope.RESULT and pickle.loads(body) == b"x" * (3 * MiB)


def test_a_map_with_large_items_and_results(big):
    plat, f = big
    items = [bytes([i]) * (2 * MiB) for i in range(4)]
    assert list(f["echo"].map(items)) == items
    assert max(inline_sizes(plat)) < MiB


def test_twenty_readers_of_a_60_mib_result_keep_the_gateway_small(big):
    plat, f = big
    size = 60 * MiB
    run = f["blob"].submit(size)
    run.wait(timeout=120)
    with plat.http() as http:
        resp = http.get(f"/{plat.workspace}/runs/{run.id}/result", headers={"Accept": envelope.CONTENT_TYPE})
        expected = hashlib.sha256(resp.content).hexdigest()
        total = len(resp.content)
        del resp
    assert total > size
    digests, errors = [], []

    def read():
        try:
            with plat.http() as http, http.stream("GET", f"/{plat.workspace}/runs/{run.id}/result",
                                                  headers={"Accept": envelope.CONTENT_TYPE}) as resp:
                assert resp.status_code == 200
                digest = hashlib.sha256()
                for chunk in resp.iter_bytes():
                    digest.update(chunk)
                digests.append(digest.hexdigest())
        except Exception as exc:  # reported below, with the others
            errors.append(exc)

    threads = [threading.Thread(target=read) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert digests == [expected] * 20
    peak = peak_rss(plat.proc.pid)
    assert peak < 300 * MiB, f"the gateway's peak RSS was {peak / MiB:.0f} MiB"


def peak_rss(pid: int) -> int:
    """The process's high-water mark of resident memory, in bytes (VmHWM)."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")
