"""The serving proxy's HTTP/1.1 client (``platform/proxy/upstream.py``) against a real server on loopback:
keep-alive reuse, whole and streamed answers, and what it says when a connection ends under a call."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest

from opbox.platform.proxy.upstream import WHOLE, UpstreamError, UpstreamPool


async def _server(handler):
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, "http://opbox:secret@127.0.0.1:%d" % server.sockets[0].getsockname()[1]


async def _read_request(reader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), 0)
    return head, await reader.readexactly(length)


def test_calls_share_a_kept_connection_and_answers_come_whole_or_streamed():
    connections, heads = [], []

    async def handler(reader, writer):
        connections.append(writer)
        try:
            while True:
                head, body = await _read_request(reader)
                heads.append(head)
                if b"/big" in head:
                    big = b"x" * (WHOLE + 10)
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\ndate: replica\r\n\r\n%s" % (len(big), big))
                elif b"/chunks" in head:
                    writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
                else:
                    writer.write(b"HTTP/1.1 201 Created\r\ncontent-length: %d\r\nx-echo: yes\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        except asyncio.IncompleteReadError:
            writer.close()

    async def main():
        server, base = await _server(handler)
        pool = UpstreamPool()
        try:
            for i in range(3):
                answer = await pool.request(base, "POST", f"/call/m{i}", [(b"x-one", b"1")], b"body %d" % i)
                assert (answer.status, answer.body) == (201, b"body %d" % i)
                assert answer.headers == [(b"x-echo", b"yes")]
            assert len(connections) == 1  # one connection, kept alive
            assert heads[0].startswith(b"POST /call/m0 HTTP/1.1\r\n") and b"x-opbox-replica-token: secret" in heads[0]
            big = await pool.request(base, "GET", "/big", [], b"")
            assert big.body is None and big.headers == []  # streamed; the replica's date is the gateway's to send
            assert b"".join([chunk async for chunk in big.stream()]) == b"x" * (WHOLE + 10)
            chunked = await pool.request(base, "GET", "/chunks", [], b"")
            assert b"".join([chunk async for chunk in chunked.stream()]) == b"abcde"
            again = await pool.request(base, "POST", "/call/last", [], b"!")
            assert again.body == b"!" and len(connections) == 1
        finally:
            await pool.close()
            server.close()

    asyncio.run(main())


def test_a_connection_closed_by_the_replica_while_idle_is_not_reused():
    connections = []

    async def handler(reader, writer):
        connections.append(writer)
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()  # an idle keep-alive connection the replica ends (drained, timed out, killed)

    async def main():
        server, base = await _server(handler)
        pool = UpstreamPool()
        try:
            assert (await pool.request(base, "POST", "/call/a", [], b"")).body == b"ok"
            await asyncio.sleep(0.05)  # the FIN arrives; whether the loop saw it yet or not, the kernel has
            assert (await pool.request(base, "POST", "/call/b", [], b"")).body == b"ok"
            assert len(connections) == 2
        finally:
            await pool.close()
            server.close()

    asyncio.run(main())


def test_a_call_whose_connection_ended_before_it_was_written_goes_on_another():
    """Calls go out at the end of the event loop's step; one whose connection ended in between was never sent:
    it goes on another connection, or, with no tries left, fails as not sent (``sent=False``, so the proxy may
    send it again); one the replica took and then dropped may have run (``sent=True``)."""
    taken = []

    async def handler(reader, writer):
        try:
            while True:
                head, _ = await _read_request(reader)
                taken.append(head.split(b" ")[1])
                if b"/drop" in head:
                    writer.close()  # took the call, then ended without an answer
                    return
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        except asyncio.IncompleteReadError:
            writer.close()

    async def queued_then_closed(pool, base, **kwargs):
        call = asyncio.ensure_future(pool.request(base, "POST", "/call/a", [], b"x", **kwargs))
        while not pool._queued:  # connected, and the call queued for the end of the step
            await asyncio.sleep(0)
        pool._queued[0].close()  # the connection ends before the step's end
        return await call

    async def main():
        server, base = await _server(handler)
        pool = UpstreamPool()
        try:
            assert (await queued_then_closed(pool, base)).body == b"ok"
            assert taken == [b"/call/a"]  # sent once, on the second connection
            with pytest.raises(UpstreamError) as unsent:
                await queued_then_closed(pool, base, tries=1)
            assert unsent.value.sent is False and taken == [b"/call/a"]
            with pytest.raises(UpstreamError) as dropped:
                await pool.request(base, "POST", "/drop", [], b"x")
            assert dropped.value.sent is True and "before answering" in str(dropped.value)
        finally:
            await pool.close()
            server.close()

    asyncio.run(main())


def test_a_kept_connection_the_replica_closed_unseen_by_the_loop_is_found_when_the_call_is_sent():
    """The replica (a plain socket server on its own thread) closes an idle kept-alive connection while the
    event loop is busy (it has not read the EOF yet): the call taken for it is checked with the kernel when
    the step's calls are sent, and goes on a new connection instead."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    close_first = threading.Event()
    requests = []

    def serve_one(conn):
        with conn:
            buf = b""
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                buf = buf[1:]  # the one-byte body
                requests.append(head.split(b" ")[1])
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                if len(requests) == 1:
                    close_first.wait(10)
                    return  # closes the first connection, idle and kept alive on the client's side

    def server():
        for _ in range(2):
            conn, _ = listener.accept()
            threading.Thread(target=serve_one, args=(conn,), daemon=True).start()

    threading.Thread(target=server, daemon=True).start()

    async def main():
        pool = UpstreamPool()
        base = f"http://127.0.0.1:{port}"
        try:
            assert (await pool.request(base, "POST", "/call/a", [], b"x")).body == b"ok"
            close_first.set()
            time.sleep(0.2)  # the FIN arrives while the loop is blocked: it has not seen it
            [kept] = pool.idle[base]
            assert not kept.ended
            assert (await pool.request(base, "POST", "/call/b", [], b"x")).body == b"ok"
            assert requests == [b"/call/a", b"/call/b"] and kept.ended
        finally:
            await pool.close()
            listener.close()

    asyncio.run(main())
