"""Runs whose pod cannot start, against the stricter fake API server: the kubernetes backend alone
(no gateway), its RunEvents recorded. Unschedulable pods, missing Secrets, refused pod creation,
image pulls that fail for a while, the per-workspace share of slots, the token Secret of a
refused Job, and paginated relists."""

from __future__ import annotations

import asyncio
import re

import pytest

from fake_kube import FakeKube
from podman_env import podman  # noqa: F401 (fixture)
from opbox.builder.base import Artifact
from opbox.builder.image import DEFAULT_BASE_IMAGE
from opbox.platform.backends.base import RunTicket, VersionInfo
from opbox.platform.backends.kubernetes.backend import KubernetesBackend
from opbox.platform.backends.kubernetes.config import KubernetesSettings
from opbox.platform.backends.kubernetes.watch import Watcher
from opbox.resource import Resource


class Events:
    """RunEvents, recorded: how each run ended (or was sent back) as the backend said."""

    def __init__(self):
        self.lost: dict[str, tuple[str, str]] = {}
        self.disrupted: list[tuple[str, str]] = []

    def run_args(self, run_id):
        return None

    def run_started(self, run_id, worker, pooled=False):
        return True

    def run_finished(self, run_id, outcome, payload, error_type=None):
        pass

    def run_lost(self, run_id, reason, status="failed"):
        self.lost[run_id] = (status, reason)

    def run_disrupted(self, run_id, reason):
        self.disrupted.append((run_id, reason))

    def append_log(self, run_id, data):
        pass


@pytest.fixture(scope="module")
def kube(podman, tmp_path_factory):
    with FakeKube(tmp_path_factory.mktemp("pending")) as fake:
        yield fake


def version(workspace: str, image: str = DEFAULT_BASE_IMAGE, resource: Resource | None = None) -> VersionInfo:
    return VersionInfo(workspace=workspace, job_id="job-1", job_name="fn", version=1, kind="function",
                       entry="main:fn", resource=resource or Resource(), artifact=Artifact(image=image))


async def wait_for(predicate, timeout: float = 60, what: str = "condition"):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what} did not happen within {timeout} s")


def run(kube: FakeKube, scenario, **settings):
    """``scenario(backend, events)`` with a started backend talking to the fake."""
    async def main():
        events = Events()
        backend = KubernetesBackend(KubernetesSettings(kubeconfig=str(kube.kubeconfig), **settings),
                                    gateway_url="http://127.0.0.1:9", token_for=lambda scope: "token")
        await backend.start(events)
        try:
            return await scenario(backend, events)
        finally:
            await backend.close()
    return asyncio.run(main())


def submit(backend, workspace: str, run_id: str, **kw) -> None:
    backend.submit(RunTicket(run_id, workspace, "job-1", 1, None), version(workspace, **kw))


def make_namespace(kube: FakeKube, name: str, labels: dict | None = None, hard: dict | None = None) -> None:
    from kubernetes import client, config

    core = client.CoreV1Api(config.new_client_from_config(config_file=str(kube.kubeconfig)))
    core.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels or {}}})
    if hard:
        core.create_namespaced_resource_quota(name, {"apiVersion": "v1", "kind": "ResourceQuota",
                                                     "metadata": {"name": "limits"}, "spec": {"hard": hard}})


def test_an_unschedulable_run_fails_after_the_pending_timeout_with_the_schedulers_words(kube):
    async def scenario(backend, events):
        submit(backend, "gpus", "r-gpu", resource=Resource(gpu_count=1))
        waiting = await wait_for(lambda: backend.describe("gpus")["jobs"]["waiting"].get("r-gpu"), 30, "a reason")
        assert "Unschedulable: 0/1 nodes are available: 1 Insufficient nvidia.com/gpu." in waiting
        status, reason = await wait_for(lambda: events.lost.get("r-gpu"), 30, "the pending timeout")
        assert status == "failed" and reason.startswith("the run's pod did not start within 2 s")
        assert "Insufficient nvidia.com/gpu" in reason
        await wait_for(lambda: kube.store.get("jobs", "opbox-gpus", "opbox-run-r-gpu") is None, 30, "Job deleted")
    run(kube, scenario, pending_timeout=2)


def test_a_missing_secret_fails_the_run_at_once(kube):
    async def scenario(backend, events):
        submit(backend, "secrets", "r-secret")
        status, reason = await wait_for(lambda: events.lost.get("r-secret"), 60, "the run failing")
        assert "cannot start: CreateContainerConfigError: secret \"absent\" not found" in reason
        assert "did not start within" not in reason
    run(kube, scenario, secrets=("absent",), pending_timeout=600)


