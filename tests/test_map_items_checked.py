"""A map's items are checked as envelopes before any is stored: the gateway parses a head once per request and
compares the others' heads to it byte for byte, so an item that differs (not an envelope, another kind, a head
cut short) is still refused with a 4xx, and nothing of its request is written."""

from __future__ import annotations

import struct

import pytest

from opbox import envelope, serialization
from conftest import user_module
from platform_fixture import running_platform

CODE = """
from opbox import operator

@operator()
def double(x):
    return x * 2
"""


def body(frames: list[bytes]) -> bytes:
    return b"".join(struct.pack(">I", len(f)) + f for f in frames)


@pytest.fixture(scope="module")
def plat_fn(tmp_path_factory, state_env):
    with running_platform(tmp_path_factory.mktemp("home"), extra_env=state_env) as plat:
        client = plat.client()
        with user_module(tmp_path_factory.mktemp("proj"), "checkedmod", CODE) as mod:
            fn = mod.double.deploy(client=client, quiet=True)
        yield plat, fn
        client.close()


def good(i: int) -> bytes:
    return serialization.dump_args((i,), {})


def cut_head(i: int) -> bytes:
    """An args envelope whose prefix claims a longer header than it has: the same first bytes as a good one."""
    item = good(i)
    return item[:envelope.head_length(item) - 3]


BAD = {
    "not an envelope": (lambda i: b"NOPE" + good(i)[4:], 422, "not an opbox envelope"),
    "a result, not arguments": (lambda i: envelope.pack({"kind": envelope.RESULT}, b"x"), 422,
                                "expected an args envelope"),
    "a head cut short": (cut_head, 422, "truncated"),
    "a head that is not JSON": (lambda i: good(i)[:9] + b"\xff" + good(i)[10:], 422, "not JSON"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_item_after_good_ones_is_refused_and_nothing_of_its_request_is_stored(plat_fn, case):
    plat, fn = plat_fn
    make, status, message = BAD[case]
    with plat.http() as http:
        batch = http.post(f"/{plat.workspace}/job/{fn.job_id}/batches", json={}).json()["batch_id"]
        items = f"/{plat.workspace}/batches/{batch}/items"
        refused = http.post(items, params={"start": 0}, content=body([good(0), good(1), make(2), good(3)]))
        assert refused.status_code == status, refused.text
        assert message in refused.json()["message"]
        assert http.get(f"/{plat.workspace}/batches/{batch}").json()["submitted"] == 0

        sent = http.post(items, params={"start": 0}, content=body([good(i) for i in range(4)]))
        assert sent.status_code == 200 and sent.json()["added"] == 4, sent.text
        http.post(f"/{plat.workspace}/batches/{batch}/seal", json={"total": 4}).raise_for_status()
    lines = list(plat.client().stream_frames(f"/batches/{batch}/results",
                                             headers={"Accept": "application/x-opbox-frames"}))
    assert sorted(serialization.unpack(line["payload"])[0]["kind"] for line in lines) == ["result"] * 4
    assert all(line["status"] == "succeeded" for line in lines)
