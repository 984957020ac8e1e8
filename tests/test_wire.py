"""The SDK's keep-alive transport (opbox/wire.py) against a real HTTP/1.1 server on loopback."""

from __future__ import annotations

import http.server
import threading

import httpx
import pytest

from opbox import errors
from opbox.client import Client
from opbox.config import ClientConfig
from opbox.wire import KeepAliveTransport


class Recorder(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    connections: list = []
    requests: list = []

    def setup(self):
        super().setup()
        Recorder.connections.append(self.client_address)

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Recorder.requests.append((self.path, self.headers, body))
        if self.path.startswith("/w/close"):
            self._answer(200, b"bye", close=True)
        elif self.path.startswith("/w/chunked"):
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b"one ", b"two ", b"three"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
        elif self.path.startswith("/w/eof"):  # no length: the answer ends with the connection
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"until the end")
            self.close_connection = True
        elif self.path.startswith("/w/interim"):  # an interim answer before the real one
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self._answer(200, b"after 100")
        elif self.path.startswith("/w/drop"):  # the connection closed, no answer
            self.close_connection = True
        elif self.path.startswith("/w/error"):
            self._answer(404, b'{"error": "not_found", "message": "no such job: j1"}', ctype="application/json")
        else:
            self._answer(200, b"echo:" + body)

    do_GET = do_POST

    def _answer(self, status, body, close=False, ctype="application/octet-stream"):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    Recorder.connections, Recorder.requests = [], []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def client_for(httpd) -> Client:
    host, port = httpd.server_address[:2]
    return Client(ClientConfig(url=f"http://{host}:{port}", token="tok", workspace="w"))


def test_calls_share_one_connection_and_carry_the_clients_headers(server):
    client = client_for(server)
    answers = [client.post_envelope("/job/j1/runs", b"body%d" % i, "wait=60").content for i in range(5)]
    answers.append(client.http.post("/w/x", content=b"via httpx").content)
    assert answers == [b"echo:body%d" % i for i in range(5)] + [b"echo:via httpx"]
    assert len(Recorder.connections) == 1
    path, headers, _ = Recorder.requests[0]
    assert path == "/w/job/j1/runs?wait=60"
    assert headers["Authorization"] == "Bearer tok"
    assert headers["Content-Type"] == "application/x-opbox-envelope"


def test_a_connection_the_server_closed_is_replaced(server):
    client = client_for(server)
    assert client.http.post("/w/close", content=b"x").content == b"bye"
    assert client.post_envelope("/after", b"y", "a=1").content == b"echo:y"
    assert len(Recorder.connections) == 2


def test_chunked_and_streamed_answers_read_whole_then_the_connection_is_reused(server):
    client = client_for(server)
    assert client.http.post("/w/chunked", content=b"x").content == b"one two three"
    with client.http.stream("POST", "/w/chunked", content=b"x") as resp:
        assert b"".join(resp.iter_bytes()) == b"one two three"
    assert client.http.post("/w/x", content=b"z").content == b"echo:z"
    assert len(Recorder.connections) == 1


def test_an_answer_left_half_read_is_not_reused(server):
    client = client_for(server)
    with client.http.stream("POST", "/w/chunked", content=b"x") as resp:
        next(resp.iter_raw(1))  # read a little, then leave
    assert client.http.post("/w/x", content=b"z").content == b"echo:z"
    assert len(Recorder.connections) == 2


def test_the_call_paths_answers_are_read_whole_whatever_their_framing(server):
    """``post_envelope`` reads answers itself (httptools): a length, chunks, an interim 100, or the end of the
    connection; the connection is reused only when the answer said it may be."""
    client = client_for(server)
    first = client.post_envelope("/chunked", b"x", "a=1")
    assert (first.status_code, first.content) == (200, b"one two three")
    interim = client.post_envelope("/interim", b"x", "a=1")
    assert (interim.status_code, interim.content) == (200, b"after 100")
    assert client.post_envelope("/x", b"y", "a=1").headers["content-length"] == "6"  # names in lower case
    assert len(Recorder.connections) == 1
    eof = client.post_envelope("/eof", b"x", "a=1")
    assert (eof.status_code, eof.content) == (200, b"until the end")
    assert client.post_envelope("/x", b"z", "a=1").content == b"echo:z"
    assert len(Recorder.connections) == 2  # the closed one was not reused


def test_a_connection_closed_without_an_answer_is_unavailable_and_never_resent(server):
    client = client_for(server)
    with pytest.raises(errors.Unavailable, match="RemoteProtocolError"):
        client.post_envelope("/drop", b"x", "a=1")
    assert [path for path, _, _ in Recorder.requests] == ["/w/drop?a=1"]  # sent once: the run may exist
    assert client.post_envelope("/x", b"again", "a=1").content == b"echo:again"


def test_error_answers_raise_the_platforms_errors(server):
    client = client_for(server)
    with pytest.raises(errors.NotFound, match="no such job"):
        client.post_envelope("/error", b"x", "wait=1")


def test_nothing_listening_is_unavailable_and_a_restarted_server_is_reached_again():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    client = client_for(httpd)
    port = httpd.server_address[1]
    httpd.server_close()
    with pytest.raises(errors.Unavailable, match="cannot reach the opbox gateway"):
        client.post_envelope("/job/j1/runs", b"x", "wait=1")
    again = http.server.ThreadingHTTPServer(("127.0.0.1", port), Recorder)
    threading.Thread(target=again.serve_forever, daemon=True).start()
    try:
        assert client.post_envelope("/x", b"back", "a=1").content == b"echo:back"
    finally:
        again.shutdown()
        again.server_close()


def test_tls_and_streamed_bodies_go_through_httpx(server, monkeypatch):
    sent = []
    fallback = httpx.HTTPTransport()
    monkeypatch.setattr(fallback, "handle_request", lambda request: sent.append(request) or httpx.Response(200))
    transport = KeepAliveTransport(fallback)
    with httpx.Client(transport=transport) as http:
        http.post("https://example.invalid/x", content=b"x")
        http.post(f"http://127.0.0.1:{server.server_address[1]}/w/x", content=iter([b"a", b"b"]))
    assert [str(r.url) for r in sent] == ["https://example.invalid/x", f"http://127.0.0.1:{server.server_address[1]}/w/x"]


def test_with_a_proxy_in_the_environment_httpx_does_the_requests(server, monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    client = client_for(server)
    assert client.wire is None
    assert client.post_envelope("/x", b"p", "a=1").content == b"echo:p"
