"""The SDK's one retry policy (``Client.send``), against a scripted transport: no server needed."""

from __future__ import annotations

import httpx
import pytest

from opbox.client import NOT_SENT, Client
from opbox.config import ClientConfig
from opbox.errors import QuotaExceeded, Unavailable


def scripted(*steps) -> tuple[Client, list]:
    """A client whose requests get ``steps`` in turn: a status code, or an exception to raise."""
    client, seen, queue = Client(ClientConfig("http://gw", None, "ws"), retry_for=1.0), [], list(steps)

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        step = queue.pop(0)
        if isinstance(step, Exception):
            raise step
        return httpx.Response(step, headers={"retry-after": "0"} if step == 429 else {},
                              json={"error": "quota_exceeded", "message": "full"} if step == 429 else {})

    client.http = httpx.Client(base_url="http://gw", transport=httpx.MockTransport(handler))
    return client, seen


def test_429s_are_waited_out_within_quota_for_and_returned_after():
    client, seen = scripted(429, 429, 200)
    assert client.send("POST", "/serve/s/m", quota_for=60).status_code == 200
    assert seen == ["/ws/serve/s/m"] * 3
    client, _ = scripted(429, 200)
    assert client.send("POST", "/x").status_code == 429  # no patience: the answer as it came
    client, _ = scripted(429, 200)
    with pytest.raises(QuotaExceeded):
        client.request("POST", "/x")
    client, _ = scripted(429, 429, 200)
    assert client.request("POST", "/x", wait_quota=True).status_code == 200


def test_only_what_never_left_is_resent_for_a_call_that_must_not_run_twice():
    refused = httpx.ConnectError("refused")
    client, seen = scripted(refused, refused, 200)
    assert client.send("POST", "/x", retry=True, resend=NOT_SENT).status_code == 200
    assert len(seen) == 3
    client, seen = scripted(httpx.ReadError("reset mid-answer"), 200)
    with pytest.raises(httpx.ReadError):
        client.send("POST", "/x", retry=True, resend=NOT_SENT)
    assert len(seen) == 1
    client, seen = scripted(httpx.ReadError("reset mid-answer"), 200)
    assert client.get("/x").status_code == 200  # an idempotent request is resent either way
    client, _ = scripted(refused, 200)
    with pytest.raises(Unavailable, match="cannot reach the opbox gateway"):
        client.request("POST", "/x")  # no retry: unreachable at once
