"""opbox's figures (issue 12's goal table) and their ratios to Ray and Dask measured in the same run,
printed as JSON. Never asserted in tests (tests/test_bench.py only checks the fields and their types).

    python bench/bench.py [--quick] [--million [--big-map-budget S]] [--no-peers] [--out FILE]
    python bench/bench.py --only serve [--quick] [--out FILE]     (one figure alone: the served class)

Runs the peers first (bench/peers.py in the .bench-peers virtualenv that `make bench-peers` makes, as a
subprocess; without it the JSON says so and the ratios are null), then starts a fresh platform as
`make run` runs it (its own OPBOX_HOME, a free port, the product's defaults) and measures:
  - warm call of a trivial deployed function: p50, p99 (ms), and their ratios to Ray's and Dask's;
  - the gateway's CPU time per warm call, read from /proc before and after N calls (and the workers');
  - .map over 10,000 trivial items (runs/s), and its ratio to the peers' fan-out (tasks/s);
  - .map over 1,000,000 items (with --million; --quick does a small one): client and gateway peak RSS,
    items/s against the 10,000-item figure; left after --big-map-budget seconds (its rate so far reported);
  - 50 concurrent callers for 30 s (keep-alive HTTP, the SDK's envelope): calls/s, p50/p99, errors;
  - 50 MiB of bytes, a numpy array and a DataFrame as argument and result: the round trip against
    2x (pickle + unpickle) locally;
  - a served class through the gateway against its replica served directly, 32 clients;
  - the status of one run with 1,000,000 runs stored (seeded through the records layer);
  - ProcessPoolExecutor.submit().result(), the cross-process floor; deploy to first result.
--quick does CI-sized versions of all of them. The machine's cores and load average (start and end)
are in "machine": other work on the machine moves every figure, which is why only ratios from one
run are compared.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from harness import PRODUCT_DEFAULTS, cpu_seconds, load, machine, pct, rss_mib, timed_calls, tree_cpu_seconds

HERE = Path(__file__).resolve().parent
PEERS_PYTHON = HERE.parent / ".bench-peers" / "bin" / "python"

FULL = dict(calls=2000, cpu_calls=10_000, map=10_000, big_map=1_000_000, big_map_budget=600.0, callers=50,
            callers_seconds=30.0, payload_mib=50, payload_repeat=3, served_clients=32, served_seconds=3.0,
            served_repeat=3, stored_runs=1_000_000, status_calls=2000)
QUICK = dict(calls=200, cpu_calls=500, map=1000, big_map=5000, big_map_budget=120.0, callers=50, callers_seconds=2.0,
             payload_mib=1, payload_repeat=1, served_clients=32, served_seconds=1.0, served_repeat=1,
             stored_runs=20_000, status_calls=200)

CODE = """from opbox import operator


@operator()
def square(x=2):
    return x * x


@operator()
def echo(x=None):
    return x
"""

BIG_MAP = """
import json, os, resource, sys, threading, time
from opbox.client import Client
from opbox.config import ClientConfig
from opbox.remote import RemoteFunction

url, token, workspace, job, n, budget = sys.argv[1:7]
n, budget = int(n), float(budget)
square = RemoteFunction(job, client=Client(ClientConfig(url, token, workspace)))
out, marks, last = [], [], [time.perf_counter()]
t = time.perf_counter()
results = square.imap(range(n), progress=False)  # .map's loop, with a way out when the budget is spent
lock = threading.Lock()


def peak_rss_mib():  # VmHWM: getrusage's ru_maxrss would include the bench's own peak (kept across exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def report(error=None):
    mapper = results.gi_frame.f_locals.get("self") if results.gi_frame else None
    batch = {}
    if mapper is not None:
        try:
            batch = square.client.get(f"/batches/{mapper.batch_id}").json()
        except Exception as exc:
            batch = {"error": repr(exc)}
    with lock:
        print(json.dumps({"seconds": time.perf_counter() - t, "done": len(out), "progress": marks, "error": error,
                          "batch": batch, "client_peak_rss_mib": peak_rss_mib()}),
              flush=True)
    return mapper


def watchdog():  # results come in input order: one item that never ends stalls the loop before its budget check
    while True:
        time.sleep(1.0)
        if time.perf_counter() - t > budget + 60:
            mapper = report(f"stalled: no result in input order for {time.perf_counter() - last[0]:.0f} s")
            if mapper is not None:
                mapper._cancel()
            os._exit(0)


