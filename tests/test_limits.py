"""Limits, each with a clear error: open runs per workspace, request body, upload, arguments, result, log."""

from __future__ import annotations

import importlib
import os
import sys
import time

import httpx
import pytest

from opbox.errors import PayloadTooLarge, QuotaExceeded
from platform_fixture import running_platform

LIMITS = {"OPBOX_MAX_OPEN_RUNS": "6", "OPBOX_MAX_LOG_BYTES": "4000", "OPBOX_MAX_PAYLOAD": "100000",
          "OPBOX_MAX_REQUEST_BODY": "300000", "OPBOX_MAX_UPLOAD": "60000"}
CODE = """
import sys, time
from opbox import operator

@operator()
def nap(seconds=1.0):
    time.sleep(seconds)
    return seconds

@operator()
def shout(lines):
    for i in range(lines):
        print(f"line {i:05d} " + "x" * 40)
    return lines

@operator()
def big(size):
    return b"x" * size
"""


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    with running_platform(tmp_path_factory.mktemp("home"), extra_env=LIMITS) as plat:
        folder = tmp_path_factory.mktemp("limits_proj")
        (folder / "limitsmod.py").write_text(CODE)
        sys.path.insert(0, str(folder))
        mod = importlib.import_module("limitsmod")
        client = plat.client()
        yield plat, mod, {n: getattr(mod, n).deploy(client=client, quiet=True) for n in ("nap", "shout", "big")}
        sys.modules.pop("limitsmod", None)


def test_open_runs_quota_is_a_clear_429_that_map_waits_out(small):
    plat, _, f = small
    held = [f["nap"].submit(1.5) for _ in range(6)]
    with pytest.raises(QuotaExceeded, match="at most 6"):
        f["nap"].submit(0)
    with plat.http() as http:
        resp = http.post(f"/{plat.workspace}/job/nap/trigger", json={})
        assert resp.status_code == 429 and resp.headers["Retry-After"] == "1"
    for run in held:
        run.result(timeout=30)
    started = time.monotonic()
    assert f["nap"].map([0.05] * 20, progress=False) == [0.05] * 20
    assert time.monotonic() - started < 60


def local_address(resp: httpx.Response):
    """The client's end of the connection an answer came on."""
    address = resp.extensions["network_stream"].get_extra_info("client_addr")
    assert isinstance(address, tuple) and address[1] > 0, address
    return address


def test_items_past_the_open_runs_quota_get_their_429_before_the_body_is_read(small):
    plat, _, f = small
    held = [f["nap"].submit(1.5) for _ in range(6)]
    try:
        with plat.http() as http:
            batch = http.post(f"/{plat.workspace}/job/nap/batches", json={}).json()["batch_id"]
            items = f"/{plat.workspace}/batches/{batch}/items"
            truncated = b"\x00\x00\x10\x00" + b"x" * 10  # a frame header saying 4,096 bytes, then 10
            resp = http.post(items, params={"start": 0, "count": 3}, content=truncated)
            # the quota said no before the body was parsed (parsed, it is a 400)
            assert resp.status_code == 429 and resp.headers["Retry-After"] == "1", resp.text
            assert resp.json()["error"] == "quota_exceeded"
            connection = local_address(resp)
            resp = http.post(items, params={"start": 0}, content=truncated)  # no count: parsed first
            assert resp.status_code == 400 and "truncated" in resp.text
            assert local_address(resp) == connection  # the body left unread did not cost the connection
            assert http.post(f"/{plat.workspace}/batches/nope/items", params={"start": 0, "count": 3},
                             content=truncated).status_code == 404  # a map that is not there is said first
            assert http.get(f"/{plat.workspace}/batches/{batch}").json()["submitted"] == 0
            http.post(f"/{plat.workspace}/batches/{batch}/cancel")
    finally:
        for run in held:
            run.result(timeout=30)


def test_log_keeps_the_newest_output_within_its_budget(small):
    _, _, f = small
    run = f["shout"].submit(2000)  # ~100 KB of output against a 4 KB budget
    assert run.result(timeout=60) == 2000, "the process was not blocked by its log"
    text = "".join(run.logs())
    assert "line 01999" in text, "the newest output is kept"
    assert "line 00000" not in text
    assert "older output dropped" in text.splitlines()[0]
    assert len(text.encode()) <= 4000 + 200


def test_argument_and_result_sizes(small):
    _, _, f = small
    with pytest.raises(PayloadTooLarge, match="limit"):
        f["nap"](b"y" * 200_000)
    with pytest.raises(PayloadTooLarge, match="result is .* bytes; the platform's limit is 100000"):
        f["big"](150_000)  # refused by the runtime before it is sent: the worker lives on
    assert len(f["big"](1000)) == 1000


def test_request_body_limit(small):
    plat, _, f = small
    with plat.http() as http:
        batch = http.post(f"/{plat.workspace}/job/nap/batches", json={}).json()
        resp = http.post(f"/{plat.workspace}/batches/{batch['batch_id']}/items", params={"start": 0},
                         content=b"\0" * 400_000)
        assert resp.status_code == 413 and "limit" in resp.json()["message"]


def test_upload_limit(small, tmp_path):
    plat, mod, _ = small
    folder = tmp_path / "bigproj"
    folder.mkdir()
    (folder / "bigmod.py").write_text("from opbox import operator\n\n@operator()\ndef f():\n    return 1\n")
    (folder / "data.bin").write_bytes(os.urandom(80_000))
    sys.path.insert(0, str(folder))
    try:
        with pytest.raises(PayloadTooLarge, match="upload limit is 60000"):
            importlib.import_module("bigmod").f.deploy(client=plat.client(), quiet=True)
    finally:
        sys.modules.pop("bigmod", None)
    assert httpx.get(plat.url + "/healthz").status_code == 200
