"""Big data: a value of N MiB (bytes, a numpy array, a DataFrame) as argument and result of a deployed echo,
against pickling + unpickling it twice here (the least a round trip must do), on a real gateway with the
local store, or S3 (SeaweedFS) with --s3. Each size gets a fresh platform, so the gateway's peak RSS
(VmHWM) is that size's. Also reports how the large payloads' bytes travelled (opbox_large_payload_bytes:
``url`` = straight to and from the store with signed URLs; ``gateway`` = streamed through the gateway).

    .venv/bin/python bench/bench_big_data.py --mib 50 500 [--s3] [--out bench/runs/X.json]

Needs numpy and pandas for the array and DataFrame (``make bench`` installs them); bytes always run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pickle
import re
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

CODE = """
from opbox import operator

@operator()
def echo(value):
    return value
"""
METRICS_TOKEN = "bench-big-data"


def values(mib: int) -> dict:
    size = mib * 1024 * 1024
    out = {"bytes": os.urandom(size)}
    try:
        import numpy as np
        import pandas as pd
    except ImportError:
        return out
    out["numpy"] = np.random.default_rng(0).random(size // 8)
    rows = size // 8 // 4
    out["dataframe"] = pd.DataFrame({f"c{i}": np.random.default_rng(i).random(rows) for i in range(4)})
    return out


def peak_rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return -1.0


def via(plat) -> dict:
    text = httpx.get(f"{plat.url}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).text
    found = {"url": 0.0, "gateway": 0.0}
    for way, value in re.findall(r'opbox_large_payload_bytes_total\{via="(\w+)"\} (\S+)', text):
        found[way] = float(value)
    return {way: round(b / 2**20, 1) for way, b in found.items()}


def measure(mib: int, repeat: int, env: dict, code: Path) -> dict:
    from conftest import user_module
    from platform_fixture import running_platform

    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp, \
            running_platform(Path(tmp) / "home", extra_env={**env, "OPBOX_METRICS_TOKEN": METRICS_TOKEN,
                                                            "OPBOX_MAX_PAYLOAD": str(2 * 1024**3)}) as plat, \
            user_module(code, f"bigbench{mib}", CODE) as mod:
        echo = mod.echo.deploy(client=plat.client(), quiet=True)
        for kind, value in values(mib).items():
            echo(value[:1])  # the worker imports numpy / pandas once, not in the figure
            local, remote = [], []
            for _ in range(repeat):
                t = time.perf_counter()
                for _ in range(2):
                    pickle.loads(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
                local.append(time.perf_counter() - t)
                gc.collect()
                t = time.perf_counter()
                back = echo(value)
                remote.append(time.perf_counter() - t)
                assert type(back) is type(value) and len(back) == len(value)
                del back
                gc.collect()
            lo, re_ = statistics.median(local), statistics.median(remote)
            out[kind] = {"round_trip_s": round(re_, 3), "local_2x_pickle_unpickle_s": round(lo, 3),
                         "ratio_to_local": round(re_ / lo, 2), "mib_per_s": round(2 * mib / re_, 1)}
            del value
        out["gateway_peak_rss_mib"] = peak_rss_mib(plat.proc.pid)
        try:
            out["large_payload_mib_via"] = via(plat)
        except Exception as exc:  # an opbox before the metric
            out["large_payload_mib_via"] = f"unavailable: {exc}"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, nargs="+", default=[50, 500])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--s3", action="store_true", help="the store on SeaweedFS (tests/s3server.py)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "store": "s3" if args.s3 else "local",
                    "cpus": os.cpu_count(), "loadavg_at_start": list(os.getloadavg())}
    with ExitStack() as stack, tempfile.TemporaryDirectory() as code:
        env: dict = {}
        if args.s3:
            from s3server import run_seaweedfs

            from opbox.platform.store.s3 import S3Store

            s3 = stack.enter_context(run_seaweedfs())
            S3Store("bench", endpoint_url=s3.endpoint_url, access_key=s3.access_key, secret_key=s3.secret_key,
                    region=s3.region).create_bucket_if_missing()
            env = {"OPBOX_STORE_URL": f"s3://bench/p?endpoint={s3.endpoint_url}&path_style=1&region={s3.region}",
                   "AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key}
        for mib in args.mib:
            print(f"bench_big_data: {mib} MiB ...", file=sys.stderr)
            result[f"{mib}_mib"] = measure(mib, args.repeat, env, Path(code))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