threading.Thread(target=watchdog, daemon=True).start()
error = None
try:
    for result in results:
        out.append(result)
        last[0] = time.perf_counter()
        if len(out) % max(1, n // 20) == 0:
            marks.append([len(out), round(time.perf_counter() - t, 2)])
        if time.perf_counter() - t > budget:
            break
except Exception as exc:  # the map failed: say how far it got
    error = f"{type(exc).__name__}: {exc}"
assert not out or (out[:3] == [0, 1, 4][:len(out)] and out[-1] == (len(out) - 1) ** 2)
report(error)
results.close()  # a map left early cancels its remaining runs
"""


def _square(x):
    return x * x


def ratio(a, b, digits: int = 3):
    return round(a / b, digits) if a is not None and b else None


def latency(times: list[float]) -> dict:
    return {"p50": pct(times, 0.5), "p99": pct(times, 0.99), "mean": round(statistics.mean(times) * 1000, 3),
            "n": len(times)}


# -- the peers, first, in their own virtualenv ----------------------------------------------------
def peers(size: dict, python: Path) -> dict:
    if not python.exists():
        why = f"no peers' virtualenv ({python.parent.parent.name}): `make bench-peers` makes it; ratios are null"
        print(f"bench: {why}", file=sys.stderr)
        return {"skipped": why}
    print("bench: measuring the peers (Ray, Dask) ...", file=sys.stderr)
    try:
        done = subprocess.run([str(python), str(HERE / "peers.py"), "--calls", str(size["calls"]), "--map",
                               str(size["map"])], capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        return {"error": "peers.py did not end in 900 s"}
    if done.returncode != 0:
        return {"error": f"peers.py exited with {done.returncode}: {done.stderr[-2000:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def process_pool_floor(calls: int) -> dict:
    with ProcessPoolExecutor(1) as pool:
        pool.submit(_square, 1).result()
        return latency(timed_calls(lambda i: pool.submit(_square, i).result(), calls))


# -- opbox -----------------------------------------------------------------------------------
def deploy(plat, code: Path, out: dict):
    sys.path.insert(0, str(code))
    import bench_fns

    client = plat.client()
    t = time.perf_counter()
    square = bench_fns.square.deploy(client=client, quiet=True)
    square(3)
    out["first_deploy_to_first_result_s"] = round(time.perf_counter() - t, 3)
    (code / "bench_fns.py").write_text(CODE + "\n# changed\n")
    t = time.perf_counter()
    square = bench_fns.square.deploy(client=client, quiet=True)
    square(3)
    out["redeploy_cached_requirements_to_first_result_s"] = round(time.perf_counter() - t, 3)
    return square, bench_fns.echo.deploy(client=client, quiet=True)


def gateway_cpu(plat, square, calls: int) -> dict:
    """CPU seconds of the gateway process (and of its workers, and of this client) over ``calls`` warm calls."""
    pid = plat.proc.pid
    gw, workers, client, t = cpu_seconds(pid), tree_cpu_seconds(pid), time.process_time(), time.perf_counter()
    timed_calls(square, calls)
    took = time.perf_counter() - t
    per_call = lambda before, after: round((after - before) / calls * 1000, 4)  # noqa: E731
    return {"calls": calls, "gateway_ms_per_call": per_call(gw, cpu_seconds(pid)),
            "workers_ms_per_call": per_call(workers, tree_cpu_seconds(pid)),
            "client_ms_per_call": per_call(client, time.process_time()),
            "wall_ms_per_call": round(took / calls * 1000, 4)}


def big_map(plat, square, items: int, small_rate: float, budget: float) -> dict:
    """A map in a child process (its own peak RSS), sampling the gateway's RSS meanwhile; one that has not
    ended after ``budget`` seconds is left (its remaining runs cancelled) and reported with its rate so far."""
    pid, peak, stop = plat.proc.pid, [rss_mib(plat.proc.pid)], threading.Event()
    before = peak[0]

    def sample():
        while not stop.wait(0.2):
            peak.append(rss_mib(pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        done = subprocess.run([sys.executable, "-c", BIG_MAP, plat.url, plat.token, plat.workspace, square.job_id,
                               str(items), str(budget)], capture_output=True, text=True, timeout=budget + 600)
    except subprocess.TimeoutExpired as exc:
        return {"items": items, "error": f"the map's process did not end in {exc.timeout:.0f} s"}
    finally:
        stop.set()
        sampler.join()
    if done.returncode != 0 or not done.stdout.strip():
        return {"items": items, "error": done.stderr[-2000:] or f"the map's process exited with {done.returncode}"}
    child = json.loads(done.stdout.strip().splitlines()[0])
    finished = max(child["done"], child["batch"].get("done") or 0)  # the gateway's count: results in any order
    rate = finished / child["seconds"]
    return {"items": items, "completed": child["done"] == items, "done": child["done"], "finished": finished,
            "budget_s": budget,
            "error": child["error"], "batch_on_the_gateway": child["batch"],
            "seconds": round(child["seconds"], 2), "items_per_s": round(rate, 1), "progress": child["progress"],
            "share_of_10k_rate": ratio(rate, small_rate), "client_peak_rss_mib": round(child["client_peak_rss_mib"], 1),
            "gateway_rss_before_mib": before, "gateway_peak_rss_mib": max(peak)}


def concurrent_callers(plat, square, clients: int, seconds: float) -> dict:
    from bench_serve import member_tokens
    from opbox import serialization

    url = f"{plat.url}/{plat.workspace}/job/{square.job_id}/runs?wait=60"
    headers = [{"Authorization": f"Bearer {t}", "Content-Type": serialization.CONTENT_TYPE}
               for t in member_tokens(plat, clients)]
    pid = plat.proc.pid
    before = cpu_seconds(pid)
    figures = load(url, headers, serialization.dump_args((1,), {}), clients, seconds, warm=1.0)
    # the CPU includes the 1 s warm-up's calls, which are not counted: a slight overestimate
    used = cpu_seconds(pid) - before
    return {"clients": clients, "tokens": clients, "seconds": figures["seconds"], "calls": figures["requests"],
            "calls_per_s": figures["rps"], "p50_ms": figures["p50_ms"], "p99_ms": figures["p99_ms"],
            "errors": figures["errors"], "error_kinds": figures["error_kinds"],
            "gateway_cpu_share": round(used / (figures["seconds"] + 1.0), 3)}


def payload_values(mib: int) -> dict:
    size = mib * 1024 * 1024
    values = {"bytes": os.urandom(size)}
    try:
        import numpy as np
    except ImportError:
        return values
    values["numpy"] = np.random.default_rng(0).random(size // 8)
    try:
        import pandas as pd
    except ImportError:
        return values
    rows = size // 8 // 4
    values["dataframe"] = pd.DataFrame({f"c{i}": np.arange(rows, dtype="float64") * i for i in range(4)})
    return values


def payloads(echo, mib: int, repeat: int) -> dict:
    """A value of ``mib`` MiB as argument and result of an echo, against pickling + unpickling it twice here."""
    out: dict = {"mib": mib}
    values = payload_values(mib)
    for kind in ("bytes", "numpy", "dataframe"):
        if kind not in values:
            out[kind] = {"skipped": f"{'numpy' if kind == 'numpy' else 'pandas'} is not installed (make bench installs it)"}
            continue
        value = values[kind]
        echo(value[:1])  # the worker imports numpy / pandas once, not in the figure
        local, remote = [], []
        for _ in range(repeat):
            t = time.perf_counter()
            for _ in range(2):
                pickle.loads(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
            local.append(time.perf_counter() - t)
            t = time.perf_counter()
            back = echo(value)
            remote.append(time.perf_counter() - t)
        assert type(back) is type(value) and len(back) == len(value)
        lo, re_ = statistics.median(local), statistics.median(remote)
        out[kind] = {"round_trip_s": round(re_, 4), "local_2x_pickle_unpickle_s": round(lo, 4),
                     "ratio_to_local": ratio(re_, lo, 2)}
    return out


def served_class(plat, folder: Path, clients: int, seconds: float, repeat: int) -> dict:
    from bench_serve import gateway_vs_direct

    f = gateway_vs_direct(plat, folder, [clients], seconds, repeat)[f"{clients}_clients"]
    return {"clients": clients, "gateway_rps": f["gateway"]["rps"], "direct_rps": f["direct"]["rps"],
            "gateway_share_of_direct_rps": f["gateway_share_of_direct_rps"], "added_p50_ms": f["added_p50_ms"],
            "added_p95_ms": f["added_p95_ms"], "rps_of_each_run": f["rps_of_each_run"],
            "cpu_us_per_call": {"gateway": f["gateway"]["cpu_us_per_call"], "direct": f["direct"]["cpu_us_per_call"]},
            "errors": {"gateway": f["gateway"]["error_kinds"], "direct": f["direct"]["error_kinds"]}}


# -- status with many runs stored ------------------------------------------------------------
def seed_runs(state: Path, template_run: str, count: int) -> None:
    """``count`` finished runs like ``template_run`` (its job, arguments and result), written straight into
    the state file through the records layer while the platform is stopped (its call path would take minutes)."""
    from opbox.platform.ids import new_id
    from opbox.platform.records.base import NewRun
    from opbox.platform.records.sqlite import open_sqlite
    from opbox.platform.records.sqlite.runs import INSERT, INSERT_PAYLOAD, payload_row

    records = open_sqlite(state)
    try:
        run = records.runs.get(template_run)
        args, result = records.runs.args(run.id), records.runs.result(run.id)
        chunk = 100_000
        for start in range(0, count, chunk):
            new = [NewRun(new_id("r"), run.workspace, run.job_id, run.version, run.trigger, time.time(),
                          run.max_retries, run.timeout) for _ in range(min(chunk, count - start))]
            with records.database.tx() as db:
                db.executemany(INSERT, new)
                db.executemany(INSERT_PAYLOAD, [payload_row(r.id, "args", args) for r in new])
                db.executemany(INSERT_PAYLOAD, [payload_row(r.id, "result", result) for r in new])
                db.execute("UPDATE runs SET status = 'succeeded', started_at = created_at, finished_at = created_at, "
                           "worker = 'seed' WHERE status = 'queued'")
    finally:
        records.close()


def status_p(plat, run_id: str, calls: int) -> list[float]:
    with plat.http() as http:
        path = f"/{plat.workspace}/runs/{run_id}"
        for _ in range(20):
            http.get(path).raise_for_status()
        return timed_calls(lambda i: http.get(path).raise_for_status(), calls)


def status_with_stored_runs(home: Path, square_fn, count: int, calls: int) -> dict:
    from platform_fixture import running_platform

    with running_platform(home, extra_env=PRODUCT_DEFAULTS) as plat:
        run_id = square_fn.deploy(client=plat.client(), quiet=True).submit(3).wait()["id"]
        few = status_p(plat, run_id, calls)
    t = time.perf_counter()
    seed_runs(home / "state.db", run_id, count)
    seeded = time.perf_counter() - t
    (home / "gateway.log").rename(home / "gateway-1.log")  # the fixture finds the address in a fresh log
    with running_platform(home, extra_env=PRODUCT_DEFAULTS) as plat:
        many = status_p(plat, run_id, calls)
    return {"stored_runs": count + 1, "p50_ms": pct(many, 0.5), "p99_ms": pct(many, 0.99),
            "one_run_stored_p50_ms": pct(few, 0.5), "state_file_mib": round((home / "state.db").stat().st_size / 2**20, 1),
            "seed_seconds": round(seeded, 1), "calls": calls}


# -- the ratios and the goals --------------------------------------------------------------------
def goal(figure, value, target, met) -> dict:
    return {"figure": figure, "value": value, "goal": target, "met": None if value is None else bool(met)}


def served_goal(sv: dict) -> dict:
    return goal(f"served class via gateway / direct, {sv['clients']} clients: throughput share, added p95 ms",
                [sv["gateway_share_of_direct_rps"], sv["added_p95_ms"]], ">= 0.9, <= 1",
                (sv["gateway_share_of_direct_rps"] or 0) >= 0.9 and sv["added_p95_ms"] <= 1)


def ratios_and_goals(out: dict) -> tuple[dict, list[dict]]:
    ratios = {}
    for peer in ("ray", "dask"):
        p = out["peers"].get(peer) or {}
        ok = "warm_call_ms" in p
        ratios[f"warm_call_p50_vs_{peer}"] = ratio(out["warm_call_ms"]["p50"], p["warm_call_ms"]["p50"]) if ok else None
        ratios[f"warm_call_p99_vs_{peer}"] = ratio(out["warm_call_ms"]["p99"], p["warm_call_ms"]["p99"]) if ok else None
        ratios[f"map_runs_per_s_vs_{peer}"] = ratio(out["map"]["runs_per_s"], p["map"]["tasks_per_s"]) if ok else None
    big, cc, sv, st = out["map_large"], out["concurrent_callers"], out["served_class"], out["status_with_stored_runs"]

    pays = [out["payloads"][k].get("ratio_to_local") for k in ("bytes", "numpy", "dataframe")]
    big_ok = "items_per_s" in big
    big_met = (big_ok and big["completed"] and big["client_peak_rss_mib"] <= 300 and big["gateway_peak_rss_mib"] <= 400
               and big["share_of_10k_rate"] >= 0.8)
    goals = [
        goal("warm call p50 / Ray's", ratios["warm_call_p50_vs_ray"], "<= 0.5",
             (ratios["warm_call_p50_vs_ray"] or 9) <= 0.5),
        goal("warm call p99 / Ray's", ratios["warm_call_p99_vs_ray"], "<= 0.7",
             (ratios["warm_call_p99_vs_ray"] or 9) <= 0.7),
        goal(f"map of {out['map']['items']:,} runs/s / Ray's tasks/s", ratios["map_runs_per_s_vs_ray"], ">= 4",
             (ratios["map_runs_per_s_vs_ray"] or 0) >= 4),
        goal(f"map of {big['items']:,}: completed, client RSS MiB, gateway RSS MiB, items/s / 10k figure",
             [big["completed"], big["client_peak_rss_mib"], big["gateway_peak_rss_mib"], big["share_of_10k_rate"]]
             if big_ok else None, "yes, <= 300, <= 400, >= 0.8",
             big_met),
        goal("gateway CPU per warm call, ms", out["gateway_cpu_per_warm_call"]["gateway_ms_per_call"], "<= 0.3",
             out["gateway_cpu_per_warm_call"]["gateway_ms_per_call"] <= 0.3),
        goal(f"{cc['clients']} concurrent callers: calls/s, p99 ms, errors", [cc["calls_per_s"], cc["p99_ms"], cc["errors"]],
             ">= 2000, <= 50, 0", cc["calls_per_s"] >= 2000 and (cc["p99_ms"] or 1e9) <= 50 and cc["errors"] == 0),
        goal(f"{out['payloads']['mib']} MiB bytes/numpy/DataFrame round trip / 2x local pickle+unpickle", pays, "<= 3",
             all(p is not None and p <= 3 for p in pays)),
        served_goal(sv),
        goal(f"status of one run with {st['stored_runs']:,} runs stored, p50 ms", st["p50_ms"], "<= 2", st["p50_ms"] <= 2),
    ]
    return ratios, goals


def table(out: dict) -> str:
    """The goals as a few lines for a person (stderr; the JSON on stdout is the record)."""
    m = out["machine"]
    peers = out["peers"]
    lines = [f"opbox bench ({out['mode']}, {out['date']}): {m['cpus']} cores, load average {m['loadavg'][0]:.2f} at "
             f"start, {m['loadavg_at_end'][0]:.2f} at end"]
    if "skipped" in peers or "error" in peers:
        lines.append(f"peers: {peers.get('skipped') or peers.get('error')}")
    else:
        for name in ("ray", "dask"):
            p = peers.get(name, {})
            lines.append(f"{name} {p.get('version', '?')}: " + (
                f"warm call p50 {p['warm_call_ms']['p50']} ms, p99 {p['warm_call_ms']['p99']} ms; "
                f"{p['map']['items']:,} tasks {p['map']['tasks_per_s']:,}/s" if "map" in p else p.get("error", "?")))
    lines.append(f"opbox: warm call p50 {out['warm_call_ms']['p50']} ms, p99 {out['warm_call_ms']['p99']} ms; "
                 f"map {out['map']['items']:,} items {out['map']['runs_per_s']:,} runs/s")
    width = max(len(g["figure"]) for g in out["goals"])
    for g in out["goals"]:
        met = {True: "met", False: "NOT met", None: "-"}[g["met"]]
        lines.append(f"  {g['figure']:<{width}}  {json.dumps(g['value']):>26}  goal {g['goal']:<27} {met}")
    return "\n".join(lines)


def write(out: dict, path: Path | None) -> None:
    text = json.dumps(out, indent=2)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    print(text)


def only_served(size: dict, path: Path | None) -> None:
    """``--only serve``: the served-class figure alone, on a fresh platform, in a fraction of a minute."""
    from platform_fixture import running_platform

    out: dict = {"mode": "quick" if size is QUICK else "full", "only": "serve",
                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine()}
    with tempfile.TemporaryDirectory() as tmp, running_platform(Path(tmp) / "home", extra_env=PRODUCT_DEFAULTS) as plat:
        out["served_class"] = served_class(plat, Path(tmp) / "serve", size["served_clients"], size["served_seconds"],
                                           size["served_repeat"])
    out["machine"]["loadavg_at_end"] = list(os.getloadavg())
    out["goals"] = [served_goal(out["served_class"])]
    write(out, path)
    g = out["goals"][0]
    print(f"{g['figure']}: {json.dumps(g['value'])}, goal {g['goal']}: {'met' if g['met'] else 'NOT met'} "
          f"(load average {out['machine']['loadavg'][0]:.2f} at start)", file=sys.stderr)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized versions of every figure (a smoke run)")
    parser.add_argument("--million", action="store_true", help="also map 1,000,000 items (many minutes)")
    parser.add_argument("--big-map-budget", type=float, help="seconds before the large map is left (600; quick 120)")
    parser.add_argument("--no-peers", action="store_true", help="skip Ray and Dask (ratios are null)")
    parser.add_argument("--peers-python", type=Path, default=PEERS_PYTHON)
    parser.add_argument("--out", type=Path, help="also write the JSON to this file")
    parser.add_argument("--only", choices=["serve"], help="only this figure (no peers): serve, the served class")
    args = parser.parse_args()
    size = QUICK if args.quick else FULL
    if args.only == "serve":
        return only_served(size, args.out)

    from platform_fixture import running_platform  # tests/platform_fixture.py

    out: dict = {"mode": "quick" if args.quick else "full", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                 "machine": machine()}
    out["peers"] = {"skipped": "--no-peers"} if args.no_peers else peers(size, args.peers_python)
    out["process_pool_floor_ms"] = process_pool_floor(size["calls"])

    with tempfile.TemporaryDirectory() as tmp:
        code = Path(tmp) / "code"
        code.mkdir()
        (code / "bench_fns.py").write_text(CODE)
        print("bench: opbox ...", file=sys.stderr)
        with running_platform(Path(tmp) / "home", extra_env=PRODUCT_DEFAULTS) as plat:
            out["machine"]["gateway_pid"] = plat.proc.pid
            square, echo = deploy(plat, code, out)
            timed_calls(square, 50)
            out["warm_call_ms"] = latency(timed_calls(square, size["calls"]))
            out["gateway_cpu_per_warm_call"] = gateway_cpu(plat, square, size["cpu_calls"])
            items = list(range(size["map"]))
            t = time.perf_counter()
            result = square.map(items, progress=False)
            took = time.perf_counter() - t
            assert result == [x * x for x in items]
            out["map"] = {"items": size["map"], "seconds": round(took, 3), "runs_per_s": round(size["map"] / took, 1)}
            print(f"bench: {size['callers']} concurrent callers ...", file=sys.stderr)
            out["concurrent_callers"] = concurrent_callers(plat, square, size["callers"], size["callers_seconds"])
            print("bench: payloads ...", file=sys.stderr)
            out["payloads"] = payloads(echo, size["payload_mib"], size["payload_repeat"])
            print("bench: served class ...", file=sys.stderr)
            out["served_class"] = served_class(plat, Path(tmp) / "serve", size["served_clients"],
                                               size["served_seconds"], size["served_repeat"])
            # last: a map left at its budget leaves runs being cancelled behind it
            if args.quick or args.million:
                print(f"bench: map of {size['big_map']:,} items ...", file=sys.stderr)
                out["map_large"] = big_map(plat, square, size["big_map"], out["map"]["runs_per_s"],
                                           args.big_map_budget or size["big_map_budget"])
            else:
                out["map_large"] = {"items": FULL["big_map"], "skipped": "pass --million (BENCH_ARGS=--million): "
                                    "up to --big-map-budget seconds (600)"}
        print(f"bench: status with {size['stored_runs']:,} runs stored ...", file=sys.stderr)
        import bench_fns

        out["status_with_stored_runs"] = status_with_stored_runs(Path(tmp) / "home-stored", bench_fns.square,
                                                                 size["stored_runs"], size["status_calls"])
    out["machine"]["loadavg_at_end"] = list(os.getloadavg())
    out["bench_peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    out["ratios"], out["goals"] = ratios_and_goals(out)
    write(out, args.out)
    print(table(out), file=sys.stderr)


if __name__ == "__main__":
    main()
