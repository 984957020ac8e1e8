"""The server's CPU per request on the gateway's HTTP protocol: a request answered through uvicorn's ASGI cycle
(an app that answers at once, as ``serve_call`` sends a whole answer) against the same request taken by the
protocol's lean way (``opbox.http_lean``: the handler called directly, the answer in one write). Nothing else
runs in the server, so the difference is the cycle's own cost. The server's thread CPU is read from its clock
(user + system, including the socket syscalls); the load comes from a separate process (keep-alive clients).

    python bench/bench_lean_protocol.py [--requests 20000] [--clients 32] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import uvicorn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from opbox.http_lean import LeanRoute  # noqa: E402
from opbox.http_protocol import http_protocol  # noqa: E402

BODY = b'{"result": 1}'
HEADERS = [(b"content-type", b"application/json")]

LOAD = r"""
import asyncio, sys
port, n, clients = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
request = b"POST /ws/serve/echo/ping HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 8\r\n\r\n{\"x\": 1}"
async def client(count):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for _ in range(count):
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
    writer.close()
async def main():
    await asyncio.gather(*(client(n // clients) for _ in range(clients)))
asyncio.run(main())
"""


async def asgi_app(scope, receive, send) -> None:  # what the ASGI way does for a whole answer
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200,
                "headers": [*HEADERS, (b"content-length", b"%d" % len(BODY))]})
    await send({"type": "http.response.body", "body": BODY})


async def lean_handle(exchange, *args) -> None:
    while (await exchange.receive()).get("more_body"):
        pass
    if not exchange.answer(200, HEADERS, BODY):
        raise RuntimeError("the lean answer was refused")


def match(path: str):
    parts = path.split("/", 4)
    return (parts[1], parts[3], parts[4]) if len(parts) == 5 and parts[2] == "serve" else None


def run(lean: bool, requests: int, clients: int) -> float:
    """Server CPU µs per request."""
    http = http_protocol(lean=LeanRoute(b"/serve/", match, lean_handle) if lean else None)
    config = uvicorn.Config(asgi_app, host="127.0.0.1", port=0, log_level="warning", access_log=False,
                            lifespan="off", http=http, loop="auto")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    clock = time.pthread_getcpuclockid(thread.ident)
    subprocess.run([sys.executable, "-c", LOAD, str(port), "2000", str(clients)], check=True)  # warm up
    before = time.clock_gettime(clock)
    subprocess.run([sys.executable, "-c", LOAD, str(port), str(requests), str(clients)], check=True)
    used = time.clock_gettime(clock) - before
    server.should_exit = True
    thread.join(10)
    return used / (requests // clients * clients) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    figures = {"asgi": [], "lean": []}
    for _ in range(args.repeat):  # alternating
        for way in ("asgi", "lean"):
            figures[way].append(round(run(way == "lean", args.requests, args.clients), 1))
    print(json.dumps({
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(),
        "loadavg": os.getloadavg(), "requests": args.requests, "clients": args.clients,
        "server_cpu_us_per_request": figures,
        "median": {way: statistics.median(v) for way, v in figures.items()},
    }, indent=2))


if __name__ == "__main__":
    main()