def test_refused_pod_creation_podsecurity_at_once_quota_after_the_pending_timeout(kube):
    make_namespace(kube, "opbox-strict", labels={"pod-security.kubernetes.io/enforce": "restricted"})
    make_namespace(kube, "opbox-full", hard={"pods": "0"})

    async def scenario(backend, events):
        submit(backend, "strict", "r-psa")
        submit(backend, "full", "r-quota")
        _, reason = await wait_for(lambda: events.lost.get("r-psa"), 60, "the PodSecurity refusal")
        assert reason.startswith("the Job cannot make its pod: Error creating: pods ")
        assert 'violates PodSecurity "restricted:latest"' in reason and "did not start within" not in reason
        _, reason = await wait_for(lambda: events.lost.get("r-quota"), 60, "the quota refusal")
        assert reason.startswith("the run's pod did not start within 3 s")
        assert "exceeded quota: limits, requested: pods=1, used: pods=0, limited: pods=0" in reason
    run(kube, scenario, pending_timeout=3, run_as_non_root=False)  # pods as the image's user: not "restricted"


def test_a_workspace_namespace_is_sealed(kube):
    async def scenario(backend, events):
        submit(backend, "sealed", "r-sealed")
        _, reason = await wait_for(lambda: events.lost.get("r-sealed"), 60, "the run ending")
        assert "exited with code 1" in reason, "its pod was admitted under PodSecurity restricted and ran"
    run(kube, scenario, resource_quota={"pods": "20", "requests.nvidia.com/gpu": "0"},
        limit_range={"default": {"memory": "512Mi"}, "defaultRequest": {"cpu": "100m"}})
    labels = kube.store.get("namespaces", None, "opbox-sealed")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    assert labels["pod-security.kubernetes.io/warn"] == labels["pod-security.kubernetes.io/audit"] == "restricted"
    policy = kube.store.get("networkpolicies", "opbox-sealed", "opbox-egress")["spec"]
    assert policy["podSelector"] == {} and policy["policyTypes"] == ["Egress"]
    allowed = [rule["to"][0]["podSelector"]["matchLabels"] for rule in policy["egress"]]
    assert allowed == [{"k8s-app": "kube-dns"}, {"app.kubernetes.io/component": "gateway"}]
    assert kube.store.get("resourcequotas", "opbox-sealed", "opbox")["spec"]["hard"]["pods"] == "20"
    assert kube.store.get("limitranges", "opbox-sealed", "opbox")["spec"]["limits"][0]["type"] == "Container"
    (pod,) = [p for p in kube.store.list("pods", "opbox-sealed")]
    security = pod["spec"]["containers"][0]["securityContext"]
    assert (security["runAsUser"], security["readOnlyRootFilesystem"]) == (10001, True)
    assert kube.state()["rejected"] == []


def test_the_token_secret_goes_when_the_job_is_refused(kube):
    make_namespace(kube, "opbox-nojobs", hard={"count/jobs.batch": "0"})

    async def scenario(backend, events):
        submit(backend, "nojobs", "r-refused")
        _, reason = await wait_for(lambda: events.lost.get("r-refused"), 30, "the refusal")
        assert "could not create the run's Job opbox-nojobs/opbox-run-r-refused: 403 Forbidden" in reason
        assert "exceeded quota" in reason
        await wait_for(lambda: not [k for k in kube.store.objects if k[0] == "secrets" and k[1] == "opbox-nojobs"],
                       30, "the token Secret deleted")
    run(kube, scenario)


def test_image_pulls_are_retried_for_their_patience(kube):
    kube.configure_node(pull_failures={DEFAULT_BASE_IMAGE: 2})

    async def scenario(backend, events):
        submit(backend, "pulls", "r-flaky")  # the base image has no opbox: its container exits 1 once pulled
        submit(backend, "pulls", "r-missing", image="localhost/opbox-no-such-image:1")
        _, reason = await wait_for(lambda: events.lost.get("r-flaky"), 60, "the run ending")
        assert "ImagePullBackOff" not in reason and "exited with code 1" in reason
        _, reason = await wait_for(lambda: events.lost.get("r-missing"), 60, "the pull giving up")
        assert re.search(r"cannot start: (ErrImagePull|ImagePullBackOff): .*opbox-no-such-image", reason), reason
        assert "(still after 2 s of retries)" in reason
    run(kube, scenario, image_pull_patience=2, pending_timeout=600)


