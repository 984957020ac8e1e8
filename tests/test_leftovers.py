"""Processes a run starts end with the run: children it forgot, daemons that double-fork and setsid."""

from __future__ import annotations

import os
import time

import pytest

from conftest import user_module
from platform_fixture import running_platform

CODE = """
import os, subprocess, sys, time
from opbox import operator

@operator()
def leave_behind(folder):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    pid = os.fork()
    if pid == 0:  # a classic daemon: fork, setsid, fork again, parent exits
        os.setsid()
        if os.fork() == 0:
            with open(os.path.join(folder, "daemon.pid"), "w") as f:
                f.write(str(os.getpid()))
            time.sleep(300)
        os._exit(0)
    os.waitpid(pid, 0)
    while not os.path.exists(os.path.join(folder, "daemon.pid")):
        time.sleep(0.01)
    return [child.pid, int(open(os.path.join(folder, "daemon.pid")).read())]

@operator()
def quick(x):
    return x + 1
"""


@pytest.fixture(scope="module", params=["worker", "run"])
def fns(request, tmp_path_factory):
    """Warm workers (the default) and one-shot runs (the batch entrypoint, as in a Kubernetes Job)."""
    home = tmp_path_factory.mktemp(f"home_{request.param}")
    with running_platform(home, extra_env={"OPBOX_ISOLATION": request.param}) as plat:
        client = plat.client()
        with user_module(tmp_path_factory.mktemp("leftovers_proj"), "leftmod", CODE) as mod:
            yield mod.leave_behind.deploy(client=client, quiet=True), mod.quick.deploy(client=client, quiet=True)
        client.close()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_runs_children_and_daemons_end_with_it(fns, tmp_path):
    leave_behind, quick = fns
    os.chmod(tmp_path, 0o777)
    pids = leave_behind(str(tmp_path))
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids), pids
    assert quick(1) == 2  # the worker itself goes on serving runs
