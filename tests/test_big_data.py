"""Big arguments and results skip the gateway: the SDK and the runtime move them with signed URLs straight to
and from the object store (a local folder, served by its own small route; or a real S3 server), and the
run's requests carry only a reference. The gateway checks each reference when it is used: its workspace,
a single use, its real size against OPBOX_MAX_PAYLOAD, the storage quota."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from conftest import user_module
from opbox import envelope, serialization
from opbox.errors import PayloadTooLarge, StorageQuotaExceeded
from platform_fixture import running_platform
from s3server import require_weed, run_seaweedfs

MiB = 1024 * 1024
BIG = 200 * MiB
METRICS_TOKEN = "big-data-metrics"
CODE = """
import hashlib
from opbox import operator

@operator()
def echo(data):
    return data

@operator()
def digest(data):
    return hashlib.sha256(data).hexdigest()

@operator()
def count_lines(table):
    path = table.path
    return len(path.read_bytes().splitlines()), str(path), oct(path.stat().st_mode & 0o777)

@operator()
def list_dir(folder):
    import os
    names = sorted(os.path.relpath(os.path.join(r, n), folder.path) for r, _, ns in os.walk(folder.path) for n in ns)
    return names, (folder.path / "sub" / "b.txt").read_text()

@operator()
def write_file(size):
    import os, tempfile, opbox
    path = os.path.join(tempfile.mkdtemp(), "out.bin")
    with open(path, "wb") as f:
        f.write(b"r" * size)
    return opbox.File(path)

@operator()
def chunks(count, size):
    for i in range(count):
        yield bytes([i]) * size

@operator()
def flip(array):
    array[0] ^= 0xFF  # an array's data comes out of band (pickle protocol 5) and must still arrive writable
    return array, array[:4].tobytes()