def test_each_workspace_gets_its_share_of_slots(kube):
    async def scenario(backend, events):
        for i in range(3):  # stuck: no node has a GPU
            submit(backend, "greedy", f"r-greedy-{i}", resource=Resource(gpu_count=1))
        submit(backend, "modest", "r-modest", resource=Resource(gpu_count=1))
        jobs = lambda ns: [k for k in kube.store.objects if k[0] == "jobs" and k[1] == ns]  # noqa: E731
        await wait_for(lambda: jobs("opbox-modest") and jobs("opbox-greedy"), 30, "a Job of each workspace")
        assert len(backend.inflight) == 2 and backend.describe("greedy")["jobs"]["queued"] == 2
        assert sorted(backend.inflight.values()) == ["greedy", "modest"], "one slot each, two left free"
        assert len(jobs("opbox-greedy")) == 1
    run(kube, scenario, max_inflight=4, workspace_inflight=1, pending_timeout=600)


def test_relists_come_a_page_at_a_time(kube):
    from kubernetes import client, config

    core = client.CoreV1Api(config.new_client_from_config(config_file=str(kube.kubeconfig)))
    make_namespace(kube, "opbox-paged")
    for i in range(5):
        core.create_namespaced_secret("opbox-paged", {"apiVersion": "v1", "kind": "Secret", "metadata": {
            "name": f"s-{i}", "labels": {"paged": "yes"}}})
    delivered = []
    watcher = Watcher("secrets", core.list_secret_for_all_namespaces, lambda *a: delivered.append(a),
                      label_selector="paged=yes", page=2)
    before = kube.state()["resourceVersion"], kube.store.pages
    watcher._list()
    assert kube.store.pages - before[1] == 3, "three pages of at most two"
    assert [a[1]["metadata"]["name"] for a in delivered if a[0] == "MODIFIED"] == [f"s-{i}" for i in range(5)]
    kind, present, _ = delivered[-1]
    assert kind == "SYNC" and present == {("opbox-paged", f"s-{i}") for i in range(5)}
    assert int(watcher.resource_version) >= before[0]


def test_an_api_refusal_of_a_service_is_a_clear_error_and_changes_nothing(kube):
    from opbox.errors import ClusterRefused
    from opbox.platform.backends.base import ServiceInfo

    async def scenario(backend, events):
        class_version = VersionInfo(workspace="absent", job_id="job-2", job_name="Model", version=1, kind="class",
                                    entry="main:Model", resource=Resource(), artifact=Artifact(image=DEFAULT_BASE_IMAGE))
        info = ServiceInfo(workspace="absent", name="model", version=class_version)
        with pytest.raises(ClusterRefused, match='the cluster refused Knative Service opbox-absent/model: '
                                                 '404 NotFound: namespaces "opbox-absent" not found') as raised:
            await backend.knative.deploy(info, 0)
        assert raised.value.status == 502 and raised.value.details["status"] == 404
        assert "absent/model" not in backend.knative.services, "no service is left half-known"
    run(kube, scenario, create_namespaces=False)  # the namespaces must exist, and this one does not


def test_workspace_secrets_are_kubernetes_secrets_loaded_by_env_from(kube):
    from opbox.errors import ClusterRefused

    async def scenario(backend, events):
        await backend.put_secret("vault", "hf_token", {"HF_TOKEN": "v1", "MULTI": "two\nlines"})
        made = kube.store.get("secrets", "opbox-vault", "opbox-secret-hf-token-" + _digest("hf_token"))
        assert made["data"] == {"HF_TOKEN": "djE=", "MULTI": "dHdvCmxpbmVz"} and made["type"] == "Opaque"
        assert made["metadata"]["labels"]["opbox.dev/secret"] == "hf_token"
        await backend.put_secret("vault", "hf_token", {"HF_TOKEN": "v2"})  # set again: replaced
        made = kube.store.get("secrets", "opbox-vault", made["metadata"]["name"])
        assert made["data"] == {"HF_TOKEN": "djI="}
        await backend.put_secret("vault", "other", {"K": "v"})
        secrets = Resource(secrets=["hf_token", "other"])
        submit(backend, "vault", "r-has", resource=secrets)  # the base image has no opbox: exits 1 once started
        _, reason = await wait_for(lambda: events.lost.get("r-has"), 60, "the run ending")
        assert "exited with code 1" in reason, reason
        (job,) = [o for (res, ns, name), o in kube.store.objects.items() if res == "jobs" and name == "opbox-run-r-has"]
        container = job["spec"]["template"]["spec"]["containers"][0]
        assert container["envFrom"] == [{"secretRef": {"name": made["metadata"]["name"]}},
                                        {"secretRef": {"name": "opbox-secret-other"}}]
        assert "v2" not in str(job), "values stay in the Secret, never in the Job"
        await backend.delete_secret("vault", "other")
        await backend.delete_secret("vault", "other")  # nothing left to delete is fine
        assert kube.store.get("secrets", "opbox-vault", "opbox-secret-other") is None
        submit(backend, "vault", "r-lacks", resource=secrets)
        _, reason = await wait_for(lambda: events.lost.get("r-lacks"), 60, "the run failing")
        assert 'CreateContainerConfigError: secret "opbox-secret-other" not found' in reason
        assert "(the workspace secret 'other' is not in the cluster: set it again with `opbox secrets set other" in reason
        with pytest.raises(ClusterRefused, match=r"the cluster refused Secret opbox-vault/opbox-secret-big \(secret "
                                                 r"'big'\): 422 Invalid: .*must have at most 1048576 bytes"):
            await backend.put_secret("vault", "big", {"K": "x" * (1024 * 1024 + 1)})
    run(kube, scenario, pending_timeout=600)
    assert kube.state()["rejected"][-1].startswith("Secret/opbox-secret-big")


