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
import math
import os
import subprocess
import sys
import time

import httpx
import pytest

from fake_kube import FakeKube, wait_for
from k8s_schemas import ManifestValidator
from opbox import Jobs, Operator, RunCancelled, RunFailed, RunHandle, RunTimeout
from opbox.errors import Unavailable
from opbox.platform.settings import Settings
from platform_fixture import running_platform
from tcp_proxy import SwitchableProxy
from podman_env import e2e_code, podman, remove_images, wheelhouse  # noqa: F401 (fixtures)

# one of its own per test process: the images are labelled with it, and removed by it at the end,
# so two checkouts' suites on one machine do not remove each other's images
WORKSPACE = f"kube-e2e-{os.getpid()}"
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

@operator()
def echo(value):
    return value


@operator(timeout=300)
def relay(x):  # jobs calling jobs: this run's pod calls the scorer, with the run's own token
    from opbox import Operator
    return Operator.from_job("scorer")(x)

@operator()
def stubborn(seconds):
    def on_term(signum, frame):  # takes longer to clean up than the grace allows
        print("stubborn: got SIGTERM, cleaning up", flush=True)
        time.sleep(seconds)
    signal.signal(signal.SIGTERM, on_term)
    print("stubborn: waiting", flush=True)
    time.sleep(seconds)