@operator()
def make(size, seed):
    block = hashlib.sha256(seed.encode()).digest() * (1024 * 1024 // 32)
    return block * (size // len(block))
"""

FUNCTIONS = ("echo", "digest", "flip", "make", "chunks", "count_lines", "list_dir", "write_file")


def metric(plat, name: str, **labels) -> float:
    """The sum of a metric's samples whose labels include ``labels`` (0 when there is none)."""
    text = httpx.get(f"{plat.url}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).text
    total = 0.0
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
        if match and all(f'{k}="{v}"' in (match.group(1) or "") for k, v in labels.items()):
            total += float(match.group(2))
    return total


def peak_rss(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


def deployed(plat, folder, name: str):
    client = plat.client()
    with user_module(folder, name, CODE) as mod:
        return client, {n: getattr(mod, n).deploy(client=client, quiet=True) for n in FUNCTIONS}


# -- the checks, on a platform with small limits ------------------------------------------------
SMALL = {"OPBOX_MAX_PAYLOAD": str(4 * MiB), "OPBOX_STORAGE_QUOTA": str(48 * MiB), "OPBOX_GC_MIN_AGE": "0",
         "OPBOX_METRICS_TOKEN": METRICS_TOKEN}


@pytest.fixture(scope="module")
def small(tmp_path_factory, state_env):
    """On SQLite and on PostgreSQL (conftest.state_env): uploads are claimed and expired in the records."""
    with running_platform(tmp_path_factory.mktemp("home"), extra_env={**SMALL, **state_env}) as plat:
        client, f = deployed(plat, tmp_path_factory.mktemp("proj"), "bigsmallmod")
        yield plat, client, f
        client.close()


def upload(plat, size: int, body: bytes, token: str | None = None, workspace: str | None = None) -> str:
    """Ask for a signed upload as the SDK does, PUT ``body`` to it; the reference."""
    with plat.http(token) as http:
        slot = http.post(f"/{workspace or plat.workspace}/payloads", json={"size": size})
        assert slot.status_code == 200, slot.text
        slot = slot.json()
    put = httpx.request(slot["method"], slot["url"], content=body, headers=slot["headers"])
    assert put.status_code < 300, put.text
    return slot["ref"]


def call_with_ref(plat, job, ref: str, token: str | None = None, workspace: str | None = None) -> httpx.Response:
    with plat.http(token) as http:
        return http.post(f"/{workspace or plat.workspace}/job/{job.job_id}/runs", params={"wait": 60},
                         content=envelope.ref(ref), headers={"Content-Type": envelope.CONTENT_TYPE})


def test_a_3_mib_argument_goes_by_url_and_small_ones_take_no_extra_round_trip(small):
    plat, _, f = small
    slots, via_url = metric(plat, "opbox_http_request_seconds_count", route="/{workspace}/payloads"), \
        metric(plat, "opbox_large_payload_bytes_total", via="url")
    assert f["digest"](b"small") == hashlib.sha256(b"small").hexdigest()
    assert metric(plat, "opbox_http_request_seconds_count", route="/{workspace}/payloads") == slots  # no new request
    data = bytes(range(256)) * (3 * MiB // 256)
    assert f["echo"](data) == data
    assert metric(plat, "opbox_http_request_seconds_count", route="/{workspace}/payloads") == slots + 1
    from opbox import Jobs

    run = Jobs("digest", plat.client()).trigger(data)  # a trigger with pickled arguments: by URL as well
    assert run.result(timeout=60) == hashlib.sha256(data).hexdigest()
    assert metric(plat, "opbox_http_request_seconds_count", route="/{workspace}/payloads") == slots + 2
    assert metric(plat, "opbox_large_payload_bytes_total", via="url") >= via_url + 3 * len(data)  # arguments, result
    assert metric(plat, "opbox_large_payload_bytes_total", via="gateway") == 0


def test_numpy_arrays_travel_out_of_band_uncopied_and_arrive_writable(small):
    import numpy as np

    plat, _, f = small
    array = np.frombuffer(os.urandom(3 * MiB), dtype=np.uint8).copy()
    pieces = serialization.dump_args_pieces((array,), {})
    header, _ = envelope.unpack(bytes(pieces))
    assert header["oob"] == [array.nbytes] and len(pieces.parts) == 3  # head, pickle stream, the array's data
    assert np.shares_memory(np.asarray(pieces.parts[2]), array)  # sent from the array's own memory
    (back,), _ = serialization.load_args(bytes(pieces))  # from read-only bytes: copied, so writable
    assert np.array_equal(back, array) and back.flags.writeable
    (back,), _ = serialization.load_args(received := bytearray(bytes(pieces)))  # from a download: read in place
    assert np.shares_memory(back, np.frombuffer(received, dtype=np.uint8)) and back.flags.writeable

    via_url = metric(plat, "opbox_large_payload_bytes_total", via="url")
    result, head = f["flip"](array)  # argument and result both by URL, their data out of band
    assert result.dtype == np.uint8 and result.shape == array.shape
    assert result[0] == array[0] ^ 0xFF and np.array_equal(result[1:], array[1:]) and head == result[:4].tobytes()
    result[1] ^= 0xFF  # the SDK's copy is writable too
    assert metric(plat, "opbox_large_payload_bytes_total", via="url") >= via_url + 2 * array.nbytes


def test_a_map_and_a_generator_move_large_items_by_url(small):
    plat, _, f = small
    via_url = metric(plat, "opbox_large_payload_bytes_total", via="url")
    items = [bytes([i]) * (2 * MiB) for i in range(3)]
    assert list(f["echo"].map(items)) == items

    async def amap():
        return [value async for value in f["echo"].map.aio(items[:2])]
    assert asyncio.run(amap()) == items[:2]
    assert list(f["chunks"].remote_gen(2, 2 * MiB)) == [bytes([0]) * (2 * MiB), bytes([1]) * (2 * MiB)]
    assert metric(plat, "opbox_large_payload_bytes_total", via="url") >= via_url + 12 * 2 * MiB
    assert metric(plat, "opbox_large_payload_bytes_total", via="gateway") == 0


def test_one_shot_runs_fetch_and_upload_by_url_as_cluster_pods_do(tmp_path_factory):
    """OPBOX_ISOLATION=run: a process per run, the contract of a Kubernetes Job's pod (runtime/batch.py)."""
    env = {"OPBOX_ISOLATION": "run", "OPBOX_METRICS_TOKEN": METRICS_TOKEN}
    with running_platform(tmp_path_factory.mktemp("home"), extra_env=env) as plat:
        client, f = deployed(plat, tmp_path_factory.mktemp("proj"), "bigoneshotmod")
        data = bytes(range(256)) * (3 * MiB // 256)
        assert f["echo"](data) == data
        assert metric(plat, "opbox_large_payload_bytes_total", via="url") >= 2 * len(data)
        assert metric(plat, "opbox_large_payload_bytes_total", via="gateway") == 0
        client.close()


def route_hits(plat, route: str, method: str | None = None) -> float:
    return metric(plat, "opbox_http_request_seconds_count", route=route, **({"method": method} if method else {}))


def test_a_file_goes_by_hash_once_and_is_a_read_only_path_cached_on_the_worker(small, tmp_path):
    import opbox

    plat, _, f = small
    table = tmp_path / "table.csv"
    table.write_bytes(os.urandom(8).hex().encode() + b"\n" + b"a,b\n" * (MiB // 4))  # a new content each time
    slots, puts = route_hits(plat, "/{workspace}/files"), route_hits(plat, "/_store/{key:path}", "PUT")
    fetches = route_hits(plat, "/_internal/pools/{pool}/files/{sha256}")
    lines, path, mode = f["count_lines"](opbox.File(table))
    assert lines == MiB // 4 + 1 and path.endswith("/table.csv") and mode == "0o444"
    assert hashlib.sha256(table.read_bytes()).hexdigest() in path  # cached by hash on the worker's machine
    again = f["count_lines"](opbox.File(table))
    assert again == (lines, path, mode)
    assert route_hits(plat, "/{workspace}/files") == slots + 2  # asked twice...
    assert route_hits(plat, "/_store/{key:path}", "PUT") == puts + 1  # ...uploaded once
    assert route_hits(plat, "/_internal/pools/{pool}/files/{sha256}") == fetches + 1  # fetched once
    assert metric(plat, "opbox_large_payload_bytes_total", via="gateway") == 0
    table.write_bytes(b"changed\n")  # a new content is a new hash
    assert f["count_lines"](opbox.File(table))[0] == 1


def test_a_dir_goes_by_hash_and_arrives_whole(small, tmp_path):
    import opbox

    plat, _, f = small
    (tmp_path / "data" / "sub").mkdir(parents=True)
    (tmp_path / "data" / "a.txt").write_text("A")
    (tmp_path / "data" / "sub" / "b.txt").write_text("B")
    names, b = f["list_dir"](opbox.Dir(tmp_path / "data"))
    assert names == ["a.txt", "sub/b.txt"] and b == "B"


def test_a_file_made_in_the_run_comes_back_as_a_file(small, tmp_path, monkeypatch):
    plat, _, f = small
    monkeypatch.setenv("OPBOX_FILE_CACHE", str(tmp_path / "client-files"))
    result = f["write_file"](2 * MiB)
    assert result.name == "out.bin" and result.size == 2 * MiB
    assert result.read_bytes() == b"r" * (2 * MiB)
    copy = result.download(tmp_path / "copy.bin")
    assert copy.read_bytes() == b"r" * (2 * MiB)


def test_sealed_workers_move_large_payloads_and_files_by_url(tmp_path_factory):
    """The sandbox (bubblewrap, the workspace's uid, a private /tmp) lets the runtime reach the store's URLs."""
    import opbox
    from conftest import require
    from opbox.platform.backends.local.sandbox import find_sandbox, unsealed_reason

    require(find_sandbox(tmp_path_factory.mktemp("probe")) is not None, f"no sandbox here: {unsealed_reason()}")
    env = {"OPBOX_SANDBOX": "required", "OPBOX_METRICS_TOKEN": METRICS_TOKEN}
    with running_platform(tmp_path_factory.mktemp("home"), extra_env=env) as plat:
        client, f = deployed(plat, tmp_path_factory.mktemp("proj"), "bigsealedmod")
        data = bytes(range(256)) * (3 * MiB // 256)
        assert f["echo"](data) == data
        table = tmp_path_factory.mktemp("data") / "t.csv"
        table.write_bytes(os.urandom(8).hex().encode() + b"\nx\ny\n")
        table.chmod(0o600)  # the platform's user only: the sealed run reads the copy it fetched
        assert f["count_lines"](opbox.File(table))[0] == 3
        assert metric(plat, "opbox_large_payload_bytes_total", via="gateway") == 0
        client.close()


def test_the_readme_file_example_runs(small, tmp_path):
    plat, _, _ = small
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("### Big data"):readme.index("### Serving classes as HTTP endpoints")]
    example = section.split("```python\n")[2].split("```", 1)[0]  # the second block: File and Dir
    (tmp_path / "files_example.py").write_text(example)
    (tmp_path / "data.csv").write_text("a,b\n1,2\n3,4\n")
    (tmp_path / "images").mkdir()
    for name in ("b.png", "a.png"):
        (tmp_path / "images" / name).write_bytes(b"\x89PNG")
    env = {**plat.env, "OPBOX_URL": plat.url, "OPBOX_TOKEN": plat.token, "OPBOX_WORKSPACE": plat.workspace}
    out = subprocess.run([sys.executable, "files_example.py"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["3", "a.png", "b.png"]


def test_too_large_is_refused_before_the_bytes_are_sent_and_the_error_names_the_setting(small):
    plat, _, f = small
    puts = metric(plat, "opbox_http_request_seconds_count", method="PUT")
    with pytest.raises(PayloadTooLarge) as info:
        f["echo"](b"x" * (5 * MiB))
    assert "OPBOX_MAX_PAYLOAD" in str(info.value) and str(4 * MiB) in str(info.value)
    assert metric(plat, "opbox_http_request_seconds_count", method="PUT") == puts  # no upload began


def test_a_reference_is_used_once(small):
    plat, _, f = small
    ref = upload(plat, 2 * MiB, serialization.dump_args((b"a" * (2 * MiB),)))
    first = call_with_ref(plat, f["digest"], ref)
    assert first.status_code == 200 and first.headers["x-opbox-status"] == "succeeded", first.text
    again = call_with_ref(plat, f["digest"], ref)
    assert again.status_code == 404 and "used once" in again.json()["message"]


def test_a_resent_map_request_with_references_is_idempotent(small):
    import struct

    plat, _, f = small
    ref = upload(plat, 2 * MiB, serialization.dump_args((b"m" * (2 * MiB),)))
    frame = envelope.ref(ref)
    body = struct.pack(">I", len(frame)) + frame
    with plat.http() as http:
        batch = http.post(f"/{plat.workspace}/job/{f['digest'].job_id}/batches", json={}).json()["batch_id"]
        first = http.post(f"/{plat.workspace}/batches/{batch}/items", params={"start": 0}, content=body).json()
        again = http.post(f"/{plat.workspace}/batches/{batch}/items", params={"start": 0}, content=body)
        assert again.status_code == 200, again.text  # the reference was claimed by the first: not an error
        assert (first["added"], again.json()["added"], again.json()["accepted"]) == (1, 0, 1)
        http.post(f"/{plat.workspace}/batches/{batch}/seal", json={"total": 1})
        line = list(plat.client().stream_lines("GET", f"/batches/{batch}/results"))[-1]
    assert line["status"] == "succeeded"


def test_a_reference_of_another_workspace_is_refused(small):
    plat, _, f = small
    out = subprocess.run([sys.executable, "-m", "opbox.cli", "workspace", "create", "big-b", "--home", str(plat.home),
                          "--json"], capture_output=True, text=True, check=True, env=plat.env)
    other = json.loads(out.stdout)
    ref = upload(plat, MiB + 100, serialization.dump_args((b"b" * (MiB + 100),)), other["token"], "big-b")
    assert ref.startswith("big-b/")
    resp = call_with_ref(plat, f["digest"], ref)  # the default workspace's token, the other's upload
    assert resp.status_code == 404 and "big-b" in resp.json()["message"]


def test_a_reference_that_is_not_an_envelope_is_refused_and_deleted(small):
    plat, _, f = small
    ref = upload(plat, 100, b"not an envelope at all")
    resp = call_with_ref(plat, f["digest"], ref)
    assert resp.status_code in (400, 422), resp.text
    assert not (plat.home / "store" / ref).exists()


def test_unused_uploads_expire_with_the_retention(small):
    plat, _, f = small
    ref = upload(plat, 2 * MiB, serialization.dump_args((b"e" * (2 * MiB),)))
    assert (plat.home / "store" / ref).exists()
    out = subprocess.run([sys.executable, "-m", "opbox.cli", "gc", "--home", str(plat.home), "--json"],
                         capture_output=True, text=True, timeout=60, env=plat.env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["uploads_expired"] >= 1
    assert not (plat.home / "store" / ref).exists()
    assert call_with_ref(plat, f["digest"], ref).status_code == 404


def test_the_quota_is_checked_with_the_size_as_stored(small):
    plat, _, f = small
    answers = []
    for _ in range(14):  # 49 MiB of arguments against a 48 MiB quota, each declared as 10 bytes
        resp = call_with_ref(plat, f["digest"], upload(plat, 10, serialization.dump_args((b"q" * int(3.5 * MiB),))))
        answers.append(resp)
        if resp.status_code != 200:
            break
    assert answers[-1].status_code == 507 and "OPBOX_STORAGE_QUOTA" in answers[-1].json()["message"]
    with plat.http() as http:
        storage = http.get(f"/{plat.workspace}/status").json()["storage"]
    assert storage["bytes"] <= 48 * MiB  # the refused one is not counted
    resp = plat.http().post(f"/{plat.workspace}/payloads", json={"size": 4 * MiB})  # declared too large at once
    assert resp.status_code == 507 and "OPBOX_STORAGE_QUOTA" in resp.json()["message"]


# -- 200 MiB each way, on the local store and on S3 ----------------------------------------------
def big_round_trip(plat, f):
    data = hashlib.sha256(b"seed").digest() * (BIG // 32)
    expected = hashlib.sha256(data).hexdigest()
    assert f["digest"](data) == expected  # a 200 MiB argument
    del data
    result = f["make"](BIG, "seed")  # a 200 MiB result
    assert len(result) == BIG and hashlib.sha256(result).hexdigest() == expected
    del result
    peak = peak_rss(plat.proc.pid)
    assert peak < 150 * MiB, f"the gateway's peak RSS was {peak / MiB:.0f} MiB"
    assert metric(plat, "opbox_large_payload_bytes_total", via="url") >= 2 * BIG
    assert metric(plat, "opbox_large_payload_bytes_total", via="gateway") == 0  # nothing streamed through the routes


def test_200_mib_each_way_on_the_local_store(tmp_path_factory):
    env = {"OPBOX_METRICS_TOKEN": METRICS_TOKEN}
    with running_platform(tmp_path_factory.mktemp("home"), extra_env=env) as plat:
        client, f = deployed(plat, tmp_path_factory.mktemp("proj"), "biglocalmod")
        big_round_trip(plat, f)
        # the local store's own route carried the bytes: one PUT up (the argument) and one down (the result)
        assert metric(plat, "opbox_http_request_seconds_count", method="PUT", route="/_store/{key:path}") >= 2
        assert metric(plat, "opbox_http_request_seconds_count", method="GET", route="/_store/{key:path}") >= 2
        client.close()


@pytest.fixture(scope="module")
def s3():
    require_weed()
    with run_seaweedfs() as server:
        from opbox.platform.store.s3 import S3Store

        S3Store("bigdata", endpoint_url=server.endpoint_url, access_key=server.access_key,
                secret_key=server.secret_key, region=server.region).create_bucket_if_missing()
        yield server


def test_200_mib_each_way_on_s3(s3, tmp_path_factory):
    env = {"OPBOX_STORE_URL": f"s3://bigdata/platform?endpoint={s3.endpoint_url}&path_style=1&region={s3.region}",
           "AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key,
           "OPBOX_METRICS_TOKEN": METRICS_TOKEN, "OPBOX_MAX_PAYLOAD": str(300 * MiB)}
    with running_platform(tmp_path_factory.mktemp("home"), extra_env=env) as plat:
        client, f = deployed(plat, tmp_path_factory.mktemp("proj"), "bigs3mod")
        big_round_trip(plat, f)
        assert metric(plat, "opbox_http_request_seconds_count", route="/_store/{key:path}") == 0  # no such route

        # a presigned S3 PUT cannot bound the size: the size as stored is checked when the reference is used
        ref = upload(plat, 10, serialization.dump_args((b"z" * (301 * MiB),)))
        resp = call_with_ref(plat, f["digest"], ref)
        assert resp.status_code == 413 and "OPBOX_MAX_PAYLOAD" in resp.json()["message"], resp.text
        client.close()