def _digest(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:8]


def test_the_gateway_reads_only_what_it_labelled(kube):
    """Cluster-wide lists and watches carry opbox's label selector; Events (which carry no labels of
    ours) are read per workspace namespace, never cluster-wide; workspace namespaces are labelled."""
    first = len(kube.store.queries)

    async def scenario(backend, events):
        submit(backend, "narrow", "r-narrow")
        await wait_for(lambda: events.lost.get("r-narrow"), 60, "the run ending")
        await wait_for(lambda: [q for q in kube.store.queries[first:] if "/events" in q[1]], 30, "the event watch")
    run(kube, scenario)
    reads = [(path, query) for method, path, query in kube.store.queries[first:] if method == "GET"]
    cluster_wide = [(path, query) for path, query in reads if "/namespaces/" not in path]
    assert {path for path, _ in cluster_wide} == {"/apis/batch/v1/jobs", "/api/v1/pods"}
    assert all(query.get("labelSelector") == "app.kubernetes.io/managed-by=opbox" for _, query in cluster_wide)
    event_reads = [(path, query) for path, query in reads if path.endswith("/events")]
    assert event_reads and all(path == "/api/v1/namespaces/opbox-narrow/events" and
                               "reason=FailedCreate" in query["fieldSelector"]
                               for path, query in event_reads)
    labels = kube.store.get("namespaces", None, "opbox-narrow")["metadata"]["labels"]
    assert labels["opbox.dev/workspace"] == "narrow" and labels["app.kubernetes.io/managed-by"] == "opbox"


def test_a_pools_workers_are_one_indexed_job_grown_by_patches(kube):
    """The spawner alone: a burst of workers is one Job; a worker asked for while the Job's workers are
    the pool's joins it (completions and parallelism patched together); each pod is its index's worker."""
    import hashlib

    from opbox.platform.backends.pools import Pool, Worker

    async def scenario(backend, events):
        spawner = backend.spawner
        pool = Pool(version=version("grow"))

        def make() -> Worker:
            worker_id, token = spawner.identity(pool)
            worker = Worker(id=worker_id, pool=pool, token=token, token_hash=hashlib.sha256(token.encode()).digest())
            pool.workers[worker.id] = worker
            return worker

        first = [make(), make()]
        handles = await asyncio.gather(*(spawner.spawn(w) for w in first))
        name = handles[0].job.name
        assert [w.id for w in first] == [f"{name}-0", f"{name}-1"] and first[0].token == first[1].token
        job = kube.store.get("jobs", "opbox-grow", name)
        assert (job["spec"]["completions"], job["spec"]["parallelism"]) == (2, 2)
        third = make()
        handles.append(await spawner.spawn(third))
        assert third.id == f"{name}-2"
        job = kube.store.get("jobs", "opbox-grow", name)
        assert (job["spec"]["completions"], job["spec"]["parallelism"]) == (3, 3), "one patch, not a new Job"
        assert ("PATCH", f"/apis/batch/v1/namespaces/opbox-grow/jobs/{name}") in kube.store.requests
        pods = await wait_for(lambda: len([p for p in kube.store.list("pods", "opbox-grow")
                                           if p["metadata"]["labels"]["job-name"] == name]) == 3 and
                              kube.store.list("pods", "opbox-grow"), 60, "a pod per index")
        env = {e["name"]: e for e in pods[0]["spec"]["containers"][0]["env"]}
        assert env["OPBOX_WORKER_ID"]["value"] == f"{name}-$(OPBOX_WORKER_INDEX)"
        # the base image has no opbox: each worker's pod exits 1, ending its handle (index failed, not rerun)
        codes = await asyncio.wait_for(asyncio.gather(*(h.wait() for h in handles)), 60)
        assert all(code == 1 for code in codes)
        for worker in [*first, third]:
            pool.workers.pop(worker.id, None)
        assert spawner.identity(pool)[0].rsplit("-", 1)[0] != name, "a Job whose workers all left takes no more"
    run(kube, scenario, pending_timeout=600)
    assert [c for c in kube.state()["rejected"] if "opbox-workers" in c] == []
