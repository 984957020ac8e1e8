"""The gateway protocol's lean way (opbox.http_lean): requests a LeanRoute matches are answered by its handler
without the ASGI app, on a real uvicorn server, with keep-alive, pipelining, HEAD, Connection: close, streamed
answers and errors as uvicorn's own cycle has them."""

from __future__ import annotations

import socket

import httpx
import pytest

from opbox.http_lean import LeanRoute
from opbox.http_protocol import http_protocol
from servers import serve_app


async def app(scope, receive, send) -> None:  # everything the lean route does not take
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"app " + scope["path"].encode()})


async def handle(exchange, what: str) -> None:
    exchange.access_log = False  # as the gateway runs (pytest's log capture counts as an access log here)
    if what == "whole":
        assert exchange.answer(200, [(b"content-type", b"text/plain"), (b"x-lean", b"1")], b"lean whole")
    elif what == "echo":
        body = b""
        while True:
            message = await exchange.receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        assert exchange.answer(201, [], body)
    elif what == "stream":
        await exchange.send({"type": "http.response.start", "status": 200, "headers": []})
        for part in (b"one ", b"two ", b"three"):
            await exchange.send({"type": "http.response.body", "body": part, "more_body": True})
        await exchange.send({"type": "http.response.body", "body": b""})
    elif what == "bad-header":  # a value with a line break: refused here, and by send (500)
        headers = [(b"x-split", b"a\r\nset-cookie: stolen")]
        if not exchange.answer(200, headers, b"never"):
            await exchange.send({"type": "http.response.start", "status": 200, "headers": headers})
    elif what == "raise":
        raise ValueError("the handler broke")
    # "silent": no answer at all


def match(path: str) -> tuple[str] | None:
    return (path[len("/lean/"):],) if path.startswith("/lean/") else None


@pytest.fixture(scope="module")
def url():
    with serve_app(app, access_log=False, http=http_protocol(lean=LeanRoute(b"/lean/", match, handle))) as base:
        yield base


def test_lean_and_app_answers_share_a_connection(url):
    with httpx.Client(base_url=url, timeout=10) as http:
        for _ in range(3):
            whole = http.get("/lean/whole")
            assert whole.status_code == 200 and whole.text == "lean whole"
            assert whole.headers["x-lean"] == "1" and whole.headers["content-length"] == "10" and "date" in whole.headers
            echo = http.post("/lean/echo", content=b"x" * 300_000)
            assert echo.status_code == 201 and echo.content == b"x" * 300_000
            assert http.get("/elsewhere/lean").text == "app /elsewhere/lean"  # the marker alone does not match
            assert http.get("/plain").text == "app /plain"
            streamed = http.get("/lean/stream")
            assert streamed.text == "one two three" and streamed.headers["transfer-encoding"] == "chunked"
            head = http.head("/lean/whole")
            assert head.status_code == 200 and head.headers["content-length"] == "10" and head.content == b""
        assert len(http._transport._pool.connections) == 1


def test_pipelined_requests_are_answered_in_order(url):
    host, port = url.removeprefix("http://").split(":")
    requests = (b"POST /lean/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nfirst"
                b"GET /plain HTTP/1.1\r\nHost: x\r\n\r\n"
                b"GET /lean/whole HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(requests)
        answers = b""
        while more := sock.recv(65536):  # the server closes after the third (Connection: close)
            answers += more
    first, second, third = answers.split(b"HTTP/1.1 ")[1:]
    assert first.startswith(b"201 ") and first.endswith(b"\r\n\r\nfirst")
    assert second.startswith(b"200 ") and second.endswith(b"\r\n\r\na\r\napp /plain\r\n0\r\n\r\n")  # (chunked)
    assert third.startswith(b"200 ") and b"connection: close\r\n" in third and third.endswith(b"lean whole")


def test_http_1_0_gets_its_answer_and_the_close(url):
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"GET /lean/whole HTTP/1.0\r\n\r\n")
        answer = b""
        while more := sock.recv(65536):
            answer += more
    assert answer.startswith(b"HTTP/1.1 200 ") and b"connection: close\r\n" in answer and answer.endswith(b"lean whole")


@pytest.mark.parametrize("what", ["raise", "silent"])
def test_a_broken_handler_is_a_500_and_the_server_goes_on(url, what):
    with httpx.Client(base_url=url, timeout=10) as http:
        assert http.get(f"/lean/{what}").status_code == 500
        assert http.get("/lean/whole").text == "lean whole"


def test_a_header_with_a_line_break_never_reaches_the_client(url):
    """As with uvicorn's own cycle: send refuses it after the answer has begun, so the connection closes."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"GET /lean/bad-header HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while more := sock.recv(65536):
            answer += more
    assert b"stolen" not in answer and b"never" not in answer
    assert httpx.get(f"{url}/lean/whole").text == "lean whole"
