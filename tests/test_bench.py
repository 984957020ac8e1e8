"""`bench/bench.py --quick` runs end to end and prints every figure of issue 12's goal table.

A smoke test: it checks the JSON's fields and their types, never a timing (figures are printed by
`make bench`, and compared only as ratios measured in one run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NUMBER = (int, float)


def number(value) -> bool:
    return isinstance(value, NUMBER) and not isinstance(value, bool) and value >= 0


def figures(section: dict, *names: str) -> None:
    for name in names:
        assert number(section[name]), (name, section)


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench.py"), "--quick", "--no-peers", "--out", str(out)],
                          capture_output=True, text=True, timeout=280, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    printed = json.loads(done.stdout)
    assert printed == json.loads(out.read_text())
    return printed


@pytest.mark.timeout(300)
def test_quick_bench_prints_every_figure(quick):
    assert quick["mode"] == "quick"
    machine = quick["machine"]
    assert machine["cpus"] >= 1 and len(machine["loadavg"]) == 3 and len(machine["loadavg_at_end"]) == 3
    assert "skipped" in quick["peers"]  # --no-peers says so, and the ratios are null
    assert set(quick["ratios"]) == {f"{figure}_vs_{peer}" for peer in ("ray", "dask")
                                    for figure in ("warm_call_p50", "warm_call_p99", "map_runs_per_s")}
    assert all(value is None for value in quick["ratios"].values())

    figures(quick["warm_call_ms"], "p50", "p99", "mean", "n")
    figures(quick["process_pool_floor_ms"], "p50", "p99")
    figures(quick, "first_deploy_to_first_result_s", "redeploy_cached_requirements_to_first_result_s")
    figures(quick["gateway_cpu_per_warm_call"], "calls", "gateway_ms_per_call", "workers_ms_per_call",
            "client_ms_per_call", "wall_ms_per_call")
    figures(quick["map"], "items", "seconds", "runs_per_s")
    assert isinstance(quick["map_large"]["completed"], bool)
    figures(quick["map_large"], "items", "done", "items_per_s", "share_of_10k_rate", "client_peak_rss_mib",
            "gateway_peak_rss_mib")
    callers = quick["concurrent_callers"]
    figures(callers, "clients", "calls", "calls_per_s", "p50_ms", "p99_ms", "errors")
    assert callers["clients"] == 50 and isinstance(callers["error_kinds"], dict)
    payloads = quick["payloads"]
    assert number(payloads["mib"])
    assert "round_trip_s" in payloads["bytes"]
    for kind in ("bytes", "numpy", "dataframe"):  # numpy and pandas are the bench's, not the product's
        if "skipped" in payloads[kind]:
            assert isinstance(payloads[kind]["skipped"], str)
        else:
            figures(payloads[kind], "round_trip_s", "local_2x_pickle_unpickle_s", "ratio_to_local")
    served = quick["served_class"]
    figures(served, "clients", "gateway_rps", "direct_rps", "gateway_share_of_direct_rps")
    assert isinstance(served["added_p95_ms"], NUMBER)  # a difference: may be below zero
    figures(quick["status_with_stored_runs"], "stored_runs", "p50_ms", "p99_ms", "one_run_stored_p50_ms")

    assert len(quick["goals"]) == 9
    for goal in quick["goals"]:
        assert isinstance(goal["figure"], str) and isinstance(goal["goal"], str)
        assert goal["met"] in (True, False, None)


@pytest.mark.timeout(120)
def test_only_serve_measures_the_served_class_alone(tmp_path):
    """`bench.py --only serve`: the served-class figure by itself (no peers, no other figure), with the CPU each
    process spent per call, both ways."""
    out = tmp_path / "serve.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench.py"), "--only", "serve", "--quick", "--out",
                           str(out)], capture_output=True, text=True, timeout=110, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    printed = json.loads(done.stdout)
    assert printed == json.loads(out.read_text())
    assert printed["only"] == "serve" and "peers" not in printed and "warm_call_ms" not in printed
    served = printed["served_class"]
    figures(served, "clients", "gateway_rps", "direct_rps", "gateway_share_of_direct_rps")
    assert served["errors"] == {"gateway": {}, "direct": {}}
    figures(served["cpu_us_per_call"]["gateway"], "gateway", "replica", "load_generator")
    figures(served["cpu_us_per_call"]["direct"], "replica", "load_generator")
    via = served["cpu_us_per_call"]["gateway"]
    assert via["gateway"] > 0 and via["replica"] > 0  # the gateway's process and its replica were found and measured
    [goal] = printed["goals"]
    assert goal["figure"].startswith("served class") and goal["met"] in (True, False)
    assert "served class via gateway / direct" in done.stderr


def test_the_postgres_bench_measures_both_records_and_several_gateways(tmp_path, pg_server):
    """`bench/bench_postgres.py` (small sizes): the records in process on both adapters, then calls and a map
    through SQLite's gateway and through two gateways on PostgreSQL, each map's results checked."""
    out = tmp_path / "pg.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_postgres.py"), "--cycles", "50", "--calls", "20",
                           "--items", "40", "--clients", "2", "--gateways", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert set(figures["records_in_process"]) == {"sqlite", "postgres"}
    assert all(f["call_cycles_per_s"] > 0 for f in figures["records_in_process"].values())
    assert [(f["records"], f["gateways"]) for f in figures["figures"]] == [("sqlite", 1), ("postgres", 2)]
    assert all(f["calls_per_s"] > 0 and f["map_items_per_s"] > 0 for f in figures["figures"])


def test_the_big_data_profile_times_each_stage_of_a_round_trip(tmp_path):
    """`bench/profile_big_data.py` (2 MiB: above the inline limit, so by signed URL): the caller's stages, and the
    worker's and gateway's sampled ones where py-spy is there and may attach."""
    out = tmp_path / "profile.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "profile_big_data.py"), "--mib", "2", "--repeat", "1",
                           "--kinds", "bytes", "--out", str(out)], capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    printed = json.loads(done.stdout)
    assert printed == json.loads(out.read_text()) and printed["mib"] == 2
    caller = printed["bytes"]["caller_s_per_round_trip"]
    figures(caller, "pickle the arguments", "upload the arguments (and ask where)", "wait for the run (gateway, worker)",
            "download the result", "unpickle the result", "round_trip_s (median)")
    sampled = printed["bytes"]["sampled_s_per_round_trip"]
    if isinstance(sampled, dict):
        assert set(sampled) == {"worker", "gateway"}
        assert all(number(v) for proc in sampled.values() for k, v in proc.items() if not k.startswith("other, top"))
    else:
        assert "py-spy" in sampled
