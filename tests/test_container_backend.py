"""The container backend end to end with real podman: versions built into images from the
Dockerfile template (OPBOX_BUILDER=podman, the default for this backend), runs in warm worker
containers. A few runs per scenario: deploy, call, map, a trigger, timeout, cancel, a crash,
a memory limit, a retry."""

from __future__ import annotations

import subprocess
import time

import pytest

from opbox import Jobs, RunCancelled, RunFailed, RunTimeout
from platform_fixture import running_platform
from podman_env import e2e_code, podman, remove_images, wheelhouse  # noqa: F401 (fixtures)

pytestmark = pytest.mark.image_builds  # minutes of builds: not in `make test`'s PostgreSQL pass (conftest)
WORKSPACE = "podman-e2e"

CODE = """
import os, signal, time
from opbox import operator, Resource

@operator()
def where(x):
    print(f"in {os.getcwd()} as {os.environ['HOSTNAME']}")
    return x * 2, os.path.exists("/.containerenv") or os.path.exists("/run/.containerenv"), os.getcwd()

@operator(timeout=1.0)
def too_slow():
    time.sleep(30)

@operator()
def sleeper(seconds):
    time.sleep(seconds)
    return seconds

@operator(max_retries=1)
def crash():
    os.kill(os.getpid(), signal.SIGKILL)

@operator(resource=Resource(memory="96Mi", cpu="500m"))
def hog(mb):
    blocks = [bytearray(1024 * 1024) for _ in range(mb)]
    return len(blocks)
"""

NAMES = ("where", "too_slow", "sleeper", "crash", "hog")


@pytest.fixture(scope="module")
def plat(podman, wheelhouse, tmp_path_factory):
    env = {"OPBOX_BACKEND": "container", "OPBOX_WHEELHOUSE": str(wheelhouse), "OPBOX_WORKSPACE": WORKSPACE,
           "OPBOX_MAX_WORKERS": "2"}
    with running_platform(tmp_path_factory.mktemp("home"), extra_env=env, timeout=60) as running:
        yield running
    remove_images(podman, WORKSPACE)
    left = subprocess.run([podman, "ps", "-aq", "--filter", "label=opbox.managed=1"], capture_output=True,
                          text=True).stdout.split()
    assert not left, f"containers left behind: {left}"


@pytest.fixture(scope="module")
def fns(plat, client, tmp_path_factory):
    mod = e2e_code(tmp_path_factory.mktemp("podman_proj"), "podmod", CODE)
    return {name: getattr(mod, name).deploy(client=client, quiet=True) for name in NAMES}


def test_runs_in_a_container_of_the_versions_image(fns, client, podman):
    value, in_container, cwd = fns["where"](21)
    assert value == 42 and in_container and cwd == "/app"
    run = Jobs(fns["where"].job_id, client).trigger(1)
    assert run.result(timeout=60)[0] == 2 and "in /app as" in "".join(run.logs())
    assert fns["where"].map(range(4), progress=False) == [(x * 2, True, "/app") for x in range(4)]
    versions = client.get(f"/job/{fns['where'].job_id}/versions").json()
    assert versions
    images = subprocess.run([podman, "images", "--format", "{{.Repository}}", "--filter",
                             f"label=opbox.workspace={WORKSPACE}"], capture_output=True, text=True).stdout
    assert "localhost/opbox-podman-e2e-where" in images


def test_timeout_and_cancel(fns):
    with pytest.raises(RunTimeout, match="timed out after 1 s"):
        fns["too_slow"]()
    run = fns["sleeper"].submit(60)
    deadline = time.monotonic() + 60
    while run.status()["status"] != "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    started = time.monotonic()
    assert run.cancel()["status"] == "cancelled"
    with pytest.raises(RunCancelled):
        run.result(timeout=10)
    assert time.monotonic() - started < 5
    assert fns["sleeper"](0) == 0


def test_crash_is_retried_then_fails_with_the_reason(fns):
    run = fns["crash"].submit()
    with pytest.raises(RunFailed, match="killed by SIGKILL"):
        run.result(timeout=60)
    assert run.status()["attempt"] == 1


def test_memory_limit_kills_with_oom_reason(fns):
    with pytest.raises(RunFailed, match="OOMKilled.*96Mi"):
        fns["hog"](400)
    assert fns["hog"](10) == 10


