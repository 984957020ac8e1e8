"""The fake API server refuses and behaves as the real control plane does (tests/fake_kube/admission.py,
scheduler.py, node.py), so the backend's tests mean something: each test below shows one rule,
talking to the fake with the real kubernetes client."""

from __future__ import annotations


import httpx
import pytest

from fake_kube import FakeKube, wait_for
from podman_env import podman  # noqa: F401 (fixture)
from opbox.builder.image import DEFAULT_BASE_IMAGE

NS = "opbox-fake-rules"
# a replica that answers every path (its --port is moved by the fake), or exits at once when told to
SERVER = ("import sys, http.server\n"
          "port = int(sys.argv[sys.argv.index('--port') + 1])\n"
          "class H(http.server.BaseHTTPRequestHandler):\n"
          "    def do_GET(self):\n"
          "        self.send_response(200); self.end_headers(); self.wfile.write(sys.argv[1].encode())\n"
          "if sys.argv[1] == 'crash':\n"
          "    sys.exit(3)\n"
          "http.server.HTTPServer(('127.0.0.1', port), H).serve_forever()\n")


@pytest.fixture(scope="module")
def kube(podman, tmp_path_factory):
    with FakeKube(tmp_path_factory.mktemp("rules")) as fake:
        apis(fake)["core"].create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
        yield fake


def apis(kube: FakeKube) -> dict:
    from kubernetes import client, config

    api = config.new_client_from_config(config_file=str(kube.kubeconfig))
    return {"core": client.CoreV1Api(api), "batch": client.BatchV1Api(api), "custom": client.CustomObjectsApi(api)}


def refused(fn, *args) -> tuple[int, str]:
    from kubernetes.client.exceptions import ApiException

    with pytest.raises(ApiException) as info:
        fn(*args)
    return info.value.status, info.value.body


def job(name: str, *, image: str = "localhost/nothing:1", command=("true",), labels=None, **pod) -> dict:
    container = {"name": "main", "image": image, "command": list(command), **pod.pop("container", {})}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "labels": labels or {}},
            "spec": {"backoffLimit": 0, "template": {"spec": {"restartPolicy": "Never", "containers": [container],
                                                              **pod}}}}


def pods_of(kube: FakeKube, job_name: str) -> list[dict]:
    return [o for (res, ns, _), o in list(kube.store.objects.items())
            if res == "pods" and (o["metadata"].get("labels") or {}).get("job-name") == job_name]


def events_of(kube: FakeKube, name: str, reason: str) -> list[dict]:
    return [e for e in kube.store.list("events") if e["involvedObject"]["name"] == name and e["reason"] == reason]


def test_names_and_labels_are_validated(kube):
    core, batch = apis(kube)["core"], apis(kube)["batch"]
    assert refused(core.create_namespace, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "Bad_NS"}})[0] == 422
    code, body = refused(batch.create_namespaced_job, NS, job("My_Job"))
    assert code == 422 and "RFC 1123" in body
    assert refused(batch.create_namespaced_job, NS, job("j" * 64))[0] == 422  # its pods' job-name label
    code, body = refused(batch.create_namespaced_job, NS, job("ok", labels={"bad key!": "x"}))
    assert code == 422 and "bad key!" in body
    code, body = refused(batch.create_namespaced_job, NS, job("ok", labels={"a": "v" * 64}))
    assert code == 422 and "at most 63" in body
    code, body = refused(batch.create_namespaced_job, NS, job("ok", restartPolicy="Always"))
    assert code == 422 and "restartPolicy" in body
    code, body = refused(batch.create_namespaced_job, NS, job("ok", container={"name": "Run_X"}))
    assert code == 422 and "containers[0].name" in body
    kube.store.rejected.clear()


