"""The runtime's line to the gateway (opbox/runtime/channel.py) against real HTTP/1.1 servers on loopback."""

from __future__ import annotations

import datetime
import http.server
import ipaddress
import signal
import socket
import ssl
import threading
import time

import pytest

from opbox.http_answer import Headers
from opbox.runtime.channel import Channel, GatewayGone


class Gateway(http.server.BaseHTTPRequestHandler):
    """Records each connection and request; answers as the path says."""

    protocol_version = "HTTP/1.1"

    def setup(self):
        super().setup()
        self.server.connections.append(self.client_address)

    def log_message(self, *args):
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding") == "chunked":
            parts = []
            while True:
                size = int(self.rfile.readline().strip(), 16)
                data = self.rfile.read(size + 2)[:size]
                if not size:
                    return b"".join(parts)
                parts.append(data)
        return self.rfile.read(int(self.headers["Content-Length"]))

    def do_POST(self):
        body = self._body()
        self.server.requests.append((self.command, self.path, dict(self.headers), body))
        if self.path.startswith("/g/close"):
            self._answer(200, b"bye", [("Connection", "close")])
        elif self.path.startswith("/g/eof"):  # no length: the answer ends with the connection
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"until the end")
            self.close_connection = True
        elif self.path.startswith("/g/drop"):  # the connection closed, no answer
            self.close_connection = True
        elif self.path.startswith("/g/slow"):
            time.sleep(0.5)
            self._answer(200, b"late answer")
        elif self.path.startswith("/g/hangup"):  # answered, then the idle keep-alive connection is closed
            self._answer(200, b"once")
            self.close_connection = True
        else:
            self._answer(201, b"echo:" + body, [("x-OPBOX-run", "r-1"), ("X-Opbox-Group", "3"),
                                                 ("X-Opbox-Group", "4")])

    do_GET = do_POST

    def _answer(self, status: int, body: bytes, headers=()):
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _serve(port: int = 0, tls: ssl.SSLContext | None = None) -> http.server.ThreadingHTTPServer:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Gateway)
    server.daemon_threads = True
    server.connections, server.requests = [], []
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def gateway():
    server = _serve()
    yield server
    server.shutdown()
    server.server_close()


def _channel(server, base: str = "/g", scheme: str = "http", patience: float = 60.0) -> Channel:
    return Channel(f"{scheme}://127.0.0.1:{server.server_address[1]}{base}", "tok", "w-1", patience=patience)


def test_answers_parsed_and_headers_read_in_any_case(gateway):
    channel = _channel(gateway)
    status, headers, data = channel.request("POST", "/next?wait=10", b"result", {"X-Opbox-Done": "r-0", "X-None": None})
    assert (status, data) == (201, b"echo:result")
    assert isinstance(headers, Headers)
    assert headers["X-Opbox-Run"] == headers["x-opbox-run"] == "r-1"
    assert headers.get("X-OPBOX-GROUP") == "3"  # a repeated header: its first value
    assert headers.get("X-Opbox-Action") is None and "X-Opbox-Run" in headers and "X-Other" not in headers
    with pytest.raises(KeyError):
        headers["X-Opbox-Action"]
    method, path, sent, body = gateway.requests[0]
    assert (method, path, body) == ("POST", "/g/next?wait=10", b"result")
    assert sent["Authorization"] == "Bearer tok" and sent["X-Opbox-Worker"] == "w-1" and sent["X-Opbox-Done"] == "r-0"
    assert sent["Host"] == f"127.0.0.1:{gateway.server_address[1]}" and sent["Content-Length"] == "6"
    assert "X-None" not in sent
    channel.close()


def test_one_connection_kept_alive_for_many_requests(gateway):
    channel = _channel(gateway)
    for i in range(5):
        assert channel.request("GET" if i % 2 else "POST", f"/x/{i}", b"%d" % i)[2] == b"echo:%d" % i
    assert len(gateway.connections) == 1
    assert [r[1] for r in gateway.requests] == [f"/g/x/{i}" for i in range(5)]
    assert [r[0] for r in gateway.requests] == ["POST", "GET", "POST", "GET", "POST"]
    channel.close()


def test_a_body_larger_than_one_write_arrives_whole(gateway):
    channel = _channel(gateway)
    big = bytes(range(256)) * 8192  # 2 MiB
    assert channel.request("POST", "/big", big)[2] == b"echo:" + big
    channel.close()


def test_connection_close_and_an_answer_ending_at_close_close_the_line(gateway):
    channel = _channel(gateway)
    assert channel.request("POST", "/close")[:3:2] == (200, b"bye")
    assert channel.sock is None
    status, headers, data = channel.request("POST", "/eof")
    assert (status, data) == (200, b"until the end") and channel.sock is None
    assert channel.request("POST", "/after")[2] == b"echo:"
    assert len(gateway.connections) == 3
    channel.close()