SERVICE_CODE = """
import os
from opbox import operator

@operator()
class Counter:
    def __init__(self, start: int):
        self.start = start

    def __remote_init__(self):
        self.replica = os.urandom(8).hex()  # one per replica: tells a new one from the old

    def add(self, x: int) -> int:
        return self.start + x

    def where(self) -> dict:
        return {"container": os.path.exists("/run/.containerenv") or os.path.exists("/.containerenv"),
                "cwd": os.getcwd(), "replica": self.replica}

    def add_doubled(self, x: int) -> int:  # jobs calling jobs: the replica calls a job of its workspace
        from opbox import Operator
        return self.start + Operator.from_job("double")(x)


@operator()
def double(x: int) -> int:
    return 2 * x
"""


def test_a_class_is_served_from_containers(plat, client, podman, tmp_path_factory):
    import httpx

    mod = e2e_code(tmp_path_factory.mktemp("podman_svc"), "podsvc", SERVICE_CODE)
    svc = mod.Counter.deploy(10, name="counter", client=client, quiet=True)
    assert svc.add(5) == 15
    mod.double.deploy(client=client, quiet=True)
    assert svc.add_doubled(4) == 18  # with the replica's own caller token, never the user's
    where = svc.where()
    assert where["container"] and where["cwd"] == "/app"
    resp = httpx.post(f"{plat.url}/{plat.workspace}/serve/counter/add", json={"x": 1},
                      headers={"Authorization": f"Bearer {plat.token}"}, timeout=60)
    assert resp.status_code == 200 and resp.json() == 11
    assert svc.add.map([1, 2, 3]) == [11, 12, 13]
    # a killed replica container is replaced; new calls succeed
    names = subprocess.run([podman, "ps", "-q", "--filter", "label=opbox.service=" + f"{plat.workspace}/counter"],
                           capture_output=True, text=True).stdout.split()
    assert len(names) == 1
    subprocess.run([podman, "kill", "--signal", "KILL", names[0]], check=True, capture_output=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            assert svc.add(1) == 11
            break
        except Exception:
            assert time.monotonic() < deadline, "no replica came back"
            time.sleep(0.5)
    assert svc.where()["replica"] != where["replica"], "answered by a new container"
    svc.delete()
    deadline = time.monotonic() + 30
    while subprocess.run([podman, "ps", "-q", "--filter", f"label=opbox.service={plat.workspace}/counter"],
                         capture_output=True, text=True).stdout.split():
        assert time.monotonic() < deadline, "the service's containers were not removed"
        time.sleep(0.5)


SECRET_CODE = """
import os
from opbox import operator

@operator(secrets=["podman-hf"])
def read_secret():
    return os.environ.get("HF_TOKEN"), os.environ.get("LD_PRELOAD")

@operator(secrets=["podman-pem"])
def read_pem():
    return os.environ.get("PEM")
"""


def test_workspace_secrets_reach_containers_through_a_fifo_env_file(plat, client, podman, tmp_path_factory):
    import glob
    import tempfile

    value = "s3cr3t value # with = signs "
    client.request("PUT", "/secrets/podman-hf", json={"values": {"HF_TOKEN": value, "LD_PRELOAD": "/nowhere.so"}})
    client.request("PUT", "/secrets/podman-pem", json={"values": {"PEM": "-----BEGIN\nKEY-----"}})
    mod = e2e_code(tmp_path_factory.mktemp("podman_secret"), "podsecret", SECRET_CODE)
    fn = mod.read_secret.deploy(client=client, quiet=True)
    # podman itself never had LD_PRELOAD (it started the container); the container has it as set
    assert tuple(fn()) == (value, "/nowhere.so")
    assert not glob.glob(tempfile.gettempdir() + "/opbox-env-*"), "the FIFO and its folder are gone"
    client.request("PUT", "/secrets/podman-hf", json={"values": {"HF_TOKEN": "rotated"}})
    assert tuple(fn()) == ("rotated", None), "new values: new containers"
    pem = mod.read_pem.deploy(client=client, quiet=True)
    with pytest.raises(RunFailed, match="the secret variable PEM holds a line break"):
        pem()
    assert not glob.glob(tempfile.gettempdir() + "/opbox-env-*")
