"""isolation=run: each run is a fresh `python -m opbox.runtime run --run-id X`, the batch entrypoint
that Kubernetes Jobs run too: code and args from the store, result, logs and status back to it."""

from __future__ import annotations

import importlib
import sys

import pytest

from opbox import Jobs, RunFailed, RunTimeout
from platform_fixture import running_platform

CODE = """
import os, time
from opbox import operator

@operator()
def pid_of(x):
    print(f"hello from {os.getpid()}")
    return (x * 2, os.getpid(), os.environ.get("OPBOX_RUN_ID"))

@operator(timeout=1)
def hang():
    time.sleep(30)

@operator()
def boom():
    raise KeyError("missing")

@operator()
def die():
    os._exit(9)

@operator()
def count(n):
    for i in range(n):
        print(f"item {i}")
        yield i
"""


@pytest.fixture(scope="module")
def oneshot(tmp_path_factory):
    with running_platform(tmp_path_factory.mktemp("home1"), extra_env={"OPBOX_ISOLATION": "run"}) as plat:
        folder = tmp_path_factory.mktemp("oneshot_proj")
        (folder / "oneshotmod.py").write_text(CODE)
        sys.path.insert(0, str(folder))
        mod = importlib.import_module("oneshotmod")
        client = plat.client()
        yield plat, {n: getattr(mod, n).deploy(client=client, quiet=True) for n in ("pid_of", "hang", "boom", "die", "count")}
        sys.modules.pop("oneshotmod", None)


def test_each_run_is_a_fresh_process_of_the_batch_entrypoint(oneshot):
    plat, f = oneshot
    a, b = f["pid_of"](1), f["pid_of"](2)
    assert a[0] == 2 and b[0] == 4 and a[1] != b[1]
    assert a[2] and a[2] != b[2] and a[2].startswith("r-"), "the run id reaches the process as OPBOX_RUN_ID"
    run = Jobs("pid_of", f["pid_of"].client).trigger(5)
    value = run.result(timeout=30)
    assert f"hello from {value[1]}" in "".join(run.logs())
    out = f["pid_of"].map(range(5), progress=False)
    assert [o[0] for o in out] == [0, 2, 4, 6, 8]
    assert len({o[1] for o in out}) == 5, "every item ran in its own process"


def test_failures_timeouts_and_crashes(oneshot):
    plat, f = oneshot
    with pytest.raises(KeyError, match="missing"):
        f["boom"]()
    with pytest.raises(RunTimeout):
        f["hang"]()
    with pytest.raises(RunFailed, match="exited with code 9"):
        f["die"]()
    assert plat.client().get("/status").json()["isolation"] == "run"


def test_a_one_shot_run_streams_its_generator_items(oneshot):
    _, f = oneshot
    assert list(f["count"].remote_gen(3)) == [0, 1, 2]
    run = f["count"].submit_gen(2)
    assert list(run.items()) == [0, 1] and run.result() == 2
    assert "item 1" in "".join(run.logs())
