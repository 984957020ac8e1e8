"""The kubernetes backend end to end, against the fake API server (tests/fake_kube).

The platform runs as ``opbox up`` with OPBOX_BACKEND=kubernetes and the podman builder; its
kubernetes client talks HTTP to the fake, which validates every object (kubernetes-validate
strict, the Knative CRD) and runs each Job's pod with podman from the image the builder made.
The scenarios are the local backend's: deploy, call, map, the three triggers, timeout, cancel,
crashes, retries, memory limits; plus what only a cluster has (watch resync after 410 Gone,
ImagePullBackOff, Jobs and Secrets as objects).
"""

from __future__ import annotations

import json
import subprocess
import time

import httpx
import pytest

from fake_kube import FakeKube
from opbox import Jobs, Operator, RunCancelled, RunFailed, RunHandle, RunTimeout
from platform_fixture import running_platform
from podman_env import e2e_code, podman, remove_images, wheelhouse  # noqa: F401 (fixtures)

WORKSPACE = "kube-e2e"
NAMESPACE = f"opbox-{WORKSPACE}"

CODE = """
import os, signal, time
from opbox import operator, Resource

@operator(name="scorer")
def score(x: int = 5, scale: int = 2):
    print(f"scoring {x}")
    return x * scale

@operator()
def sleeper(seconds):
    time.sleep(seconds)
    return os.environ.get("OPBOX_RUN_ID")

@operator(timeout=1.0)
def too_slow():
    time.sleep(30)

@operator(max_retries=2)
def flaky(fail):
    # each attempt is a fresh pod with nothing of the last one: fail every time when asked
    if fail:
        raise RuntimeError(f"attempt fails in {os.environ['HOSTNAME']}")
    return "ok"

@operator()
def crash(how):
    if how == "exit":
        os._exit(3)
    os.kill(os.getpid(), signal.SIGKILL)

@operator(max_retries=1)
def crash_then_fail():
    os._exit(7)

@operator(resource=Resource(memory="96Mi"))
def hog(mb):
    blocks = [bytearray(1024 * 1024) for _ in range(mb)]
    return len(blocks)
"""

NAMES = ("score", "sleeper", "too_slow", "flaky", "crash", "crash_then_fail", "hog")


@pytest.fixture(scope="module")
def kube(podman, tmp_path_factory):
    with FakeKube(tmp_path_factory.mktemp("kube")) as fake:
        yield fake
        assert fake.state()["rejected"] == [], "the backend sent objects that fail validation"


@pytest.fixture(scope="module")
def plat(kube, podman, wheelhouse, tmp_path_factory):
    env = {"OPBOX_BACKEND": "kubernetes", "KUBECONFIG": str(kube.kubeconfig), "OPBOX_WHEELHOUSE": str(wheelhouse),
           "OPBOX_WORKSPACE": WORKSPACE, "OPBOX_K8S_MAX_INFLIGHT": "3", "OPBOX_K8S_WATCH_TIMEOUT": "20",
           "OPBOX_K8S_ENV": json.dumps({"TEAM_SETTING": "from-operator"})}
    with running_platform(tmp_path_factory.mktemp("home"), extra_env=env, timeout=60) as running:
        yield running
    remove_images(podman, WORKSPACE)


@pytest.fixture(scope="module")
def fns(plat, client, tmp_path_factory):
    mod = e2e_code(tmp_path_factory.mktemp("kube_proj"), "kubemod", CODE)
    return {name: getattr(mod, name).deploy(client=client, quiet=True) for name in NAMES}


def jobs_of(kube: FakeKube, run_id: str) -> list[dict]:
    label = run_id.lower()
    return [o for (res, ns, _), o in list(kube.store.objects.items())
            if res == "jobs" and ns == NAMESPACE and o["metadata"]["labels"]["opbox.dev/run"].lower() == label]


def wait_for(predicate, timeout: float = 30, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what} did not happen within {timeout} s")