def test_jobs_get_server_defaults_and_immutable_fields(kube):
    batch = apis(kube)["batch"]
    # a node selector nothing matches: the pod stays Pending, nothing runs
    created = batch.create_namespaced_job(NS, job("defaults", nodeSelector={"pool": "none"})).to_dict()
    uid = created["metadata"]["uid"]
    spec = created["spec"]
    assert spec["selector"]["match_labels"] == {"batch.kubernetes.io/controller-uid": uid}
    assert spec["template"]["metadata"]["labels"]["batch.kubernetes.io/job-name"] == "defaults"
    assert (spec["completions"], spec["parallelism"], spec["completion_mode"], spec["suspend"]) == \
        (1, 1, "NonIndexed", False)
    assert spec["pod_replacement_policy"] == "TerminatingOrFailed"
    assert spec["template"]["spec"]["termination_grace_period_seconds"] == 30
    assert batch.create_namespaced_job(NS, job("defaults-6", nodeSelector={"pool": "none"})).spec.backoff_limit == 0
    changed = job("defaults", nodeSelector={"pool": "none"}, container={"image": "localhost/other:2"})
    code, body = refused(batch.replace_namespaced_job, "defaults", NS, changed)
    assert code == 422 and "spec.template" in body and "field is immutable" in body
    code, body = refused(batch.patch_namespaced_job, "defaults", NS,
                         {"spec": {"selector": {"matchLabels": {"x": "y"}}}})
    assert code == 422 and "spec.selector" in body
    # a mutable field may change
    assert batch.patch_namespaced_job("defaults", NS, {"spec": {"ttlSecondsAfterFinished": 5}}) \
        .spec.ttl_seconds_after_finished == 5
    kube.store.rejected.clear()
    for name in ("defaults", "defaults-6"):
        batch.delete_namespaced_job(name, NS, propagation_policy="Background")


def service(name: str, *, concurrency: int = 0, annotations=None, command=("python3", "-c", SERVER, "v1"),
            **template) -> dict:
    return {"apiVersion": "serving.knative.dev/v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"template": {"metadata": {"annotations": annotations or {}},
                                  "spec": {"containerConcurrency": concurrency, **template, "containers": [
                                      {"image": DEFAULT_BASE_IMAGE, "command": [*command, "--port", "8080"]}]}}}}


KSVC = ("serving.knative.dev", "v1", NS, "services")


def test_knative_webhook_rules(kube):
    custom = apis(kube)["custom"]
    created = custom.create_namespaced_custom_object(*KSVC, service("hooks"))
    annotations = created["metadata"]["annotations"]
    assert annotations["serving.knative.dev/creator"] == annotations["serving.knative.dev/lastModifier"] != ""
    assert created["spec"]["traffic"] == [{"latestRevision": True, "percent": 100}]
    assert created["spec"]["template"]["spec"]["timeoutSeconds"] == 300

    # a replace without the creator annotation (a freshly rendered manifest) is denied
    fresh = service("hooks", concurrency=5)
    created = custom.get_namespaced_custom_object(*KSVC, "hooks")
    fresh["metadata"]["resourceVersion"] = created["metadata"]["resourceVersion"]
    code, body = refused(custom.replace_namespaced_custom_object, *KSVC, "hooks", fresh)
    assert code == 400 and "denied the request" in body and "annotation value is immutable" in body
    # so is one that changes lastModifier without changing the spec
    created = custom.get_namespaced_custom_object(*KSVC, "hooks")
    same = {**created, "metadata": {**created["metadata"], "annotations": {
        **annotations, "serving.knative.dev/lastModifier": "someone-else"}}}
    code, body = refused(custom.replace_namespaced_custom_object, *KSVC, "hooks", same)
    assert code == 400 and "lastModifier" in body
    # a merge patch keeps the annotations
    patched = custom.patch_namespaced_custom_object(*KSVC, "hooks", {"spec": fresh["spec"]})
    assert patched["metadata"]["annotations"]["serving.knative.dev/creator"] == annotations["serving.knative.dev/creator"]
    assert patched["metadata"]["generation"] == 2

    for bad, words in ((service("cc", concurrency=1001), "containerConcurrency"),
                       (service("ret", annotations={
                           "autoscaling.knative.dev/scale-to-zero-pod-retention-period": "1h1s"}), "retention"),
                       (service("slow", timeoutSeconds=601), "timeoutSeconds"),
                       (service("1-svc"), "DNS-1035")):
        code, body = refused(custom.create_namespaced_custom_object, *KSVC, bad)
        assert code == 400 and words in body and "denied the request" in body, body
    assert custom.create_namespaced_custom_object(*KSVC, service("edge", concurrency=1000, timeoutSeconds=600, annotations={
        "autoscaling.knative.dev/scale-to-zero-pod-retention-period": "1h"}))["metadata"]["generation"] == 1
    kube.store.rejected.clear()
    for name in ("hooks", "edge"):
        custom.delete_namespaced_custom_object(*KSVC, name)


def conditions(obj: dict) -> dict:
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or []}


