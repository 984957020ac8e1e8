"""A map's results stream in its two forms: NDJSON (the default, for curl) and length-prefixed frames (asked for
with ``Accept: application/x-opbox-frames``, the SDK's form: the envelopes' bytes, no base64). Both say the same."""

from __future__ import annotations

import base64
import json
import shutil
import struct
import subprocess

import pytest

from opbox import result_frames, serialization
from opbox.errors import Unavailable
from conftest import require, user_module
from platform_fixture import running_platform

CODE = """
from opbox import operator

@operator()
def picky(x):
    if x % 3 == 0:
        raise ValueError(f"no multiples of three: {x}")
    return x * 2
"""
ITEMS = 40


@pytest.fixture(scope="module")
def ended_map(tmp_path_factory, state_env):
    """A finished map of ITEMS items (a third of them failed), sent as the SDK sends one, raw."""
    with running_platform(tmp_path_factory.mktemp("home"), extra_env=state_env) as plat:
        client = plat.client()
        with user_module(tmp_path_factory.mktemp("proj"), "framesmod", CODE) as mod:
            picky = mod.picky.deploy(client=client, quiet=True)
        frames = [serialization.dump_args((i,), {}) for i in range(ITEMS)]
        body = b"".join(struct.pack(">I", len(f)) + f for f in frames)
        with plat.http() as http:
            batch = http.post(f"/{plat.workspace}/job/{picky.job_id}/batches", json={}).json()["batch_id"]
            added = http.post(f"/{plat.workspace}/batches/{batch}/items", params={"start": 0}, content=body)
            assert added.status_code == 200 and added.json()["added"] == ITEMS, added.text
            http.post(f"/{plat.workspace}/batches/{batch}/seal", json={"total": ITEMS}).raise_for_status()
        yield plat, batch
        client.close()


def test_curl_gets_ndjson_and_the_sdk_frames_with_the_same_results(ended_map):
    plat, batch = ended_map
    require(shutil.which("curl") is not None, "curl is not installed")
    url = f"{plat.url}/{plat.workspace}/batches/{batch}/results"
    out = subprocess.run(["curl", "-sS", "-D", "-", "-H", f"Authorization: Bearer {plat.token}", url],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    head, _, text = out.partition("\n\n")  # (text mode: curl's CRLFs read as newlines)
    assert "content-type: application/x-ndjson" in head.lower()
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    with plat.http() as http:
        answer = http.get(f"/{plat.workspace}/batches/{batch}/results",
                          headers={"Accept": result_frames.MEDIA_TYPE})
    assert answer.headers["content-type"].startswith(result_frames.MEDIA_TYPE)
    reader = result_frames.FrameReader()
    framed = reader.feed(answer.content)
    reader.finish()

    assert [line["seq"] for line in lines] == [line["seq"] for line in framed] == list(range(1, ITEMS + 1))
    assert sorted(line["index"] for line in framed) == list(range(ITEMS))
    for line, frame in zip(lines, framed):
        assert base64.b64decode(line.pop("payload")) == frame.pop("payload")
        assert line == frame
        expected = "failed" if line["index"] % 3 == 0 else "succeeded"
        assert line["status"] == expected, line


def test_frames_cut_anywhere_read_the_same_and_a_stream_cut_mid_frame_is_reconnected(ended_map):
    plat, batch = ended_map
    with plat.http() as http:
        data = http.get(f"/{plat.workspace}/batches/{batch}/results", params={"after": ITEMS - 5},
                        headers={"Accept": result_frames.MEDIA_TYPE}).content
    whole = result_frames.FrameReader().feed(data)
    assert [line["seq"] for line in whole] == list(range(ITEMS - 4, ITEMS + 1))
    reader, one_by_one = result_frames.FrameReader(), []
    for i in range(len(data)):
        one_by_one += reader.feed(data[i:i + 1])
    reader.finish()
    assert one_by_one == whole

    cut = result_frames.FrameReader()
    assert cut.feed(data[:-3]) == whole[:-1]
    with pytest.raises(Unavailable, match="middle of a frame"):  # the SDK reconnects from the last seq it saw
        cut.finish()



def test_a_frame_carries_any_exit_reason_whole():
    reason = "ValueError: a message\twith tabs, ünïcode and more than 64 KiB " + "x" * 70_000
    data = result_frames.result_frame(result_frames.RESULT, 7, 3, "failed", "r-b1.7", reason, body=b"OPBX...")
    data += result_frames.result_frame(result_frames.STORED, 8, 4, "succeeded", "r-b1.8", None, 123)
    assert result_frames.FrameReader().feed(data) == [
        {"index": 7, "run_id": "r-b1.7", "status": "failed", "seq": 3, "exit_reason": reason, "payload": b"OPBX..."},
        {"index": 8, "run_id": "r-b1.8", "status": "succeeded", "seq": 4, "exit_reason": None, "stored": True,
         "size": 123}]
