"""The serving proxy's HTTP/1.1 client (``platform/proxy/upstream.py``) against a real server on loopback:
keep-alive reuse, whole and streamed answers, and what it says when a connection ends under a call."""

from __future__ import annotations

import asyncio

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


def test_a_call_whose_connection_ended_before_it_was_written_says_it_was_not_sent():
    """Calls go out at the end of the event loop's step; one whose connection ended in between was never sent,
    so the proxy may send it again (``sent=False``); one the replica took and then dropped may have run."""

    async def handler(reader, writer):
        try:
            while True:
                await _read_request(reader)
                writer.close()  # took the call, then ended without an answer
                return
        except asyncio.IncompleteReadError:
            writer.close()

    async def main():
        server, base = await _server(handler)
        pool = UpstreamPool()
        try:
            call = asyncio.ensure_future(pool.request(base, "POST", "/call/a", [], b"x"))
            while not pool._queued:  # connected, and the call queued for the end of the step
                await asyncio.sleep(0)
            pool._queued[0].close()  # the connection ends before the step's end
            with pytest.raises(UpstreamError) as unsent:
                await call
            assert unsent.value.sent is False
            with pytest.raises(UpstreamError) as dropped:
                await pool.request(base, "POST", "/call/b", [], b"x")
            assert dropped.value.sent is True and "before answering" in str(dropped.value)
        finally:
            await pool.close()
            server.close()

    asyncio.run(main())