def test_knative_rollouts_keep_the_old_revision_serving(kube):
    custom = apis(kube)["custom"]
    custom.create_namespaced_custom_object(*KSVC, service("roll"))
    get = lambda: kube.store.get("services", NS, "roll")  # noqa: E731
    first = wait_for(lambda: conditions(get()).get("Ready", {}).get("status") == "True" and get(), 60, "v1 ready")
    url = first["status"]["url"]
    assert httpx.get(url).text == "v1"

    kube.configure_node(hold_rollouts=True)
    try:
        custom.patch_namespaced_custom_object(*KSVC, "roll", {"spec": service("roll", command=(
            "python3", "-c", SERVER, "v2"))["spec"]})
        rolling = wait_for(lambda: get()["status"]["observedGeneration"] == 2 and get(), 30, "the rollout starting")
        state = conditions(rolling)
        assert state["Ready"]["status"] == "Unknown" and state["ConfigurationsReady"]["status"] == "Unknown"
        assert state["RoutesReady"]["status"] == "True"
        assert rolling["status"]["latestReadyRevisionName"] == "roll-00001"
        assert rolling["status"]["latestCreatedRevisionName"] == "roll-00002"
        assert httpx.get(rolling["status"]["url"]).text == "v1"  # the old revision serves meanwhile
    finally:
        kube.configure_node(hold_rollouts=False)
    second = wait_for(lambda: conditions(get())["Ready"]["status"] == "True" and get(), 60, "v2 ready")
    assert httpx.get(second["status"]["url"]).text == "v2"

    # a revision that cannot start: Ready=False, RoutesReady=True, the traffic stays on the last good one
    custom.patch_namespaced_custom_object(*KSVC, "roll", {"spec": service("roll", command=(
        "python3", "-c", SERVER, "crash"))["spec"]})
    failed = wait_for(lambda: conditions(get())["Ready"]["status"] == "False" and get(), 60, "v3 failing")
    state = conditions(failed)
    assert state["ConfigurationsReady"]["reason"] == "RevisionFailed" and state["RoutesReady"]["status"] == "True"
    assert failed["status"]["traffic"] == [{"revisionName": "roll-00002", "latestRevision": False, "percent": 100}]
    assert httpx.get(failed["status"]["url"]).text == "v2"
    custom.delete_namespaced_custom_object(*KSVC, "roll")


def test_unschedulable_pods_stay_pending_with_the_schedulers_reason(kube):
    batch, core = apis(kube)["batch"], apis(kube)["core"]
    batch.create_namespaced_job(NS, job("gpu", container={"resources": {"limits": {"nvidia.com/gpu": "1"}}}))
    batch.create_namespaced_job(NS, job("picky", nodeSelector={"nvidia.com/gpu.product": "A100"}))
    for name, words in (("gpu", "Insufficient nvidia.com/gpu"), ("picky", "node(s) didn't match Pod's node affinity/selector")):
        pod = wait_for(lambda: [p for p in pods_of(kube, name) if p["status"].get("conditions")], 30, "a pending pod")[0]
        scheduled = conditions(pod)["PodScheduled"]
        assert pod["status"]["phase"] == "Pending" and "nodeName" not in pod["spec"]
        assert (scheduled["status"], scheduled["reason"]) == ("False", "Unschedulable")
        assert scheduled["message"] == f"0/1 nodes are available: 1 {words}."
        assert wait_for(lambda: events_of(kube, pod["metadata"]["name"], "FailedScheduling"), 10, "an Event")
    # a node that fits appears (as a cluster autoscaler would add it): the pod is bound to it
    core.create_node({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "gpu-node", "labels": {"nvidia.com/gpu.product": "A100"}},
                      "status": {"allocatable": {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "1"}}})
    for name in ("gpu", "picky"):
        wait_for(lambda: [p for p in pods_of(kube, name) if p["spec"].get("nodeName") == "gpu-node"], 30, "binding")
        batch.delete_namespaced_job(name, NS, propagation_policy="Background")
    core.delete_node("gpu-node")


def test_a_missing_secret_is_create_container_config_error(kube):
    batch = apis(kube)["batch"]
    batch.create_namespaced_job(NS, job("secretless", container={"envFrom": [{"secretRef": {"name": "absent"}}]}))

    def waiting():
        for pod in pods_of(kube, "secretless"):
            for status in pod["status"].get("containerStatuses") or []:
                return (status["state"].get("waiting") or {}).get("reason") == "CreateContainerConfigError" and status
    status = wait_for(waiting, 30, "CreateContainerConfigError")
    assert status["state"]["waiting"]["message"] == 'secret "absent" not found'
    batch.delete_namespaced_job("secretless", NS, propagation_policy="Background")