def test_call_runs_as_a_job_with_the_runs_image(fns, kube, client):
    run = fns["score"].submit(4)
    assert run.result(timeout=60) == 8
    assert "scoring 4" in "".join(run.logs())
    (job,) = jobs_of(kube, run.id)
    assert job["metadata"]["name"] == f"opbox-run-{run.id.lower()}"
    assert job["spec"]["backoffLimit"] == 0 and job["spec"]["ttlSecondsAfterFinished"] == 3600
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["python", "-m", "opbox.runtime", "run", "--run-id", run.id]
    assert container["image"].startswith("localhost/opbox-kube-e2e-scorer:")
    env = {e["name"]: e for e in container["env"]}
    assert env["TEAM_SETTING"]["value"] == "from-operator"
    assert env["OPBOX_RUN_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == f"opbox-run-{run.id.lower()}-token"
    secret = kube.store.get("secrets", NAMESPACE, f"opbox-run-{run.id.lower()}-token")
    assert secret["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]
    assert kube.store.get("serviceaccounts", NAMESPACE, "opbox-runner") is not None
    wait_for(lambda: jobs_of(kube, run.id)[0]["status"].get("succeeded") == 1, 30, "the Job completing")
    assert fns["sleeper"](0).startswith("r-"), "the run id reaches the pod"


def test_map_goes_through_jobs_and_respects_max_inflight(fns, kube, plat):
    out = fns["score"].map(range(7), progress=False)
    assert out == [x * 2 for x in range(7)]
    status = plat.client().get("/status").json()
    assert status["backend"] == "kubernetes" and status["jobs"]["max_inflight"] == 3
    runs = fns["sleeper"].map([0.5] * 6, progress=False)
    assert len(set(runs)) == 6 and all("." in r for r in runs), "map items are runs b-....N"


def test_three_triggers(fns, plat, client):
    run = Jobs(fns["score"].job_id, client).trigger()
    assert run.result(timeout=60) == 10 and run.status()["trigger"] == "trigger"
    assert Operator.from_job("scorer", client=client)(x=3) == 6
    auth = ["-H", f"Authorization: Bearer {plat.token}"]
    out = subprocess.run(["curl", "-sS", "-X", "POST", *auth, "-H", "Content-Type: application/json",
                          "-d", '{"args": [4], "kwargs": {"scale": 10}}',
                          f"{plat.url}/{plat.workspace}/job/scorer/trigger"],
                         capture_output=True, text=True, check=True)
    answer = json.loads(out.stdout)
    assert answer["status"] == "queued"
    assert RunHandle(answer["run_id"], client).result(timeout=60) == 40


def test_timeout_is_the_jobs_active_deadline(fns, kube):
    run = fns["too_slow"].submit()
    with pytest.raises(RunTimeout, match="timed out after 1 s"):
        run.result(timeout=60)
    assert run.status()["status"] == "timed_out"
    (job,) = jobs_of(kube, run.id)
    assert job["spec"]["activeDeadlineSeconds"] == 1
    assert [c["reason"] for c in job["status"]["conditions"] if c["type"] == "Failed"] == ["DeadlineExceeded"]


def test_cancel_deletes_the_job(fns, kube):
    run = fns["sleeper"].submit(60)
    wait_for(lambda: run.status()["status"] == "running", 60, "the run starting")
    assert run.cancel()["status"] == "cancelled"
    with pytest.raises(RunCancelled):
        run.result(timeout=10)
    wait_for(lambda: not jobs_of(kube, run.id), 30, "the Job being deleted")
    wait_for(lambda: not [p for (res, ns, name), p in list(kube.store.objects.items())
                          if res == "pods" and name.startswith(f"opbox-run-{run.id.lower()}")], 60, "its pod going")


def test_crashes_end_failed_with_the_pods_reason(fns):
    with pytest.raises(RunFailed, match="exited with code 3"):
        fns["crash"]("exit")
    with pytest.raises(RunFailed, match="killed by SIGKILL"):
        fns["crash"]("kill")


def test_platform_retries_are_new_jobs(fns, kube):
    run = fns["crash_then_fail"].submit()
    with pytest.raises(RunFailed, match="exited with code 7"):
        run.result(timeout=90)
    status = run.status()
    assert status["attempt"] == 1
    names = sorted(j["metadata"]["name"] for j in jobs_of(kube, run.id))
    assert names == [f"opbox-run-{run.id.lower()}", f"opbox-run-{run.id.lower()}-a1"]
    assert all(j["spec"]["backoffLimit"] == 0 for j in jobs_of(kube, run.id))
    flaky = fns["flaky"].submit(True)
    with pytest.raises(RuntimeError, match="attempt fails"):
        flaky.result(timeout=90)
    assert flaky.status()["attempt"] == 2 and len(jobs_of(kube, flaky.id)) == 3


def test_memory_limit_is_oomkilled(fns, kube):
    run = fns["hog"].submit(400)
    with pytest.raises(RunFailed, match="OOMKilled.*96Mi"):
        run.result(timeout=60)
    (job,) = jobs_of(kube, run.id)
    limits = job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits == {"memory": "96Mi"}
    assert fns["hog"](10) == 10


def test_watch_resyncs_after_410_and_reconnects(fns, kube, plat):
    before = plat.client().get("/status").json()["watches"]["jobs"]
    run = fns["crash"].submit("exit")
    kube.expire()  # watches end and the history is gone: resuming gets 410 Gone, so the backend lists again
    with pytest.raises(RunFailed, match="exited with code 3"):
        run.result(timeout=60)
    after = wait_for(lambda: (w := plat.client().get("/status").json()["watches"]["jobs"])["relists"] > before["relists"]
                     and w, 30, "a relist")
    assert after["reconnects"] >= before["reconnects"]
    assert fns["score"](1) == 2


def test_missing_image_fails_with_image_pull_backoff(fns, kube, podman, client):
    image = kube_image_of(kube, fns["sleeper"])
    subprocess.run([podman, "tag", image, image + "-kept"], check=True, capture_output=True)
    subprocess.run([podman, "rmi", image], check=True, capture_output=True)
    try:
        with pytest.raises(RunFailed, match="ImagePullBackOff"):
            fns["sleeper"].submit(0).result(timeout=60)
    finally:
        subprocess.run([podman, "tag", image + "-kept", image], capture_output=True)
        subprocess.run([podman, "rmi", image + "-kept"], capture_output=True)


def kube_image_of(kube: FakeKube, remote) -> str:
    run = remote.submit(0)
    run.result(timeout=60)
    return jobs_of(kube, run.id)[0]["spec"]["template"]["spec"]["containers"][0]["image"]


def test_the_fake_refuses_invalid_objects(kube):
    from kubernetes import client, config

    api = client.BatchV1Api(config.new_client_from_config(config_file=str(kube.kubeconfig)))
    bad = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "bad", "namespace": NAMESPACE},
           "spec": {"backoffLimit": "two", "template": {"spec": {"restartPolicy": "Never",
                                                                 "containers": [{"name": "x", "image": "x"}]}}}}
    with pytest.raises(client.exceptions.ApiException) as info:
        api.create_namespaced_job(NAMESPACE, bad)
    assert info.value.status == 422 and "backoffLimit" in info.value.body
    kube.store.rejected.clear()  # refused on purpose; the module's final check is about the backend's objects
    assert httpx.get(kube.url + "/api/v1/namespaces/nope").status_code == 404