"""

NAMES = ("score", "sleeper", "too_slow", "flaky", "crash", "crash_then_fail", "hog", "stubborn", "echo", "relay")


@pytest.fixture(scope="module")
def kube(podman, tmp_path_factory):
    with FakeKube(tmp_path_factory.mktemp("kube")) as fake:
        yield fake
        assert fake.state()["rejected"] == [], "the backend sent objects that fail validation"


@pytest.fixture(scope="module")
def worker_front():
    """Where pool workers reach the gateway (OPBOX_K8S_WORKER_URL): another address of it, as a replica's pod IP is
    beside its Service; pointed at the gateway once it listens."""
    front = SwitchableProxy("127.0.0.1", 9)
    front.up()
    yield front
    front.down()


@pytest.fixture(scope="module")
def plat(kube, podman, wheelhouse, tmp_path_factory, worker_front):
    env = {"OPBOX_K8S_WORKER_URL": worker_front.url,"OPBOX_BACKEND": "kubernetes", "KUBECONFIG": str(kube.kubeconfig), "OPBOX_WHEELHOUSE": str(wheelhouse),
           "OPBOX_WORKSPACE": WORKSPACE, "OPBOX_K8S_MAX_INFLIGHT": "3", "OPBOX_K8S_WATCH_TIMEOUT": "20",
           "OPBOX_K8S_WORKSPACE_INFLIGHT": "3", "OPBOX_K8S_IMAGE_PULL_PATIENCE": "3",
           "OPBOX_K8S_POOL_WORKERS": "3", "OPBOX_K8S_ITEMS_PER_WORKER": "2", "OPBOX_WORKER_IDLE": "5",
           "OPBOX_K8S_ENV": json.dumps({"TEAM_SETTING": "from-operator"})}
    with running_platform(tmp_path_factory.mktemp("home"), extra_env=env, timeout=60) as running:
        host, port = running.url.removeprefix("http://").rsplit(":", 1)
        worker_front.target = (host, int(port))
        yield running
    remove_images(podman, WORKSPACE)


@pytest.fixture(scope="module")
def fns(plat, client, tmp_path_factory):
    mod = e2e_code(tmp_path_factory.mktemp("kube_proj"), "kubemod", CODE)
    return {name: getattr(mod, name).deploy(client=client, quiet=True) for name in NAMES}


def jobs_of(kube: FakeKube, run_id: str) -> list[dict]:
    label = run_id.lower()
    return [o for (res, ns, _), o in list(kube.store.objects.items())
            if res == "jobs" and ns == NAMESPACE and o["metadata"]["labels"].get("opbox.dev/run", "").lower() == label]


def test_call_runs_as_a_job_with_the_runs_image(fns, kube, client, plat):
    run = fns["score"].submit(4)
    assert run.result(timeout=60) == 8
    assert "scoring 4" in "".join(run.logs())
    (job,) = jobs_of(kube, run.id)
    assert job["metadata"]["name"] == f"opbox-run-{run.id.lower()}"
    assert job["spec"]["backoffLimit"] == 0 and job["spec"]["ttlSecondsAfterFinished"] == 3600
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["python", "-m", "opbox.runtime", "run", "--run-id", run.id]
    assert container["image"].startswith(f"localhost/opbox-{WORKSPACE}-scorer:")
    env = {e["name"]: e for e in container["env"]}
    assert env["TEAM_SETTING"]["value"] == "from-operator"
    assert env["OPBOX_GATEWAY_URL"]["value"] == plat.url, "a run's pod hands in through the gateway's Service"
    assert env["OPBOX_RUN_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == f"opbox-run-{run.id.lower()}-token"
    secret = kube.store.get("secrets", NAMESPACE, f"opbox-run-{run.id.lower()}-token")
    assert secret["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]
    assert kube.store.get("serviceaccounts", NAMESPACE, "opbox-runner") is not None
    wait_for(lambda: jobs_of(kube, run.id)[0]["status"].get("succeeded") == 1, 30, "the Job completing")
    assert fns["sleeper"](0).startswith("r-"), "the run id reaches the pod"


def test_large_arguments_and_results_reach_pods_by_signed_url(fns, plat):
    """Above the inline limit the pod fetches its arguments and uploads its result with signed URLs (a local
    store's are served by the gateway, which pods reach at their OPBOX_GATEWAY_URL), in a Job and in a pool."""
    data = bytes(range(256)) * (3 * 1024 * 1024 // 256)
    assert fns["echo"](data) == data  # a Job's pod
    assert list(fns["echo"].map([data, data[::-1]])) == [data, data[::-1]]  # worker pods
    log = plat.log()
    assert "could not be fetched" not in log and "could not be uploaded" not in log


def test_a_run_pod_calls_another_job_with_a_token_scoped_to_its_run(fns, kube, plat):
    """The pod's OPBOX_TOKEN comes from its run's token Secret: a caller token for that run only (never the
    user's; nothing else in the pod's env holds one); the child it started names it as its parent."""
    import base64

    run = fns["relay"].submit(6)
    assert run.result(timeout=120) == 12
    (job,) = jobs_of(kube, run.id)
    (container,) = job["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    ref = env["OPBOX_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == f"opbox-run-{run.id.lower()}-token" and ref["key"] == "caller" and "value" not in env["OPBOX_TOKEN"]
    assert not any(plat.token in json.dumps(e) for e in container["env"])
    secret = kube.store.get("secrets", NAMESPACE, ref["name"])
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert set(data) == {"token", "caller"} and data["caller"].startswith(f"obc_r:{run.id}:")
    assert data["caller"] != plat.token
    with plat.http() as http:
        (child,) = http.get(f"/{WORKSPACE}/runs", params={"parent": run.id}).json()["runs"]
        assert child["job_id"] == fns["score"].job_id and child["status"] == "succeeded"
        assert child["parent_run_id"] == run.id and child["trigger"] == "call"
    # the scorer has no timeout of its own: its Job's deadline is what was left of the relay's 300 s
    assert child["timeout"] is not None and child["timeout"] <= 300
    (child_job,) = jobs_of(kube, child["id"])
    assert 1 <= child_job["spec"]["activeDeadlineSeconds"] <= 300
    with httpx.Client(base_url=plat.url, headers={"Authorization": f"Bearer {data['caller']}"}, timeout=30) as http:
        assert http.get(f"/{WORKSPACE}/jobs").status_code == 401  # the run has ended: its token with it
    # map items run on worker pods: each calls with its worker's caller token, for the item it holds
    assert fns["relay"].map([1, 2], progress=False) == [2, 4]
    with plat.http() as http:
        items = http.get(f"/{WORKSPACE}/runs", params={"job": fns["relay"].job_id, "trigger": "map"}).json()["runs"]
        for item in items[:2]:
            (child,) = http.get(f"/{WORKSPACE}/runs", params={"parent": item["id"]}).json()["runs"]
            assert child["job_id"] == fns["score"].job_id and child["status"] == "succeeded"


def worker_jobs(kube: FakeKube, job_id: str) -> list[dict]:
    return [o for (res, ns, _), o in list(kube.store.objects.items())
            if res == "jobs" and ns == NAMESPACE and "opbox.dev/worker" in o["metadata"]["labels"]
            and o["metadata"]["labels"]["opbox.dev/job"] == job_id.lower()]


def test_map_items_go_to_a_pool_of_worker_pods_not_a_job_each(fns, kube, plat, worker_front):
    before = {k for k in kube.store.objects if k[0] in ("jobs", "pods")}
    through_front = worker_front.accepted
    out = fns["score"].map(range(7), progress=False)
    assert out == [x * 2 for x in range(7)]
    new_jobs = [kube.store.objects[k] for k in kube.store.objects if k[0] == "jobs" and k not in before]
    (job,) = new_jobs  # one Job for the pool's workers: not one per item, not one per worker
    spec = job["spec"]
    assert job["metadata"]["labels"]["opbox.dev/worker"] == "pool" and spec["completionMode"] == "Indexed"
    assert 1 <= spec["completions"] == spec["parallelism"] <= 3, "at most OPBOX_K8S_POOL_WORKERS pods"
    pods = [kube.store.objects[k] for k in kube.store.objects if k[0] == "pods" and k not in before
            and kube.store.objects[k]["metadata"]["labels"].get("job-name") == job["metadata"]["name"]]
    indexes = sorted(int(p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]) for p in pods)
    assert indexes == list(range(spec["completions"])), "a pod per index, each its own worker"
    (container,) = spec["template"]["spec"]["containers"]
    assert container["command"] == ["python", "-m", "opbox.runtime", "worker"]
    env = {e["name"]: e for e in container["env"]}
    assert env["OPBOX_POOL"]["value"] == f"{fns['score'].job_id}.v1" and "secretKeyRef" in env["OPBOX_RUN_TOKEN"]["valueFrom"]
    assert env["OPBOX_WORKER_ID"]["value"] == job["metadata"]["name"] + "-$(OPBOX_WORKER_INDEX)"
    # workers reach the replica that holds their pool (OPBOX_K8S_WORKER_URL), and did: the items came through it
    assert env["OPBOX_GATEWAY_URL"]["value"] == worker_front.url and worker_front.accepted > through_front
    secrets_made = [k for k in kube.store.objects if k[0] == "secrets" and k[2] == job["metadata"]["name"] + "-token"]
    assert len(secrets_made) == 1, "one token Secret for the Job"
    status = plat.client().get("/status").json()
    assert status["backend"] == "kubernetes" and status["jobs"]["max_inflight"] == 3
    assert any(p["pool"] == f"{fns['score'].job_id}.v1" for p in status["pools"])
    # idle workers leave (OPBOX_WORKER_IDLE): their pods exit 0, their indexes complete, and so does the Job
    wait_for(lambda: any(c["type"] == "Complete" for c in (kube.store.get("jobs", NAMESPACE, job["metadata"]["name"])
                                                           or {"status": {}})["status"].get("conditions") or []),
             60, "the idle workers leaving")
    assert kube.store.get("jobs", NAMESPACE, job["metadata"]["name"])["status"]["succeeded"] == spec["completions"]


def test_an_evicted_worker_pods_item_runs_again_without_spending_a_retry(fns, kube, plat):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        mapped = pool.submit(fns["sleeper"].map, [4, 4], progress=False)
        busy = wait_for(lambda: [p for p in kube.store.list("pods", NAMESPACE)
                                 if p["metadata"]["labels"].get("opbox.dev/job") == fns["sleeper"].job_id.lower()
                                 and "opbox.dev/worker" in p["metadata"]["labels"]
                                 and p["status"].get("phase") == "Running"], 60, "a worker pod running")[0]
        time.sleep(1.5)  # let it take an item (a pod evicted before that holds nothing)
        kube.evict(NAMESPACE, busy["metadata"]["name"], "The node was low on resource: memory.")
        ran = mapped.result(timeout=180)  # each item's own run id (OPBOX_RUN_ID), on worker pods too
        assert [run_id.startswith("r-") and run_id.rsplit(".", 1)[1] for run_id in ran] == ["0", "1"]
    runs = plat.http().get(f"/{plat.workspace}/job/{fns['sleeper'].job_id}/runs", params={"limit": 5}).json()["runs"]
    evicted = [r for r in runs if (r.get("exit_reason") or "").startswith("evicted: ")]
    assert evicted and all(r["status"] == "succeeded" and r["attempt"] == 0 for r in evicted), runs


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


def pods_of(kube: FakeKube, run_id: str) -> list[dict]:
    return [p for (res, ns, name), p in list(kube.store.objects.items())
            if res == "pods" and ns == NAMESPACE and name.startswith(f"opbox-run-{run_id.lower()}")]


def test_cancel_gives_the_pod_the_platforms_cancel_grace(fns, kube):
    run = fns["stubborn"].submit(120)
    wait_for(lambda: "stubborn: waiting" in "".join(run.logs()), 60, "the run trapping SIGTERM")
    (job,) = jobs_of(kube, run.id)
    grace = job["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace == math.ceil(Settings.cancel_grace) < 30, "the platform's cancel grace, not Kubernetes' 30 s"
    (pod,) = pods_of(kube, run.id)
    assert pod["spec"]["terminationGracePeriodSeconds"] == grace
    started = time.monotonic()
    assert run.cancel()["status"] == "cancelled"
    with pytest.raises(RunCancelled):
        run.result(timeout=10)
    # the Job goes; the garbage collector deletes the pod with its own grace: SIGTERM, then
    # SIGKILL `grace` seconds later, since the handler would take 120 s
    wait_for(lambda: not pods_of(kube, run.id), grace + 20, "the pod going")
    elapsed = time.monotonic() - started
    assert grace - 1 <= elapsed <= grace + 5, f"the pod went {elapsed:.1f} s after the cancel (grace {grace} s)"
    assert not jobs_of(kube, run.id)
    wait_for(lambda: "stubborn: got SIGTERM, cleaning up" in "".join(run.logs()), 10,
             "the SIGTERM handler's output reaching the run's logs")
    assert run.status()["status"] == "cancelled"


def test_termination_grace_setting(monkeypatch):
    from opbox.errors import ConfigError
    from opbox.platform.backends.kubernetes.backend import KubernetesBackend, KubernetesSettings

    def backend(**kwargs):
        return KubernetesBackend(KubernetesSettings.from_env(), gateway_url="http://gw", token_for=str, **kwargs)

    monkeypatch.delenv("OPBOX_K8S_TERMINATION_GRACE", raising=False)
    assert backend().termination_grace == math.ceil(Settings.cancel_grace)
    assert backend(cancel_grace=2.5).termination_grace == 3
    monkeypatch.setenv("OPBOX_K8S_TERMINATION_GRACE", "45")
    assert KubernetesSettings.from_env().termination_grace == 45
    assert backend(cancel_grace=2.5).termination_grace == 45, "the setting wins over the platform's cancel grace"
    for bad in ("-1", "1.5", "soon"):
        monkeypatch.setenv("OPBOX_K8S_TERMINATION_GRACE", bad)
        with pytest.raises(ConfigError, match="OPBOX_K8S_TERMINATION_GRACE"):
            KubernetesSettings.from_env()


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

    def via_job(self, x: int) -> int:  # a replica calls a job of its workspace, with the service's own token
        from opbox import Operator
        return Operator.from_job("scorer")(x)
"""


def test_a_class_is_a_knative_service(plat, client, kube, fns, tmp_path_factory):
    mod = e2e_code(tmp_path_factory.mktemp("kube_svc"), "kubesvc", SERVICE_CODE)
    model = mod.Scaler.deploy(3, client=client, quiet=True)
    assert model.times(x=5) == 15
    assert model.via_job(x=4) == 8  # the scorer, called from the replica's pod
    info = model.info()
    assert info["status"] == "ready" and info["url"].startswith("http://127.0.0.1:"), info
    # the replica answers the gateway only: any other caller in the cluster is refused
    direct = httpx.post(kube.store.get("services", NAMESPACE, info["knative_service"].split("/")[1])["status"]["url"]
                        + "/call/times", json={"x": 5}, timeout=10)
    assert direct.status_code == 401 and "through the gateway only" in direct.text
    namespace, name = info["knative_service"].split("/")
    assert namespace == NAMESPACE
    service = kube.store.get("services", NAMESPACE, name)
    template = service["spec"]["template"]
    container = template["spec"]["containers"][0]
    assert container["command"] == ["python", "-m", "opbox.runtime", "serve", "--port", "8080"]
    assert container["image"].startswith(f"localhost/opbox-{WORKSPACE}-scaler:")
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["OPBOX_ENTRY"] == "kubesvc:Scaler" and env["OPBOX_INIT_URL"].endswith("/Scaler/init")
    assert "OPBOX_INIT_B64" not in env
    token_ref = next(e for e in container["env"] if e["name"] == "OPBOX_TOKEN")["valueFrom"]["secretKeyRef"]
    assert token_ref["key"] == "caller" and token_ref["name"] == f"opbox-service-{name}-token"
    assert template["metadata"]["annotations"]["autoscaling.knative.dev/min-scale"] in ("0", "1")

    again = mod.Scaler.deploy(4, client=client, quiet=True)  # a new revision: replaced, not created
    assert again.times(x=5) == 20
    assert kube.store.get("services", NAMESPACE, name)["metadata"]["generation"] == 2
    again.delete()
    wait_for(lambda: kube.store.get("services", NAMESPACE, name) is None, 30, "the Service being deleted")


LOGGING_SERVICE_CODE = """
from opbox import operator

@operator()
class Talker:
    def __init__(self, greeting: str):
        self.greeting = greeting
        print(f"talker init: {greeting}", flush=True)

    def say(self, who: str) -> str:
        print(f"talker says {self.greeting} to {who}", flush=True)
        return f"{self.greeting} {who}"

    def chatter(self, lines: int) -> int:
        for i in range(lines):
            print(f"chatter {i:05d} " + "x" * 200, flush=True)
        return lines
"""


def text_with(fetch, needle: str, what: str, timeout: float = 30) -> str:
    """``fetch()``'s answer once it contains ``needle`` (logs ship asynchronously)."""
    return wait_for(lambda: (lambda text: text if needle in text else None)(fetch()), timeout, what)


def service_pods(kube: FakeKube, name: str) -> list[dict]:
    return [p for (res, ns, _), p in list(kube.store.objects.items())
            if res == "pods" and ns == NAMESPACE and p["metadata"]["labels"].get("serving.knative.dev/service") == name]


def test_service_logs_come_from_its_pods(plat, client, kube, tmp_path_factory):
    mod = e2e_code(tmp_path_factory.mktemp("kube_logs"), "kubelogs", LOGGING_SERVICE_CODE)
    talker = mod.Talker.deploy("hello", client=client, quiet=True)
    assert talker.say(who="ann") == "hello ann"
    namespace, name = talker.info()["knative_service"].split("/")
    (pod,) = service_pods(kube, name)
    labels = pod["metadata"]["labels"]
    assert labels["serving.knative.dev/revision"] == f"{name}-00001"
    assert labels["serving.knative.dev/configuration"] == name
    assert labels["app.kubernetes.io/managed-by"] == "opbox"
    assert [c["name"] for c in pod["spec"]["containers"]] == ["opbox", "queue-proxy"]
    assert pod["metadata"]["ownerReferences"][0]["kind"] == "ReplicaSet"
    assert ManifestValidator().errors({k: v for k, v in pod.items() if k != "status"}) == [], "a valid Pod"

    # the SDK and the CLI read them through the gateway, which reads the pods' logs (the fake
    # answers 400 to a log read without `container` for a two-container pod)
    logs = text_with(talker.logs, "talker says hello to ann", "the call's output in the service's logs")
    assert "talker init: hello" in logs and "opbox serve: kubelogs:Talker ready" in logs
    assert f"==> pod {pod['metadata']['name']} (revision {name}-00001, Running) <==" in logs
    env = {**os.environ, "OPBOX_URL": plat.url, "OPBOX_TOKEN": plat.token, "OPBOX_WORKSPACE": plat.workspace}
    out = subprocess.run([sys.executable, "-m", "opbox.cli", "logs", "--service", "Talker"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "talker init: hello" in out.stdout and "talker says hello to ann" in out.stdout

    # bounded: with a small limit, the newest output (the last line) and no more than the limit
    assert talker.chatter(lines=300) == 300
    http = plat.http()
    text = text_with(lambda: http.get(f"/{plat.workspace}/services/Talker/logs", params={"limit": 3000}).text,
                     "chatter 00299", "the newest line in a bounded read")
    assert len(text.encode()) <= 3000 and "chatter 00000" not in text
    assert text.rstrip().endswith("chatter 00299 " + "x" * 200)

    # a new revision: its pod replaces the old one, whose pod goes
    again = mod.Talker.deploy("bonjour", client=client, quiet=True)
    assert again.say(who="bob") == "bonjour bob"
    wait_for(lambda: [p["metadata"]["labels"]["serving.knative.dev/revision"] for p in service_pods(kube, name)]
             == [f"{name}-00002"], 30, "the old revision's pod going")
    logs = text_with(again.logs, "talker says bonjour to bob", "the new revision's output")
    assert "talker init: bonjour" in logs and "talker init: hello" not in logs
    again.delete()
    wait_for(lambda: not service_pods(kube, name), 30, "the Service's pods going with it")
    assert kube.state()["rejected"] == []
    # the run watch sees these pods too (managed-by=opbox) and leaves them be: no job-name label
    assert "handling a watch event failed" not in plat.log()


def test_service_logs_skip_vanished_pods_and_report_api_errors(kube, tmp_path):
    import asyncio
    import socket

    from kubernetes import client as k8s, config

    from fake_kube import write_kubeconfig
    from opbox.platform.backends.kubernetes.backend import KubernetesBackend, KubernetesSettings
    from opbox.platform.backends.kubernetes.knative import KnativeServices

    def knative(kubeconfig) -> KnativeServices:
        settings = KubernetesSettings(kubeconfig=str(kubeconfig))
        backend = KubernetesBackend(settings, gateway_url="http://gw", token_for=str,
                                    api=config.new_client_from_config(config_file=str(kubeconfig)))
        backend.core = k8s.CoreV1Api(backend._api)  # what start() does, without the watches
        return KnativeServices(backend)

    services = knative(kube.kubeconfig)
    assert asyncio.run(services._pod_log(NAMESPACE, "no-such-pod", 1000)) is None  # gone: skipped
    assert asyncio.run(services.logs(f"{WORKSPACE}/no-such-service", 1000)) == ""
    with socket.socket() as unused:  # a loopback port nothing listens on: the API server is down
        unused.bind(("127.0.0.1", 0))
        down = knative(write_kubeconfig(tmp_path / "down", f"http://127.0.0.1:{unused.getsockname()[1]}"))
        with pytest.raises(Unavailable, match=f"cannot list the pods of Knative Service {NAMESPACE}/talker"):
            asyncio.run(down.logs(f"{WORKSPACE}/Talker", 1000))


ROLLING_CODE = """
from opbox import operator

@operator()
class Greeter:
    def __init__(self, word: str, pad: str = ""):
        if word == "crash":
            raise RuntimeError("this revision cannot start")
        self.word, self.pad = word, len(pad)

    def greet(self) -> str:
        return f"{self.word} {self.pad}"
"""


def test_rollouts_keep_the_ready_revision_serving_and_report_their_state(plat, client, kube, tmp_path_factory):
    from concurrent.futures import ThreadPoolExecutor

    from opbox.errors import OpboxError, ValidationError

    mod = e2e_code(tmp_path_factory.mktemp("kube_roll"), "kuberoll", ROLLING_CODE)
    big = "x" * 300_000  # past what one environment variable may hold (128 KiB: E2BIG)
    first = mod.Greeter.deploy("hello", big, client=client, quiet=True)
    assert first.greet() == "hello 300000"
    name = first.info()["knative_service"].split("/")[1]
    (container,) = kube.store.get("services", NAMESPACE, name)["spec"]["template"]["spec"]["containers"]
    assert max(len(e.get("value") or "") for e in container["env"]) < 4096, "the init args are not in the env"
    http = plat.http()

    kube.configure_node(hold_rollouts=True)  # the new revision comes up slowly
    try:
        with ThreadPoolExecutor(1) as pool:
            redeploy = pool.submit(mod.Greeter.deploy, "bonjour", client=client, quiet=True)
            wait_for(lambda: kube.store.get("services", NAMESPACE, name).get("status", {}).get(
                "observedGeneration") == 2, 120, "the rollout starting")
            during = http.get(f"/{plat.workspace}/services/Greeter").json()
            assert during["status"] == "ready" and during["rollout"]["state"] == "in_progress", during
            assert first.greet() == "hello 300000", "the old revision answers during the rollout"
            kube.configure_node(hold_rollouts=False)
            second = redeploy.result(timeout=120)
    finally:
        kube.configure_node(hold_rollouts=False)
    assert second.greet() == "bonjour 0"
    assert http.get(f"/{plat.workspace}/services/Greeter").json()["rollout"]["state"] == "complete"

    kube.configure_node(progress_deadline=10)  # a revision whose constructor fails never becomes ready
    try:
        with pytest.raises(OpboxError, match="(?s)could not roll out.*the previous revision goes on serving"):
            mod.Greeter.deploy("crash", client=client, quiet=True)
    finally:
        kube.configure_node(progress_deadline=600)
    after = http.get(f"/{plat.workspace}/services/Greeter").json()
    assert after["status"] == "ready" and after["rollout"]["state"] == "failed", after
    assert after["rollout"]["error"]["reason"] == "ProgressDeadlineExceeded"
    assert second.greet() == "bonjour 0", "calls still reach the last ready revision"
    env = {**os.environ, "OPBOX_URL": plat.url, "OPBOX_TOKEN": plat.token, "OPBOX_WORKSPACE": plat.workspace}
    out = subprocess.run([sys.executable, "-m", "opbox.cli", "services"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "ROLLOUT" in out.stdout, out.stdout + out.stderr
    assert out.stdout.splitlines()[1].split()[2:6] == [str(second.info()["version"]), "ready", "0/1", "failed"]
    assert second.info()["version"] == second.info()["latest_version"] - 1, "the ready revision is the older one"

    # what Knative's webhook would refuse is refused at deploy, in opbox's words; nothing changes
    generation = kube.store.get("services", NAMESPACE, name)["metadata"]["generation"]
    with pytest.raises(ValidationError, match="concurrency 2000 is more than Knative allows: at most 1000"):
        mod.Greeter.deploy("hi", client=client, quiet=True, concurrency=2000)
    with pytest.raises(ValidationError, match=r"scale_to_zero 7200 s is more than Knative allows: at most 3600 s"):
        mod.Greeter.deploy("hi", client=client, quiet=True, scale_to_zero=7200)
    assert kube.store.get("services", NAMESPACE, name)["metadata"]["generation"] == generation
    assert http.get(f"/{plat.workspace}/services/Greeter").json()["concurrency"] == 16
    second.delete()
    assert kube.state()["rejected"] == []


def test_evicted_and_stranded_runs_run_again_without_spending_a_retry(fns, kube):
    from kubernetes import client as k8s, config

    core = k8s.CoreV1Api(config.new_client_from_config(config_file=str(kube.kubeconfig)))
    core.create_node({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "fake-node-2"},
                      "status": {"allocatable": {"cpu": "8", "memory": "32Gi", "pods": "110"}}})
    try:
        for disrupt in (lambda pod: kube.evict(NAMESPACE, pod, "The node was low on resource: memory."),
                        lambda pod: kube.lose_node("fake-node")):
            run = fns["sleeper"].submit(3)
            pod = wait_for(lambda: [p for p in pods_of(kube, run.id) if p["status"].get("phase") == "Running"],
                           60, "the run's pod running")[0]
            disrupt(pod["metadata"]["name"])
            assert run.result(timeout=120) == run.id, "run again to the end"
            status = run.status()
            assert status["attempt"] == 0, "no retry spent"
            assert (status["exit_reason"] or "").startswith("evicted: "), status  # why it ran twice
            assert ("low on resource" in status["exit_reason"]) or ("DeletionByTaintManager" in status["exit_reason"])
            names = sorted(j["metadata"]["name"] for j in jobs_of(kube, run.id))
            assert names == [f"opbox-run-{run.id.lower()}", f"opbox-run-{run.id.lower()}-d1"], names
    finally:
        node = kube.store.get("nodes", None, "fake-node")
        node["spec"].pop("taints", None)
        kube.store.put("nodes", node)
        core.delete_node("fake-node-2")


SECRET_CODE = """
import os
from opbox import operator

@operator(secrets=["kube-hf"])
def read_secret(_=None):
    return os.environ.get("HF_TOKEN")
"""


def test_workspace_secrets_become_kubernetes_secrets_that_runs_and_workers_load(plat, client, kube, tmp_path_factory):
    client.request("PUT", "/secrets/kube-hf", json={"values": {"HF_TOKEN": "first-value"}})
    made = kube.store.get("secrets", NAMESPACE, "opbox-secret-kube-hf")
    assert made["metadata"]["labels"]["opbox.dev/secret"] == "kube-hf" and made["data"] == {"HF_TOKEN": "Zmlyc3QtdmFsdWU="}
    mod = e2e_code(tmp_path_factory.mktemp("kube_secret"), "kubesecretmod", SECRET_CODE)
    fn = mod.read_secret.deploy(client=client, quiet=True)
    run = fn.submit()
    assert run.result(timeout=60) == "first-value"
    (job,) = jobs_of(kube, run.id)
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["envFrom"] == [{"secretRef": {"name": "opbox-secret-kube-hf"}}]
    assert "first-value" not in json.dumps(job)
    assert fn.map([1, 2, 3], progress=False) == ["first-value"] * 3  # worker pods load it too
    client.request("PUT", "/secrets/kube-hf", json={"values": {"HF_TOKEN": "second-value"}})
    assert kube.store.get("secrets", NAMESPACE, "opbox-secret-kube-hf")["data"] == {"HF_TOKEN": "c2Vjb25kLXZhbHVl"}
    assert fn() == "second-value"
    client.request("DELETE", "/secrets/kube-hf")
    assert kube.store.get("secrets", NAMESPACE, "opbox-secret-kube-hf") is None


def test_cancelling_a_map_deletes_its_busy_worker_pods(fns, kube, plat):
    from concurrent.futures import ThreadPoolExecutor

    http = plat.http()
    job_id = fns["sleeper"].job_id
    with ThreadPoolExecutor(1) as pool:
        mapped = pool.submit(fns["sleeper"].map, [120] * 4, progress=False)  # two workers (2 items each)
        batch = wait_for(lambda: [b for b in http.get(f"/{plat.workspace}/batches").json()["batches"]
                                  if b["job_id"] == job_id and b["total"] == 4 and not b["cancelled"]
                                  and b["done"] < 4][:1], 60, "the map's batch")[0]
        progress = f"/{plat.workspace}/batches/{batch['id']}/progress"
        wait_for(lambda: http.get(progress).json()["counts"].get("running", 0) >= 2, 90, "two items leased")
        busy = {p["metadata"]["name"] for p in kube.store.list("pods", NAMESPACE)
                if p["metadata"]["labels"].get("opbox.dev/job") == job_id.lower()
                and p["metadata"]["labels"].get("opbox.dev/worker") == "pool" and p["status"].get("phase") == "Running"}
        assert busy
        assert http.post(f"/{plat.workspace}/batches/{batch['id']}/cancel").status_code == 200
        with pytest.raises(Exception):
            mapped.result(timeout=120)
    wait_for(lambda: not busy & {p["metadata"]["name"] for p in kube.store.list("pods", NAMESPACE)}, 60,
             "the busy worker pods deleted (a pod cannot be signalled)")
    deleted = {path.rsplit("/", 1)[-1] for method, path in kube.store.requests if method == "DELETE" and "/pods/" in path}
    assert busy <= deleted, "the gateway deleted them, not a Job's deletion"