def test_secrets_data_is_base64_with_valid_keys_and_names(kube):
    core = apis(kube)["core"]

    def secret(name, data=None, string_data=None):
        body = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "type": "Opaque"}
        if data is not None:
            body["data"] = data
        if string_data is not None:
            body["stringData"] = string_data
        return body

    code, body = refused(core.create_namespaced_secret, NS, secret("plain", {"K": "not base64!"}))
    assert code == 400 and "illegal base64 data" in body
    code, body = refused(core.create_namespaced_secret, NS, secret("Bad_Name", {"K": "dg=="}))
    assert code == 422 and "RFC 1123 subdomain" in body
    code, body = refused(core.create_namespaced_secret, NS, secret("badkey", {"no/slash": "dg=="}))
    assert code == 422 and "valid config key" in body
    code, body = refused(core.create_namespaced_secret, NS, secret("huge", string_data={"K": "x" * (1024 * 1024 + 1)}))
    assert code == 422 and "must have at most 1048576 bytes" in body
    made = core.create_namespaced_secret(NS, secret("good", {"K": "dg=="}, {"S": "plain text"}))
    assert made.data == {"K": "dg==", "S": "cGxhaW4gdGV4dA=="} and made.string_data is None
    assert refused(core.replace_namespaced_secret, "good", NS, secret("good", {"K": "%%%"}))[0] == 400
    core.delete_namespaced_secret("good", NS)


def test_indexed_jobs_run_a_pod_per_index_and_grow_in_tandem(kube):
    """completionMode Indexed: a pod per index with JOB_COMPLETION_INDEX and the index label and annotation;
    completions may change only with parallelism (elastic Indexed Jobs); backoffLimitPerIndex 0: a failed
    index is not run again, the others go on, and the Job ends Failed (FailedIndexes)."""
    batch = apis(kube)["batch"]
    script = ("import os, sys; i = os.environ['JOB_COMPLETION_INDEX']; print('index', i, os.environ['WHO']); "
              "sys.exit(3 if i == '1' else 0)")
    body = job("indexed", image=DEFAULT_BASE_IMAGE, command=("python3", "-c", script), container={"env": [
        {"name": "IDX", "valueFrom": {"fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
        {"name": "WHO", "value": "w-$(IDX)"}]})
    body["spec"].update(completionMode="Indexed", completions=2, parallelism=2, backoffLimitPerIndex=0)
    del body["spec"]["backoffLimit"]
    batch.create_namespaced_job(NS, body)
    code, text = refused(batch.patch_namespaced_job, "indexed", NS, {"spec": {"completions": 3}})
    assert code == 422 and "in tandem with spec.parallelism" in text
    batch.patch_namespaced_job("indexed", NS, {"spec": {"completions": 3, "parallelism": 3}})

    def ended():
        found = kube.store.get("jobs", NS, "indexed")
        return found if any(c["type"] in ("Complete", "Failed") for c in found["status"].get("conditions") or []) else None
    done = wait_for(ended, 60, "the Job ending")
    status = done["status"]
    assert (status["completedIndexes"], status["failedIndexes"]) == ("0,2", "1")
    assert [c["reason"] for c in status["conditions"] if c["type"] == "Failed"] == ["FailedIndexes"]
    pods = sorted(pods_of(kube, "indexed"), key=lambda p: p["metadata"]["labels"]["batch.kubernetes.io/job-completion-index"])
    assert [p["metadata"]["name"].rsplit("-", 1)[0] for p in pods] == ["indexed-0", "indexed-1", "indexed-2"]
    assert "index 2 w-2" in kube.node.pod_log(NS, pods[2]["metadata"]["name"])
    batch.delete_namespaced_job("indexed", NS, propagation_policy="Background")
    batch.create_namespaced_job(NS, job("not-indexed"))
    code, text = refused(batch.patch_namespaced_job, "not-indexed", NS, {"spec": {"completions": 2, "parallelism": 2}})
    assert code == 422 and "in tandem with spec.parallelism for Indexed Jobs" in text
    batch.delete_namespaced_job("not-indexed", NS, propagation_policy="Background")


def test_refused_pod_creation_is_a_failed_create_event_and_no_pod(kube):
    core, batch = apis(kube)["core"], apis(kube)["batch"]
    core.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "opbox-strict", "labels": {
        "pod-security.kubernetes.io/enforce": "restricted"}}})
    batch.create_namespaced_job("opbox-strict", job("rooted"))
    event = wait_for(lambda: events_of(kube, "rooted", "FailedCreate"), 30, "FailedCreate")[0]
    assert event["type"] == "Warning" and event["source"]["component"] == "job-controller"
    assert 'violates PodSecurity "restricted:latest"' in event["message"] and "runAsNonRoot != true" in event["message"]
    # a compliant pod is admitted (a node selector keeps it from running)
    secure = {"allowPrivilegeEscalation": False, "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]},
              "seccompProfile": {"type": "RuntimeDefault"}}
    batch.create_namespaced_job("opbox-strict", job("compliant", nodeSelector={"pool": "none"},
                                                    container={"securityContext": secure}))
    wait_for(lambda: pods_of(kube, "compliant"), 30, "the compliant pod")

    core.create_namespaced_resource_quota(NS, {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "no-pods"}, "spec": {"hard": {"pods": "0"}}})
    batch.create_namespaced_job(NS, job("over-quota"))
    event = wait_for(lambda: events_of(kube, "over-quota", "FailedCreate"), 30, "FailedCreate")[0]
    assert "exceeded quota: no-pods, requested: pods=1, used: pods=0, limited: pods=0" in event["message"]
    assert pods_of(kube, "rooted") == [] and pods_of(kube, "over-quota") == []
    assert refused(core.create_namespaced_pod, NS, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "direct"}, "spec": {
        "containers": [{"name": "c", "image": "x"}]}})[0] == 403
    core.delete_namespaced_resource_quota("no-pods", NS)
    for ns, name in (("opbox-strict", "rooted"), ("opbox-strict", "compliant"), (NS, "over-quota")):
        batch.delete_namespaced_job(name, ns, propagation_policy="Background")


