"""What the benches share: percentiles, the product's defaults, a keep-alive HTTP load generator,
and the machine's state (cores, load average, a process's CPU time and memory from /proc)."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # tests/platform_fixture.py: a real platform on a free port

PRODUCT_DEFAULTS = {"OPBOX_SANDBOX": "auto"}  # measure what `make run` runs (the test fixture turns it off)


def pct(values, q) -> float:
    """The q-quantile of a list of seconds, in milliseconds."""
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 3)


def timed_calls(fn, n: int) -> list[float]:
    """The seconds of each of ``n`` calls ``fn(i)``, one after the other."""
    times = []
    for i in range(n):
        t = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t)
    return times


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the machine and its processes (Linux /proc) ----------------------------------------------
TICK = os.sysconf("SC_CLK_TCK")


def machine() -> dict:
    return {"cpus": os.cpu_count(), "python": sys.version.split()[0], "loadavg": list(os.getloadavg())}


def _stat(pid: int) -> list[str]:
    raw = Path(f"/proc/{pid}/stat").read_text()
    return raw[raw.rindex(")") + 2:].split()  # fields from the 3rd on (state, ppid, ...)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (not its children), in seconds."""
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / TICK


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                children.setdefault(int(_stat(int(entry))[1]), []).append(int(entry))
            except (OSError, ValueError):
                pass
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of a process's live descendants (the platform's workers), in seconds."""
    total = 0.0
    for child in descendants(pid):
        try:
            total += cpu_seconds(child)
        except OSError:
            pass
    return total


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    """A process's resident memory (VmRSS) or its peak since it started (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


# -- a keep-alive HTTP/1.1 load generator ------------------------------------------------------
async def _client(url: str, headers: dict, body: bytes, until: float, latencies: list, errors: list) -> None:
    parts = urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    request = (f"POST {target} HTTP/1.1\r\nHost: {parts.netloc}\r\n{head}"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    writer = None
    while time.perf_counter() < until:
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
                writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            started = time.perf_counter()
            writer.write(request)
            status = int((await reader.readline()).split()[1])
            length = 0
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
            if status != 200:
                errors.append(status)
        except (OSError, IndexError, ValueError, asyncio.IncompleteReadError) as exc:
            errors.append(type(exc).__name__)
            if writer is not None:
                writer.close()
            writer = None
            await asyncio.sleep(0.01)
    if writer is not None:
        writer.close()


async def _load(url: str, headers: list[dict], body: bytes, clients: int, seconds: float, warm: float) -> dict:
    warm_until = time.perf_counter() + warm
    warmed: list = []
    await asyncio.gather(*(_client(url, headers[i % len(headers)], body, warm_until, warmed, []) for i in range(clients)))
    latencies, errors = [], []
    started = time.perf_counter()
    until = started + seconds
    await asyncio.gather(*(_client(url, headers[i % len(headers)], body, until, latencies, errors)
                           for i in range(clients)))
    elapsed = time.perf_counter() - started
    answered = len(latencies) - sum(isinstance(e, int) for e in errors)  # 200s (an error answer has a latency too)
    kinds: dict[str, int] = {}
    for e in errors:  # an HTTP status, or the exception that broke the connection
        kinds[str(e)] = kinds.get(str(e), 0) + 1
    return {"clients": clients, "seconds": round(elapsed, 2), "requests": len(latencies),
            "rps": round(answered / elapsed) if elapsed else 0,
            "p50_ms": pct(latencies, 0.50) if latencies else None, "p95_ms": pct(latencies, 0.95) if latencies else None,
            "p99_ms": pct(latencies, 0.99) if latencies else None, "errors": len(errors), "error_kinds": kinds,
            "warm_requests": len(warmed)}


def load(url: str, headers: dict | list[dict], body: bytes, clients: int, seconds: float, warm: float = 0.5) -> dict:
    """``clients`` connections each sending POST ``body`` one after the other for ``seconds`` (after ``warm``);
    client i sends ``headers[i % len(headers)]`` when given a list (one token each, say). ``rps`` counts
    the 200 answers; ``errors`` the others and the broken connections, by kind."""
    headers = headers if isinstance(headers, list) else [headers]
    try:
        import uvloop

        return uvloop.run(_load(url, headers, body, clients, seconds, warm))
    except ImportError:
        return asyncio.run(_load(url, headers, body, clients, seconds, warm))
