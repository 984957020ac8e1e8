"""One signed upload of N MiB to the local store through the gateway's HTTP protocol, alone: the uploader's wall
time (``http.client``, as the SDK's ``signed_http`` sends, in another process) and the server process's CPU
(event loop and writer threads; ``fsync`` included) per upload. Run it with another tree's interpreter to
compare (``/other/tree/.venv/bin/python bench/bench_store_put.py``: the opbox it imports is that tree's).

    python bench/bench_store_put.py [--mib 50] [--repeat 10]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import uvicorn
from starlette.applications import Starlette

import opbox
from opbox.http_protocol import http_protocol
from opbox.platform.store.local import LocalStore

UPLOAD = r"""
import http.client, sys, time, urllib.parse
size, urls = int(sys.argv[1]), sys.argv[2:]
data = memoryview(bytes(range(256)) * (size // 256))
for url in urls:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port)
    start = time.perf_counter()
    conn.request("PUT", f"{parts.path}?{parts.query}", body=data,
                 headers={"Content-Type": "application/octet-stream", "Content-Length": str(len(data))})
    answer = conn.getresponse()
    answer.read()
    assert answer.status == 200, answer.status
    print(time.perf_counter() - start, flush=True)
    conn.close()
"""


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    size = args.mib * 1024 * 1024
    with tempfile.TemporaryDirectory(dir=os.environ.get("OPBOX_BENCH_TMP")) as root:
        store = LocalStore(root, b"bench-secret", "http://unused")
        app = Starlette(routes=store.routes())
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False,
                                lifespan="off", http=http_protocol("/_store/"), loop="auto")
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.01)
        store.base_url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
        urls = [store.upload_url(f"put/{n}").url for n in range(args.repeat)]
        before = cpu()
        out = subprocess.run([sys.executable, "-c", UPLOAD, str(size), *urls], check=True, capture_output=True,
                             text=True).stdout
        used = cpu() - before
        server.should_exit = True
        thread.join(10)
        assert all(store.size(f"put/{n}") == size for n in range(args.repeat))
    walls = [float(line) * 1000 for line in out.split()]
    print(json.dumps({
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "opbox": os.path.dirname(opbox.__file__),
        "loadavg": [round(x, 2) for x in os.getloadavg()], "mib": args.mib, "repeat": args.repeat,
        "upload_ms_median": round(statistics.median(walls), 1), "upload_ms_each": [round(w, 1) for w in walls],
        "server_cpu_ms_per_upload": round(used / args.repeat * 1000, 1),
    }))


if __name__ == "__main__":
    main()