def test_disrupted_pods_carry_the_disruption_target_condition(kube):
    batch = apis(kube)["batch"]
    for name in ("evicted", "stranded"):
        batch.create_namespaced_job(NS, job(name, image=DEFAULT_BASE_IMAGE, command=("sleep", "120")))
    running = {name: wait_for(lambda: [p for p in pods_of(kube, name) if p["status"].get("phase") == "Running"],
                              60, "a running pod")[0] for name in ("evicted", "stranded")}
    kube.evict(NS, running["evicted"]["metadata"]["name"], "The node was low on resource: memory.")
    pod = wait_for(lambda: [p for p in pods_of(kube, "evicted") if p["status"]["phase"] == "Failed"], 30, "eviction")[0]
    assert (pod["status"]["reason"], pod["status"]["message"]) == ("Evicted", "The node was low on resource: memory.")
    target = conditions(pod)["DisruptionTarget"]
    assert (target["status"], target["reason"]) == ("True", "TerminationByKubelet")

    seen = []
    assert running["stranded"]["metadata"]["name"] in kube.lose_node("fake-node")
    wait_for(lambda: seen.extend(pods_of(kube, "stranded")) or not pods_of(kube, "stranded"), 30, "the pod deleted")
    last = [p for p in seen if "DisruptionTarget" in conditions(p)][-1]
    assert conditions(last)["DisruptionTarget"]["reason"] == "DeletionByTaintManager"
    for name in ("evicted", "stranded"):
        failed = wait_for(lambda: conditions(kube.store.get("jobs", NS, name)).get("Failed"), 30, "the Job failing")
        assert failed["reason"] == "BackoffLimitExceeded"
        batch.delete_namespaced_job(name, NS, propagation_policy="Background")
    node = kube.store.get("nodes", None, "fake-node")  # back, for the other tests
    node["spec"].pop("taints", None)
    kube.store.put("nodes", node)


def test_lists_come_in_pages(kube):
    core = apis(kube)["core"]
    for i in range(5):
        core.create_namespaced_secret(NS, {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": f"page-{i}", "labels": {"paged": "yes"}}})
    names, token, pages = [], None, 0
    while True:
        page = core.list_namespaced_secret(NS, label_selector="paged=yes", limit=2, _continue=token)
        names += [s.metadata.name for s in page.items]
        pages += 1
        token = page.metadata._continue
        if not token:
            break
    assert names == [f"page-{i}" for i in range(5)] and pages == 3


def test_image_pulls_are_retried_with_backoff(kube):
    batch = apis(kube)["batch"]
    kube.configure_node(pull_failures={DEFAULT_BASE_IMAGE: 2})
    batch.create_namespaced_job(NS, job("pulled", image=DEFAULT_BASE_IMAGE, command=("true",)))
    seen = set()

    def complete():
        for pod in pods_of(kube, "pulled"):
            for status in pod["status"].get("containerStatuses") or []:
                seen.add((status["state"].get("waiting") or {}).get("message", ""))
        return conditions(kube.store.get("jobs", NS, "pulled")).get("Complete")
    wait_for(complete, 60, "the Job completing after the registry recovered")
    assert any("429 Too Many Requests" in message for message in seen)
    batch.delete_namespaced_job("pulled", NS, propagation_policy="Background")