def test_an_idle_line_closed_by_the_gateway_is_opened_again(gateway):
    channel = _channel(gateway)
    assert channel.request("POST", "/hangup")[2] == b"once"
    time.sleep(0.1)  # the server has closed its end by now; the next request finds out
    assert channel.request("POST", "/again", b"x")[2] == b"echo:x"
    assert len(gateway.connections) == 2
    channel.close()


def test_retried_while_the_gateway_is_unreachable_then_delivered():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = []
    timer = threading.Timer(0.5, lambda: started.append(_serve(port)))
    timer.start()
    channel = Channel(f"http://127.0.0.1:{port}/g", "tok", "w-1", patience=30)
    try:
        status, _, data = channel.request("POST", "/late", b"kept")
        assert (status, data) == (201, b"echo:kept")
    finally:
        timer.join()
        channel.close()
        for server in started:
            server.shutdown()
            server.server_close()
    assert [r[3] for r in started[0].requests] == [b"kept"]


def test_gateway_gone_after_patience():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    channel = Channel(f"http://127.0.0.1:{port}", "tok", "w-1", patience=0.3)
    with pytest.raises(GatewayGone, match=f"gateway at 127.0.0.1:{port} unreachable"):
        channel.request("POST", "/x", b"")


def test_a_request_that_may_have_arrived_is_sent_again_within_patience(gateway):
    channel = _channel(gateway, patience=0.5)
    with pytest.raises(GatewayGone, match="before its answer|without sending a response"):
        channel.request("POST", "/drop", b"once")
    assert len(gateway.requests) >= 2 and {r[3] for r in gateway.requests} == {b"once"}


def test_a_request_interrupted_by_a_signal_leaves_no_answer_behind(gateway):
    """A run cancelled (SIGUSR1 raises in the worker) while its line waits for an answer: the next request
    reads its own answer on a new connection, never the late one."""

    class Interrupted(BaseException):
        pass

    def interrupt(signum, frame):
        raise Interrupted()

    channel = _channel(gateway)
    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        with pytest.raises(Interrupted):
            channel.request("POST", "/slow", b"")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert channel.sock is None
    assert channel.request("POST", "/next", b"mine")[2] == b"echo:mine"
    channel.close()


def test_a_header_with_a_line_break_is_refused_before_anything_is_sent(gateway):
    channel = _channel(gateway)
    with pytest.raises(ValueError, match="line break"):
        channel.request("POST", "/x", b"", {"X-Opbox-Done": "r-1\r\nX-Evil: 1"})
    assert gateway.requests == []


def test_stream_sends_chunks_as_yielded(gateway):
    channel = _channel(gateway)
    seen = []

    def results():
        for part in (b"one ", b"", b"two ", b"three"):
            seen.append(len(gateway.requests))  # nothing handled yet: the body is still open
            yield part

    status, headers, data = channel.stream("POST", "/next", results(), {"X-Opbox-Group": "3"})
    assert (status, data) == (201, b"echo:one two three") and seen == [0, 0, 0, 0]
    method, path, sent, body = gateway.requests[0]
    assert sent["Transfer-Encoding"] == "chunked" and sent["X-Opbox-Group"] == "3" and "Content-Length" not in sent
    assert channel.request("POST", "/next", b"plain")[2] == b"echo:plain"  # the same line after a stream
    assert len(gateway.connections) == 1
    channel.close()


def test_stream_is_never_retried(gateway):
    channel = _channel(gateway)
    with pytest.raises(GatewayGone):
        channel.stream("POST", "/drop", iter([b"a", b"b"]))
    assert len(gateway.requests) == 1 and channel.sock is None


def test_a_failing_stream_body_leaves_no_half_sent_line(gateway):
    channel = _channel(gateway)

    def results():
        yield b"a"
        raise ValueError("the results broke")

    with pytest.raises(ValueError, match="the results broke"):
        channel.stream("POST", "/next", results())
    assert channel.sock is None
    assert channel.request("POST", "/next", b"fresh")[2] == b"echo:fresh"
    channel.close()


def _certificate(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "opbox test gateway")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def test_an_https_gateway_is_reached_over_tls_and_its_certificate_checked(tmp_path, monkeypatch):
    cert_file, key_file = _certificate(tmp_path)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert_file, key_file)
    server = _serve(tls=tls)
    try:
        untrusted = _channel(server, scheme="https", patience=0.3)
        with pytest.raises(GatewayGone, match="CERTIFICATE_VERIFY_FAILED"):
            untrusted.request("POST", "/x", b"secret")
        assert server.requests == []
        monkeypatch.setenv("SSL_CERT_FILE", str(cert_file))
        channel = _channel(server, scheme="https")
        assert (channel.https, channel.port) == (True, server.server_address[1])
        assert channel.request("POST", "/x", b"secret")[2] == b"echo:secret"
        assert channel.stream("POST", "/y", iter([b"s", b"t"]))[2] == b"echo:st"
        assert channel.request("POST", "/close")[2] == b"bye" and channel.sock is None
        assert [r[3] for r in server.requests] == [b"secret", b"st", b""]
        channel.close()
    finally:
        server.shutdown()
        server.server_close()