SERVICE_CODE = """
from opbox import operator

@operator()
class Scaler:
    def __init__(self, scale: int):
        self.scale = scale

    def times(self, x: int) -> int:
        return x * self.scale
"""


def test_a_class_is_a_knative_service(plat, client, kube, tmp_path_factory):
    mod = e2e_code(tmp_path_factory.mktemp("kube_svc"), "kubesvc", SERVICE_CODE)
    model = mod.Scaler.deploy(3, client=client, quiet=True)
    assert model.times(x=5) == 15
    info = model.info()
    assert info["status"] == "ready" and info["url"].startswith("http://127.0.0.1:"), info
    namespace, name = info["knative_service"].split("/")
    assert namespace == NAMESPACE
    service = kube.store.get("services", NAMESPACE, name)
    template = service["spec"]["template"]
    container = template["spec"]["containers"][0]
    assert container["command"] == ["python", "-m", "opbox.runtime", "serve", "--port", "8080"]
    assert container["image"].startswith("localhost/opbox-kube-e2e-scaler:")
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["OPBOX_ENTRY"] == "kubesvc:Scaler" and env["OPBOX_INIT_B64"]
    assert template["metadata"]["annotations"]["autoscaling.knative.dev/min-scale"] in ("0", "1")

    again = mod.Scaler.deploy(4, client=client, quiet=True)  # a new revision: replaced, not created
    assert again.times(x=5) == 20
    assert kube.store.get("services", NAMESPACE, name)["metadata"]["generation"] == 2
    again.delete()
    wait_for(lambda: kube.store.get("services", NAMESPACE, name) is None, 30, "the Service being deleted")
