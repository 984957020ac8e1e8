"""Fidelity of what opbox hands Kubernetes: ``manifests/`` and the Jobs and Knative Services it renders.

Built-in kinds are checked with kubernetes-validate's strict schemas (unknown fields fail) for
several Kubernetes versions; Knative Services against the Knative CRD's structural
openAPIV3Schema, applying the API server's rules for unknown fields. All offline: the
Kubernetes schemas ship inside kubernetes-validate, the CRD is a file. With CI=true a missing
validator or CRD fails the run instead of skipping.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml

from opbox.errors import ValidationError
from opbox.platform.backends.kubernetes import render as r
from opbox.resource import Resource

from fake_kube.admission import restricted_violations  # PodSecurity "restricted", as the fake enforces it
from k8s_schemas import (  # the validators, shared with the fake API server (tests/fake_kube)
    CRD_PATH,
    K8S_VERSIONS,
    ROOT,
    k8s_error,
    knative_errors,
    knative_validator,
    load_crd_schema,
    structural_to_jsonschema,
)

MANIFESTS = ROOT / "manifests"
TEMPLATES = ROOT / "templates" / "kubernetes"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
INJECTION = '"\n  hostPID: true'
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def unavailable(message: str):
    if IN_CI:
        pytest.fail(f"{message} (CI=true, so this fails instead of skipping)")
    pytest.skip(message)


# --- validators --------------------------------------------------------------------------

@pytest.fixture(scope="session")
def kv():
    """kubernetes_validate.utils, checked to ship schemas for every version in K8S_VERSIONS."""
    try:
        import kubernetes_validate.utils as kvu
    except ImportError:
        unavailable("kubernetes-validate is not installed: pip install 'kubernetes-validate>=1.37'")
    shipped = {kvu.major_minor(v) for v in kvu.all_versions()}
    missing = [v for v in K8S_VERSIONS if v not in shipped]
    if missing:
        pytest.fail(
            f"kubernetes-validate {kvu.__version__} has no schemas for Kubernetes {missing}"
            f" (it has {sorted(shipped)}): install kubernetes-validate>=1.37"
        )
    return kvu


@pytest.fixture(scope="session")
def crd_schema() -> dict:
    if not CRD_PATH.is_file():
        unavailable(f"Knative Service CRD not found at {CRD_PATH}: set OPBOX_KNATIVE_CRD to its path")
    return load_crd_schema(CRD_PATH)


@pytest.fixture(scope="session")
def knative(kv, crd_schema):
    """A jsonschema validator for serving.knative.dev/v1 Service (see k8s_schemas.knative_validator)."""
    return knative_validator(kv, crd_schema)


# --- manifests/ and a small kustomize ----------------------------------------------------

CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass",
                  "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}
KUSTOMIZE_FIELDS = {"apiVersion", "kind", "namespace", "labels", "resources", "images"}


def manifest_files() -> list[Path]:
    """Every shipped manifest but monitoring/'s ServiceMonitor, whose schema is the Prometheus Operator's CRD,
    not Kubernetes': test_kustomize_build_is_consistent checks it against the Service it scrapes."""
    return sorted(p for p in MANIFESTS.rglob("*.yaml")
                  if p.name != "kustomization.yaml" and p.parent.name != "monitoring")


def load_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def pod_spec(doc: dict) -> dict | None:
    if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return doc["spec"]["template"]["spec"]
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return doc["spec"] if doc["kind"] == "Pod" else None


def split_image(image: str) -> tuple[str, str]:
    """("name", ":tag" or "@digest" or "")."""
    if "@" in image:
        name, digest = image.split("@", 1)
        return name, "@" + digest
    slash = image.rfind("/")
    colon = image.rfind(":")
    return (image[:colon], image[colon:]) if colon > slash else (image, "")


def kustomize_build(folder: Path) -> list[dict]:
    """``kustomize build`` for the fields manifests/ uses: resources, namespace, labels, images.

    Any other kustomization field fails the test rather than being silently ignored.
    """
    kust = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(kust) - KUSTOMIZE_FIELDS
    assert not unknown, f"kustomization.yaml uses {sorted(unknown)}, which this test's builder does not apply"
    assert kust["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and kust["kind"] == "Kustomization"
    docs: list[dict] = []
    for entry in kust["resources"]:
        path = folder / entry
        assert path.is_file(), f"kustomization.yaml lists {entry!r}, which is not a file in {folder}"
        docs += load_docs(path)
    for doc in docs:
        meta = doc.setdefault("metadata", {})
        if kust.get("namespace") and doc["kind"] not in CLUSTER_SCOPED:
            meta["namespace"] = kust["namespace"]
        for label in kust.get("labels", []):
            assert set(label) == {"pairs"}, f"labels options {sorted(set(label) - {'pairs'})} are not supported here"
            meta.setdefault("labels", {}).update(label["pairs"])
        spec = pod_spec(doc)
        for container in (spec or {}).get("containers", []) + (spec or {}).get("initContainers", []):
            name, ref = split_image(container["image"])
            for image in kust.get("images", []):
                if image["name"] == name:
                    if "newTag" in image or "digest" in image:
                        ref = f":{image['newTag']}" if "newTag" in image else f"@{image['digest']}"
                    container["image"] = image.get("newName", name) + ref
    keys = [(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in docs]
    duplicates = {k for k in keys if keys.count(k) > 1}
    assert not duplicates, f"the kustomization defines these twice: {duplicates}"
    return docs


@pytest.fixture(scope="module")
def built() -> list[dict]:
    return kustomize_build(MANIFESTS)


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(MANIFESTS)))
def test_manifest_file_validates(kv, path, version):
    docs = load_docs(path)
    assert docs, f"{path} holds no Kubernetes object"
    for doc in docs:
        error = k8s_error(kv, doc, version)
        assert error is None, f"{path.name} {doc['kind']}/{doc['metadata']['name']} (Kubernetes {version}): {error}"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kustomize_build_validates(kv, built, version):
    for doc in built:
        error = k8s_error(kv, doc, version)
        assert error is None, f"{doc['kind']}/{doc['metadata']['name']} (Kubernetes {version}): {error}"


def test_kustomization_covers_the_base_and_not_the_examples():
    listed = set(yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())["resources"])
    base = {p.name for p in MANIFESTS.glob("*.yaml") if p.name != "kustomization.yaml"}
    assert listed == base, f"kustomization.yaml resources {sorted(listed)} differ from the files {sorted(base)}"
    assert not any(entry.startswith("examples") for entry in listed)
    assert (MANIFESTS / "README.md").is_file()


def test_kustomize_build_is_consistent(built):
    namespace = "opbox-system"  # every namespaced object names it (the kustomization has no namespace: field)
    assert by_kind(built, "Namespace").keys() == {namespace, "opbox-builds"}
    accounts = by_kind(built, "ServiceAccount")
    assert accounts.keys() == {"opbox-gateway", "opbox-runner"}
    assert accounts["opbox-runner"]["automountServiceAccountToken"] is False

    deployment = by_kind(built, "Deployment")["opbox-gateway"]
    template = deployment["spec"]["template"]
    spec = template["spec"]
    (container,) = spec["containers"]
    assert container["image"] == "ghcr.io/opbox/opbox:0.1.0"
    assert container["command"] == ["opbox", "up", "--host", "0.0.0.0", "--port", "8000", "--backend", "kubernetes"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/healthz" and startup["periodSeconds"] * startup["failureThreshold"] >= 300
    (budget,) = by_kind(built, "PodDisruptionBudget").values()
    assert budget["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert budget["spec"]["minAvailable"] == deployment["spec"]["replicas"] == 1
    assert spec["serviceAccountName"] in accounts
    labels = template["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()

    # Every reference resolves: ConfigMap, PVC, ports; Secrets the operator makes have an example.
    config_maps = by_kind(built, "ConfigMap")
    examples = {d["metadata"]["name"] for p in (MANIFESTS / "examples").glob("*.yaml") for d in load_docs(p)
                if d["kind"] == "Secret"}
    for source in container["envFrom"]:
        if "configMapRef" in source:
            assert source["configMapRef"]["name"] in config_maps
        else:
            assert source["secretRef"]["name"] in examples, f"no example for Secret {source['secretRef']['name']}"
    assert "opbox-s3" in examples
    volumes = {v["name"]: v for v in spec["volumes"]}
    claims = by_kind(built, "PersistentVolumeClaim")
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    env = {e["name"]: e.get("value") for e in container["env"]}
    home = env["OPBOX_HOME"]
    assert home == "/var/lib/opbox" and volumes[mounts[home]]["persistentVolumeClaim"]["claimName"] in claims

    config = config_maps["opbox-config"]["data"]
    assert config["OPBOX_STORE_URL"].startswith("s3://")
    assert {"OPBOX_S3_ENDPOINT_URL", "OPBOX_REGISTRY", "OPBOX_NAMESPACE_TEMPLATE"} <= config.keys()
    assert config["OPBOX_BUILDER"] == "buildkit" and "{workspace}" in config["OPBOX_NAMESPACE_TEMPLATE"]
    builds = by_kind(built, "Namespace")[config["OPBOX_BUILD_NAMESPACE"]]["metadata"]["labels"]
    assert builds["pod-security.kubernetes.io/enforce"] == "privileged", "rootless BuildKit asks for Unconfined"
    # the registry credentials the kaniko builder checks tags with are mounted where the config says
    auth_dir, _, auth_name = config["OPBOX_REGISTRY_AUTH_FILE"].rpartition("/")
    secret = volumes[mounts[auth_dir]]["secret"]
    assert secret["secretName"] == "opbox-registry" and secret["optional"] is True
    assert secret["items"] == [{"key": ".dockerconfigjson", "path": auth_name}]
    assert "{python}" in config["OPBOX_BASE_IMAGE"]

    service = by_kind(built, "Service")["opbox-gateway"]
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"].items() <= labels.items()
    http, metrics = service["spec"]["ports"]
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert http["port"] == 80 and container_ports[http["targetPort"]] == 8000
    # metrics: the port the settings give them, the Service's and the pod's scrape annotations agree
    assert container_ports[metrics["targetPort"]] == metrics["port"] == int(config["OPBOX_METRICS_PORT"])
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == metrics["port"]
    (monitor,) = load_docs(MANIFESTS / "monitoring" / "servicemonitor.yaml")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == [metrics["name"]]
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [namespace]

    binding = by_kind(built, "ClusterRoleBinding")["opbox-gateway"]
    assert binding["roleRef"]["name"] in by_kind(built, "ClusterRole")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "opbox-gateway", "namespace": namespace}]
    for doc in built:
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "opbox"
        if doc["kind"] not in CLUSTER_SCOPED:
            assert doc["metadata"]["namespace"] == namespace


def test_rbac_grants_what_the_code_calls_and_no_more():
    """Each kubernetes-client method the backend and the builders call, by its verb and resource, is
    granted; and each grant is used (the gateway reads no Secret, lists no namespace)."""
    import re

    verbs = {"create": "create", "replace": "update", "patch": "patch", "delete": "delete", "read": "get",
             "list": "list", "get": "get"}
    resources = {"job": ("batch", "jobs"), "pod": ("", "pods"), "pod_log": ("", "pods/log"),
                 "secret": ("", "secrets"), "namespace": ("", "namespaces"), "event": ("", "events"),
                 "service_account": ("", "serviceaccounts"), "resource_quota": ("", "resourcequotas"),
                 "limit_range": ("", "limitranges"), "network_policy": ("networking.k8s.io", "networkpolicies"),
                 "custom_object": ("serving.knative.dev", "services")}
    source = "".join(p.read_text() for p in (ROOT / "platform" / "backends" / "kubernetes").glob("*.py"))
    called: dict[tuple[str, str], set[str]] = {}
    for verb, kind in re.findall(r"\.(create|replace|patch|delete|read|list|get)_(?:namespaced_|cluster_)?"
                                 r"([a-z_]+?)(?:_for_all_namespaces)?\b", source):
        if kind in resources:
            called.setdefault(resources[kind], set()).add(verbs[verb])
            if verb == "list":  # every list is also watched (watch.py, the builders' _watch)
                called[resources[kind]].add("watch")
    (role,) = [d for d in kustomize_build(MANIFESTS) if d["kind"] == "ClusterRole"]
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    assert called == granted


POSTGRES_OVERLAY = MANIFESTS / "overlays" / "postgres"


@pytest.fixture(scope="module")
def built_postgres() -> list[dict]:
    return kustomize_build(POSTGRES_OVERLAY)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_the_postgres_overlay_validates(kv, built_postgres, version):
    for doc in built_postgres:
        error = k8s_error(kv, doc, version)
        assert error is None, f"{doc['kind']}/{doc['metadata']['name']} (Kubernetes {version}): {error}"


def test_the_postgres_overlay_runs_several_gateways_on_a_database_from_a_secret(built, built_postgres):
    deployment = by_kind(built_postgres, "Deployment")["opbox-gateway"]
    assert deployment["spec"]["replicas"] >= 2 and deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    base_container = by_kind(built, "Deployment")["opbox-gateway"]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == base_container["command"] and container["image"] == base_container["image"]
    assert by_kind(built_postgres, "PersistentVolumeClaim") == {}, "no ReadWriteOnce volume ties it to one pod"
    assert all("persistentVolumeClaim" not in v for v in spec["volumes"])
    examples = {d["metadata"]["name"]: d for p in (MANIFESTS / "examples").glob("*.yaml") for d in load_docs(p)
                if d["kind"] == "Secret"}
    env = {e["name"]: e for e in container["env"]}
    ref = env["OPBOX_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
    assert ref["key"] in examples[ref["name"]]["stringData"]
    assert examples[ref["name"]]["stringData"][ref["key"]].startswith("postgresql://")
    # every replica shares the platform's secret and the secrets' key, from a Secret mounted where the env says
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    for name in ("OPBOX_SECRET_FILE", "OPBOX_SECRETS_KEY_FILE"):
        folder, _, key = env[name]["value"].rpartition("/")
        secret = volumes[mounts[folder]]["secret"]
        assert key in examples[secret["secretName"]]["stringData"] and not secret.get("optional")
    budget = by_kind(built_postgres, "PodDisruptionBudget")["opbox-gateway"]
    assert budget["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert budget["spec"]["maxUnavailable"] < deployment["spec"]["replicas"], "a drain leaves a gateway serving"
    service = by_kind(built_postgres, "Service")["opbox-gateway"]
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    for doc in built_postgres:
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "opbox"


def test_rbac_is_least_privilege(built):
    expected = {
        ("", "namespaces"): {"create"},
        ("", "serviceaccounts"): {"create"},
        ("", "resourcequotas"): {"create"},
        ("", "limitranges"): {"create"},
        ("networking.k8s.io", "networkpolicies"): {"create"},
        ("", "secrets"): {"create", "update", "delete"},  # never read
        ("", "pods"): {"list", "watch", "delete"},
        ("", "pods/log"): {"get"},
        ("", "events"): {"list", "watch"},
        ("batch", "jobs"): {"create", "get", "list", "watch", "patch", "delete"},
        ("serving.knative.dev", "services"): {"create", "get", "list", "watch", "patch", "delete"},
    }
    roles = by_kind(built, "ClusterRole")
    assert roles.keys() == {"opbox-gateway"} and not by_kind(built, "Role")
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in roles["opbox-gateway"]["rules"]:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    assert granted == expected
    bound = [s["name"] for kind in ("ClusterRoleBinding", "RoleBinding") for b in by_kind(built, kind).values()
             for s in b["subjects"]]
    assert "opbox-runner" not in bound, "opbox-runner must have no API permissions"


def admission(user: str, kind: str, namespace: str, name: str, obj: dict | None, operation: str = "CREATE") -> dict:
    return {"request": {"userInfo": {"username": user}, "kind": {"kind": kind}, "namespace": namespace, "name": name,
                        "operation": operation}, "object": obj}


GATEWAY = "system:serviceaccount:opbox-system:opbox-gateway"


POLICY_CASES = [
    (admission(GATEWAY, "Secret", "opbox-team-a", "opbox-run-r1-token", {"type": "Opaque"}), None),
    (admission(GATEWAY, "Job", "opbox-team-a", "opbox-run-r1", {"spec": {}}), None),
    (admission(GATEWAY, "Namespace", "", "opbox-team-a", {"metadata": {"name": "opbox-team-a"}}), None),
    (admission(GATEWAY, "Job", "opbox-system", "opbox-build-1", {"spec": {}}), None),
    (admission(GATEWAY, "Job", "opbox-team-a", "opbox-run-r1", None, "DELETE"), None),
    (admission(GATEWAY, "Secret", "kube-system", "x", {"type": "Opaque"}), "only in opbox-* namespaces"),
    (admission(GATEWAY, "Namespace", "", "default", {"metadata": {"name": "default"}}), "only in opbox-* namespaces"),
    (admission(GATEWAY, "Secret", "opbox-team-a", "t", {"type": "kubernetes.io/service-account-token"}),
     "service-account-token"),
]
# cel-python evaluates the CEL in an environment of its own (uv run --with): it brings google-re2,
# which the packaging code's pathspec would pick up in the test environment
CEL = """
import celpy, json, sys
job = json.load(sys.stdin)
env = celpy.Environment()
programs = [env.program(env.compile(e)) for e in job["expressions"]]
out = [[bool(p.evaluate({k: celpy.json_to_cel(v) for k, v in case.items()})) for p in programs]
       for case in job["cases"]]
print(json.dumps(out))
"""


def evaluate_cel(expressions: list[str], cases: list[dict]) -> list[list[bool]]:
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "uv", "run", "--no-project", "--quiet", "--with",
                           "cel-python>=0.5,<0.6", "python", "-c", CEL],
                          input=json.dumps({"expressions": expressions, "cases": cases}),
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0 and "cel-python" in done.stderr and not IN_CI:
        pytest.skip(f"cel-python cannot be installed here: {done.stderr.strip()[-300:]}")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_admission_policy_confines_the_gateway(built):
    """The policy's CEL, evaluated by cel-python against admission requests (Kubernetes' own CEL
    libraries are not there, but these expressions use only the language's core)."""
    (policy,) = by_kind(built, "ValidatingAdmissionPolicy").values()
    (binding,) = by_kind(built, "ValidatingAdmissionPolicyBinding").values()
    assert binding["spec"]["policyName"] == policy["metadata"]["name"] and binding["spec"]["validationActions"] == ["Deny"]
    (condition,) = policy["spec"]["matchConditions"]
    validations = policy["spec"]["validations"]
    others = [{**case, "request": {**case["request"], "userInfo": {
        "username": "system:serviceaccount:kube-system:deployment-controller"}}} for case, _ in POLICY_CASES]
    results = evaluate_cel([condition["expression"]] + [v["expression"] for v in validations],
                           [case for case, _ in POLICY_CASES] + others)
    for (case, denied), (matched, *passed) in zip(POLICY_CASES, results):
        assert matched, f"the gateway's request is matched: {case}"
        failed = [v["message"] for v, ok in zip(validations, passed) if not ok]
        if denied is None:
            assert failed == [], case
        else:
            assert failed and all(denied in message for message in failed), (case, failed)
    assert not any(matched for matched, *_ in results[len(POLICY_CASES):]), "other users are not matched"


# --- rendered Jobs and Knative Services --------------------------------------------------

RUN_ID = "run-0193a1b2c3dE5f6a7b8c9d0"


def job_spec(**overrides) -> r.JobSpec:
    values: dict[str, Any] = {
        "namespace": "opbox-team-a", "workspace": "team-a", "job_id": "job-0193a1b2c3d", "version": 3,
        "image": "registry.example.com/opbox/team-a/job-0193a1b2c3d:v3",
        "gateway_url": "http://opbox-gateway.opbox-system.svc.cluster.local",
        "token_secret": "opbox-token-run-0193a1b2c3de5f6a7b8c9d0", "run_id": RUN_ID,
    }
    values.update(overrides)
    return r.JobSpec(**values)


def service_spec(**overrides) -> r.ServiceSpec:
    values: dict[str, Any] = {
        "namespace": "opbox-team-a", "workspace": "team-a", "job_id": "job-0193a1b2c3d", "version": 3,
        "image": "registry.example.com/opbox/team-a/job-0193a1b2c3d:v3",
        "gateway_url": "http://opbox-gateway.opbox-system.svc.cluster.local",
        "token_secret": "opbox-token-embedder", "name": "Embedder",
    }
    values.update(overrides)
    return r.ServiceSpec(**values)


WORKLOAD_CASES: dict[str, dict[str, Any]] = {
    "plain": {},
    "gpu": {"resource": Resource(cpu="4", memory="16Gi", gpu="nvidia-tesla-t4", gpu_count=2)},
    "gpu-count-only": {"resource": Resource(gpu_count=1)},
    "disk": {"resource": Resource(disk="20Gi")},
    "timeout": {"resource": Resource(timeout=90.5, max_retries=3)},
    "env": {
        "resource": Resource(env={"HF_HOME": "/cache", "EMPTY": "", "MULTI": "a\nb: c"}),
        "env": {"LOG_LEVEL": "debug"}, "secrets": ("hf-token",), "image_pull_secrets": ("regcred",),
    },
    "hardened": {
        "run_as_non_root": True, "service_account": None, "image_pull_policy": "IfNotPresent",
        "resource": Resource(cpu="500m", memory="1Gi"), "gpu_label_key": "cloud.google.com/gke-accelerator",
    },
}
JOB_CASES = {**WORKLOAD_CASES, "no-ttl": {"ttl_seconds_after_finished": None, "resource": Resource(max_retries=0)},
             "grace": {"termination_grace_period_seconds": 5}, "no-grace": {"termination_grace_period_seconds": 0}}
SERVICE_CASES = {
    **WORKLOAD_CASES,
    "min-scale-0": {"min_scale": 0, "max_scale": 0},
    "scaled": {"min_scale": 1, "max_scale": 5, "target": 20, "container_concurrency": 50, "timeout_seconds": 300,
               "scale_to_zero_retention": "5m", "cluster_local": False},
}


def container_of(manifest: dict) -> dict:
    (container,) = manifest["spec"]["template"]["spec"]["containers"]
    return container


def check_container(spec: r.WorkloadSpec, manifest: dict) -> None:
    """What a Job and a Service container share, against the spec that made it."""
    pod = manifest["spec"]["template"]["spec"]
    container = container_of(manifest)
    resource = spec.resource
    assert container["image"] == spec.image
    env = {e["name"]: e for e in container["env"]}
    assert [e["name"] for e in container["env"]].count("OPBOX_RUN_TOKEN") == 1
    assert env["OPBOX_RUN_TOKEN"]["valueFrom"] == {
        "secretKeyRef": {"name": spec.token_secret, "key": spec.token_secret_key}
    }
    expected_env = {"OPBOX_GATEWAY_URL": spec.gateway_url, "OPBOX_WORKSPACE": spec.workspace,
                    "OPBOX_JOB_ID": spec.job_id, "OPBOX_VERSION": str(spec.version), **spec.user_env}
    assert {k: env[k]["value"] for k in expected_env} == expected_env
    assert [s["secretRef"]["name"] for s in container.get("envFrom", [])] == list(spec.secrets)
    assert [s["name"] for s in pod.get("imagePullSecrets", [])] == list(spec.image_pull_secrets)
    assert pod.get("serviceAccountName") == spec.service_account
    assert pod["automountServiceAccountToken"] is False
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False and security["capabilities"] == {"drop": ["ALL"]}
    assert security.get("runAsNonRoot", False) is spec.run_as_non_root
    if spec.run_as_non_root:  # what PodSecurity "restricted" asks (as the fake's admission checks it)
        assert restricted_violations(pod) == []
        assert security["runAsUser"] == security["runAsGroup"] == r.RUN_AS_USER
        assert security["readOnlyRootFilesystem"] is True
        assert container["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
        assert pod["volumes"] == [{"name": "tmp", "emptyDir": {}}]
        assert env["HOME"].get("value") == spec.user_env.get("HOME", "/tmp")
    else:
        assert restricted_violations(pod) and "volumes" not in pod

    requests, limits, selector, tolerations = r.to_resources(resource, spec.gpu_label_key)
    assert container.get("resources", {}).get("requests", {}) == requests
    assert container.get("resources", {}).get("limits", {}) == limits
    assert pod.get("nodeSelector", {}) == selector
    assert pod.get("tolerations", []) == tolerations
    if resource.disk:
        assert limits["ephemeral-storage"] == resource.disk
    if resource.gpu_count:
        assert limits["nvidia.com/gpu"] == str(resource.gpu_count) and "nvidia.com/gpu" not in requests
        assert tolerations == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        assert selector == ({spec.gpu_label_key: resource.gpu} if resource.gpu else {})
    else:
        assert "nvidia.com/gpu" not in limits and not selector and not tolerations


@pytest.mark.parametrize("case", JOB_CASES)
def test_rendered_job(kv, case):
    spec = job_spec(**JOB_CASES[case])
    job = r.render_job(spec)
    for version in K8S_VERSIONS:
        error = k8s_error(kv, job, version)
        assert error is None, f"Job {case!r} (Kubernetes {version}): {error}"

    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
    name = job["metadata"]["name"]
    assert name == f"opbox-run-{RUN_ID.lower()}" and len(name) <= 63 and DNS_1123.match(name)
    labels = {"opbox.dev/workspace": "team-a", "opbox.dev/job": "job-0193a1b2c3d", "opbox.dev/version": "3",
              "opbox.dev/run": RUN_ID}
    assert labels.items() <= job["metadata"]["labels"].items()
    assert labels.items() <= job["spec"]["template"]["metadata"]["labels"].items()
    assert job["spec"]["backoffLimit"] == spec.resource.max_retries
    timeout = spec.resource.timeout
    assert job["spec"].get("activeDeadlineSeconds") == (None if timeout is None else math.ceil(timeout))
    assert job["spec"].get("ttlSecondsAfterFinished") == spec.ttl_seconds_after_finished
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    assert job["spec"]["template"]["spec"].get("terminationGracePeriodSeconds") == spec.termination_grace_period_seconds
    container = container_of(job)
    assert container["command"] == ["python", "-m", "opbox.runtime", "run", "--run-id", RUN_ID]
    assert {e["name"]: e.get("value") for e in container["env"]}["OPBOX_RUN_ID"] == RUN_ID
    check_container(spec, job)


@pytest.mark.parametrize("case", ["minimal", "non-root"])
def test_rendered_worker_job(kv, case):
    fields = {"pool_id": "job-0193a1b2c3d.v3", "name": "opbox-workers-1a2b3c4d-a1b2c3", "workers": 7}
    values = {k: v for k, v in job_spec().__dict__.items() if k in {f.name for f in dataclasses.fields(r.WorkloadSpec)}}
    spec = r.WorkerSpec(**{**values, "run_as_non_root": case == "non-root"}, **fields)
    job = r.render_worker(spec)
    for version in K8S_VERSIONS:
        error = k8s_error(kv, job, version)
        assert error is None, f"worker Job (Kubernetes {version}): {error}"
    name = job["metadata"]["name"]
    assert name == fields["name"] and DNS_1123.match(name)
    assert job["metadata"]["labels"]["opbox.dev/worker"] == "pool"
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["backoffLimitPerIndex"] == 0
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 7
    assert "backoffLimit" not in job["spec"] and "activeDeadlineSeconds" not in job["spec"]
    container = container_of(job)
    assert container["command"] == ["python", "-m", "opbox.runtime", "worker"]
    assert container["env"][0] == {"name": "OPBOX_WORKER_INDEX", "valueFrom": {"fieldRef": {
        "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["OPBOX_POOL"] == fields["pool_id"] and env["OPBOX_WORKER_ID"] == f"{name}-$(OPBOX_WORKER_INDEX)"
    check_container(spec, job)
    with pytest.raises(ValidationError, match="at most 50"):
        r.WorkerSpec(**values, pool_id="p", name="opbox-workers-" + "a" * 40)


@pytest.mark.parametrize("case", SERVICE_CASES)
def test_rendered_service(knative, case):
    spec = service_spec(**SERVICE_CASES[case])
    service = r.render_service(spec)
    errors = knative_errors(knative, service)
    assert not errors, f"Knative Service {case!r} fails the CRD schema:\n" + "\n".join(errors)

    assert (service["apiVersion"], service["kind"]) == ("serving.knative.dev/v1", "Service")
    name = service["metadata"]["name"]
    assert DNS_1035.match(name) and len(name) <= r.MAX_SERVICE_NAME, name
    template = service["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    assert annotations["autoscaling.knative.dev/min-scale"] == str(spec.min_scale)
    for key, value in (("max-scale", spec.max_scale), ("target", spec.target),
                       ("scale-to-zero-pod-retention-period", spec.scale_to_zero_retention)):
        assert annotations.get(f"autoscaling.knative.dev/{key}") == (None if value is None else str(value))
    assert all(isinstance(v, str) for v in annotations.values())
    visibility = service["metadata"]["labels"].get("networking.knative.dev/visibility")
    assert visibility == ("cluster-local" if spec.cluster_local else None)
    assert template["metadata"]["labels"]["opbox.dev/workspace"] == "team-a"
    pod = template["spec"]
    assert pod["containerConcurrency"] == spec.container_concurrency
    timeout = spec.timeout_seconds or (math.ceil(spec.resource.timeout) if spec.resource.timeout else None)
    assert pod.get("timeoutSeconds") == timeout
    container = container_of(service)
    assert container["command"] == ["python", "-m", "opbox.runtime", "serve", "--port", "8080"]
    assert container["ports"] == [{"name": "http1", "containerPort": 8080}]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert "OPBOX_RUN_ID" not in {e["name"] for e in container["env"]}
    check_container(spec, service)


def feature_flags_used(schema: dict, value: Any) -> set[str]:
    """Knative feature flags (``This is accessible behind a feature flag - X``) a manifest relies on."""
    found = set()
    match = re.search(r"behind a feature flag - (\S+)", schema.get("description", ""))
    if match:
        found.add(match.group(1))
    if isinstance(value, dict):
        for key, sub in value.items():
            if key in schema.get("properties", {}):
                found |= feature_flags_used(schema["properties"][key], sub)
    elif isinstance(value, list) and "items" in schema:
        for sub in value:
            found |= feature_flags_used(schema["items"], sub)
    return found


@pytest.mark.parametrize("case", SERVICE_CASES)
def test_services_need_feature_flags_only_for_gpus(crd_schema, case):
    spec = service_spec(**SERVICE_CASES[case])
    flags = feature_flags_used(crd_schema, r.render_service(spec))
    expected = {"kubernetes.podspec-tolerations"} if spec.resource.gpu_count else set()
    if spec.resource.gpu:
        expected.add("kubernetes.podspec-nodeselector")
    if spec.run_as_non_root:  # the /tmp emptyDir: "enabled" by default (knative/serving config/core/configmaps/features.yaml)
        expected.add("kubernetes.podspec-volumes-emptydir")
    assert flags == expected


# --- the checks can fail -----------------------------------------------------------------

def _set(manifest: dict, path: str, value: Any) -> dict:
    broken = copy.deepcopy(manifest)
    *parents, last = path.split(".")
    node: Any = broken
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    node[int(last) if last.isdigit() else last] = value
    return broken


@pytest.mark.parametrize("path,value", [
    ("spec.backoffLimit", "two"),  # wrong type
    ("spec.template.spec.containers.0.bogusField", True),  # unknown field
    ("spec.template.spec.hostPid", True),  # misspelt field
    ("metadata.labelz", {"a": "b"}),  # unknown metadata field
])
def test_kubernetes_validate_rejects_broken_job(kv, path, value):
    job = r.render_job(job_spec())
    for version in K8S_VERSIONS:
        assert k8s_error(kv, job, version) is None
        assert k8s_error(kv, _set(job, path, value), version), f"{path}={value!r} passed Kubernetes {version}"


def test_kubernetes_validate_rejects_broken_manifest_file(kv, built):
    deployment = by_kind(built, "Deployment")["opbox-gateway"]
    for path, value in (("spec.replicas", "one"), ("spec.template.spec.containers.0.imagePullPolice", "Always")):
        for version in K8S_VERSIONS:
            assert k8s_error(kv, _set(deployment, path, value), version), f"{path} passed Kubernetes {version}"


@pytest.mark.parametrize("path,value", [
    ("spec.template.spec.containerConcurrency", "lots"),  # wrong type
    ("spec.template.spec.containers.0.ports.0.containerPort", "8080"),  # wrong type
    ("spec.template.spec.containers.0.bogusField", True),  # unknown field in a closed object
    ("spec.template.spec.bogusField", True),
    ("spec.bogusField", True),
    ("metadata.bogusField", True),  # root metadata is ObjectMeta
    ("metadata.labels", {"a": 1}),
    ("spec.template.spec.containers.0.resources.limits.cpu", "lots"),  # not a quantity
])
def test_crd_validation_rejects_broken_service(knative, path, value):
    service = r.render_service(service_spec(resource=Resource(cpu="1")))
    assert knative_errors(knative, service) == []
    assert knative_errors(knative, _set(service, path, value)), f"{path}={value!r} passed the CRD schema"


@pytest.mark.parametrize("path,value", [
    ("spec.template.metadata.generateName", "x-"),  # preserve-unknown-fields
    ("spec.template.spec.tolerations", [{"key": "k", "operator": "Exists", "tolerationSeconds": 5}]),
    ("spec.template.spec.containers.0.resources.limits.cpu", 2),  # int-or-string
])
def test_crd_validation_accepts_what_the_schema_allows(knative, path, value):
    service = r.render_service(service_spec(resource=Resource(cpu="1")))
    assert knative_errors(knative, _set(service, path, value)) == []


def test_structural_schema_conversion():
    schema = structural_to_jsonschema({
        "type": "object",
        "properties": {
            "closed": {"type": "object", "properties": {"a": {"type": "string"}}},
            "open": {"type": "object", "properties": {"a": {"type": "string"}},
                     "x-kubernetes-preserve-unknown-fields": True},
            "map": {"type": "object", "additionalProperties": {"type": "string"}},
            "port": {"x-kubernetes-int-or-string": True},
            "maybe": {"type": "string", "nullable": True},
        },
    })
    import jsonschema

    def ok(value):
        return jsonschema.Draft202012Validator(schema).is_valid(value)

    assert ok({"closed": {"a": "x"}, "open": {"a": "x", "b": 1}, "map": {"k": "v"}, "port": "http", "maybe": None})
    assert ok({"port": 80})
    assert not ok({"closed": {"b": "x"}})
    assert not ok({"open": {"a": 1}})
    assert not ok({"map": {"k": 1}})
    assert not ok({"port": 1.5})
    assert not ok({"unknown": 1})


def test_validation_works_offline(kv, knative, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("validation tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    for version in K8S_VERSIONS:
        assert k8s_error(kv, r.render_job(job_spec()), version) is None
    assert knative_errors(knative, r.render_service(service_spec())) == []


# --- injection ---------------------------------------------------------------------------

def test_injection_stays_a_string_in_jobs():
    spec = job_spec(
        workspace=f"team{INJECTION}", job_id=f"job{INJECTION}", version=f"3{INJECTION}",
        gateway_url=f"http://gw{INJECTION}", command=("python", INJECTION),
        resource=Resource(env={"USER_VALUE": INJECTION, "OTHER": f"x{INJECTION}\n- name: EVIL"}),
    )
    text = r.render_text("job.yaml.j2", **spec.context())
    job = yaml.safe_load(text)
    pod = job["spec"]["template"]["spec"]
    assert "hostPID" not in pod and "hostPID" not in job["spec"]
    assert set(job) == {"apiVersion", "kind", "metadata", "spec"}
    container = container_of(job)
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["USER_VALUE"] == INJECTION and env["OTHER"] == f"x{INJECTION}\n- name: EVIL"
    assert env["OPBOX_WORKSPACE"] == f"team{INJECTION}" and env["OPBOX_GATEWAY_URL"] == f"http://gw{INJECTION}"
    assert "EVIL" not in env
    assert container["command"] == ["python", INJECTION]
    for value in job["metadata"]["labels"].values():
        assert re.match(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$", value) and len(value) <= 63, value


def test_injection_stays_a_string_in_services(knative):
    spec = service_spec(
        name=f"svc{INJECTION}", workspace=f"team{INJECTION}",
        resource=Resource(env={"USER_VALUE": INJECTION}), scale_to_zero_retention="5m",
    )
    service = r.render_service(spec)
    assert knative_errors(knative, service) == []
    assert "hostPID" not in service["spec"]["template"]["spec"]
    assert DNS_1035.match(service["metadata"]["name"])
    env = {e["name"]: e.get("value") for e in container_of(service)["env"]}
    assert env["USER_VALUE"] == INJECTION


@pytest.mark.parametrize("value", [
    INJECTION, "😀 é \x85 \u2028 \x00 '\"\\", "null", "true", "0o17", "- a", "{a: b}", "", "x" * 5000,
])
def test_toyaml_round_trips(value):
    assert yaml.safe_load(f"k: {r.toyaml(value)}") == {"k": value}
    assert yaml.safe_load(f"k: {r.toyaml({'a': [value, 1, True, None]})}") == {"k": {"a": [value, 1, True, None]}}


def test_templates_quote_every_value():
    """Every ``{{ }}`` is ``| toyaml``, or a macro of _pod.yaml.j2 re-indented: nothing raw."""
    allowed = re.compile(r"^(.+\|\s*toyaml|pod\.\w+\([\w, ]*\)\s*\|\s*trim\s*\|\s*indent\(\d+\))$")
    templates = sorted(TEMPLATES.glob("*.j2"))
    assert {t.name for t in templates} >= {"job.yaml.j2", "knative-service.yaml.j2"}
    for template in templates:
        for expression in re.findall(r"\{\{-?(.*?)-?\}\}", template.read_text(), flags=re.DOTALL):
            assert allowed.match(expression.strip()), f"{template.name}: unquoted {{{{{expression}}}}}"


# --- render.py's own checks --------------------------------------------------------------

def test_names():
    assert r.job_name("run-ABC") == "opbox-run-run-abc"
    with pytest.raises(ValidationError, match="Job name"):
        r.job_name("run-" + "a" * 60)
    with pytest.raises(ValidationError, match="Job name"):
        r.job_name("run_1")
    assert r.service_name("embedder") == "embedder"
    for name in ("My_Model", "9lives", "x" * 80, "Ünïcode", "___"):
        sanitized = r.service_name(name)
        assert DNS_1035.match(sanitized) and len(sanitized) <= r.MAX_SERVICE_NAME, sanitized
    assert r.service_name("My_Model") != r.service_name("my-model")
    assert r.label_value("team-a") == "team-a"
    assert r.label_value(3) == "3"
    assert r.label_value("a b") != r.label_value("a_b") == "a_b"
    assert len(r.label_value("x" * 100)) <= 63


@pytest.mark.parametrize("overrides,message", [
    ({"namespace": "Team_A"}, "namespace"),
    ({"namespace": "x" * 64}, "namespace"),
    ({"run_id": "run-" + "a" * 60}, "Job name"),
    ({"token_secret": "Bad Secret"}, "token_secret"),
    ({"secrets": ("ok", "not ok")}, "secret"),
    ({"secrets": "one-string"}, "secrets"),
    ({"service_account": "UPPER"}, "service_account"),
    ({"image": "has space:1"}, "image"),
    ({"image": ""}, "image"),
    ({"gpu_label_key": "bad key!"}, "gpu_label_key"),
    ({"resource": Resource(env={"1BAD": "x"})}, "variable name"),
    ({"resource": Resource(env={"OPBOX_RUN_ID": "x"})}, "set by opbox"),
    ({"env": {"OPBOX_RUN_TOKEN": "x"}}, "set by opbox"),
    ({"image_pull_policy": "Sometimes"}, "image_pull_policy"),
    ({"ttl_seconds_after_finished": -1}, "ttl_seconds_after_finished"),
    ({"termination_grace_period_seconds": -1}, "termination_grace_period_seconds"),
    ({"termination_grace_period_seconds": 2.5}, "termination_grace_period_seconds"),
    ({"command": ()}, "command"),
    ({"env": ["A=1"]}, "env"),
])
def test_job_spec_rejects(overrides, message):
    with pytest.raises(ValidationError, match=message):
        job_spec(**overrides)


@pytest.mark.parametrize("overrides,message", [
    ({"name": ""}, "service name"),
    ({"min_scale": -1}, "min_scale"),
    ({"min_scale": 3, "max_scale": 2}, "max_scale"),
    ({"target": 0}, "target"),
    ({"container_concurrency": True}, "container_concurrency"),
    ({"timeout_seconds": 0}, "timeout_seconds"),
    ({"scale_to_zero_retention": "5 minutes"}, "scale_to_zero_retention"),
    ({"resource": Resource(env={"PORT": "9000"})}, "reserved by Knative"),
])
def test_service_spec_rejects(overrides, message):
    with pytest.raises(ValidationError, match=message):
        service_spec(**overrides)


def test_to_resources():
    assert r.to_resources(Resource()) == ({}, {}, {}, [])
    requests, limits, selector, tolerations = r.to_resources(
        Resource(cpu="250m", memory="1Gi", disk="5Gi", gpu="nvidia-l4", gpu_count=2), "cloud.google.com/gke-accelerator"
    )
    assert requests == {"cpu": "250m", "memory": "1Gi", "ephemeral-storage": "5Gi"}
    assert limits == {**requests, "nvidia.com/gpu": "2"}
    assert selector == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert tolerations == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert r.to_resources(Resource(gpu="nvidia-l4"))[2] == {r.DEFAULT_GPU_LABEL_KEY: "nvidia-l4"}


def test_timeouts_round_up_and_default():
    job = r.render_job(job_spec(resource=Resource(timeout=0.2)))
    assert job["spec"]["activeDeadlineSeconds"] == 1
    assert "activeDeadlineSeconds" not in r.render_job(job_spec())["spec"]
    service = r.render_service(service_spec(resource=Resource(timeout=30.5)))
    assert service["spec"]["template"]["spec"]["timeoutSeconds"] == 31
    service = r.render_service(service_spec(resource=Resource(timeout=30.5), timeout_seconds=600))
    assert service["spec"]["template"]["spec"]["timeoutSeconds"] == 600
    assert "timeoutSeconds" not in r.render_service(service_spec())["spec"]["template"]["spec"]


def test_user_env_overrides_operator_env_and_keeps_order():
    spec = job_spec(env={"A": "operator", "B": "operator"}, resource=Resource(env={"A": "user"}))
    env = [(e["name"], e.get("value")) for e in container_of(r.render_job(spec))["env"]]
    names = [name for name, _ in env]
    assert names[:5] == ["OPBOX_GATEWAY_URL", "OPBOX_WORKSPACE", "OPBOX_JOB_ID", "OPBOX_VERSION", "OPBOX_RUN_ID"]
    assert dict(env)["A"] == "user" and dict(env)["B"] == "operator" and len(names) == len(set(names))


# --- the BuildKit build Job (OPBOX_BUILDER=buildkit, the default in manifests/) ------------------

def buildkit_spec(**overrides):
    from opbox.platform.backends.kubernetes.buildkit import DEFAULT_IMAGE, BuildKitJobSpec

    spec = dict(
        name="opbox-build-0123456789ab-a1b2c3", namespace="opbox-builds", image=DEFAULT_IMAGE,
        context_url="https://s3.example.com/opbox/builds/x.tar.gz?X-Amz-Signature=abc&X-Amz-Expires=1800",
        destination="registry.example.com/opbox/opbox-team-a-score:0123456789ab",
        push_secret="opbox-build-0123456789ab-a1b2c3-push", cache_ref="registry.example.com/opbox/opbox-cache:buildcache",
        insecure=True, service_account="opbox-builder", labels={"app.kubernetes.io/managed-by": "opbox"},
        active_deadline_seconds=1200, ttl_seconds_after_finished=600, cpu="1", memory="4Gi")
    spec.update(overrides)
    return BuildKitJobSpec(**spec)


BUILDKIT_CASES = {"everything": {}, "bare": dict(cache_ref=None, insecure=False, service_account=None, cpu=None,
                                                  memory=None)}


@pytest.mark.parametrize("case", BUILDKIT_CASES)
def test_rendered_buildkit_job(kv, case):
    from opbox.platform.backends.kubernetes.buildkit import render_buildkit_job

    spec = buildkit_spec(**BUILDKIT_CASES[case])
    job = render_buildkit_job(spec)
    for version in K8S_VERSIONS:
        error = k8s_error(kv, job, version)
        assert error is None, f"buildkit Job {case!r} (Kubernetes {version}): {error}"
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["buildctl-daemonless.sh"] and container["args"][:5] == [
        "build", "--frontend", "dockerfile.v0", "--opt", f"context={spec.context_url}"]
    assert ("--export-cache" in container["args"]) is bool(spec.cache_ref)
    assert all(("registry.insecure=true" in a) is spec.insecure for a in container["args"] if a.startswith("type="))
    assert container["env"] == [{"name": "DOCKER_CONFIG", "value": "/home/user/.docker"}] and "envFrom" not in container
    assert [v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v] == [spec.push_secret]
    security = container["securityContext"]
    assert security["runAsUser"] == 1000 and security["runAsNonRoot"] and "privileged" not in security
    assert pod["automountServiceAccountToken"] is False and pod["enableServiceLinks"] is False
    assert restricted_violations(pod), "not 'restricted' (nor 'baseline'): hence a namespace of its own"


def test_buildkit_job_refuses_what_could_break_its_flags():
    for bad in (dict(destination="x,push=false"), dict(context_url="s3://bucket/key"), dict(push_secret="Bad Name"),
                dict(cache_ref="a b")):
        with pytest.raises(ValidationError):
            buildkit_spec(**bad)


# --- the kaniko build Job (OPBOX_BUILDER=kaniko) -------------------------------------------

def kaniko_spec(**overrides):
    from opbox.platform.backends.kubernetes.kaniko import KanikoJobSpec

    spec = dict(
        name="opbox-build-0123456789ab-a1b2c3", namespace="opbox-system",
        executor_image="gcr.io/kaniko-project/executor:v1.23.2",
        context_uri="s3://opbox/store/builds/opbox-build-0123456789ab-a1b2c3.tar.gz",
        destination="registry.example.com/opbox/opbox-team-a-score:0123456789ab",
        s3_env={"AWS_REGION": "eu-west-1", "S3_ENDPOINT": "http://minio:9000", "S3_FORCE_PATH_STYLE": "true"},
        s3_secret="opbox-s3", docker_secret="opbox-registry", service_account="opbox-builder",
        cache_repo="registry.example.com/opbox/opbox-cache", insecure_registries=("registry.example.com",),
        extra_args=("--verbosity=debug",), labels={"app.kubernetes.io/managed-by": "opbox"},
        active_deadline_seconds=1200, ttl_seconds_after_finished=600, cpu="1", memory="4Gi")
    spec.update(overrides)
    return KanikoJobSpec(**spec)


KANIKO_CASES = {
    "everything": {},
    "bare": dict(s3_secret=None, docker_secret=None, service_account=None, cache_repo=None, insecure_registries=(),
                 extra_args=(), cpu=None, memory=None, s3_env={"AWS_REGION": "us-east-1"}),
}


@pytest.mark.parametrize("case", KANIKO_CASES)
def test_rendered_kaniko_job(kv, case):
    from opbox.platform.backends.kubernetes.kaniko import render_kaniko_job

    spec = kaniko_spec(**KANIKO_CASES[case])
    job = render_kaniko_job(spec)
    for version in K8S_VERSIONS:
        error = k8s_error(kv, job, version)
        assert error is None, f"kaniko Job {case!r} (Kubernetes {version}): {error}"
    assert job["spec"]["backoffLimit"] == 0 and job["spec"]["activeDeadlineSeconds"] == 1200
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == spec.executor_image and pod["restartPolicy"] == "Never"
    assert pod["automountServiceAccountToken"] is False
    args = container["args"]
    assert args[:3] == [f"--context={spec.context_uri}", "--dockerfile=Dockerfile", f"--destination={spec.destination}"]
    assert ("--cache=true" in args) is bool(spec.cache_repo)
    assert [a for a in args if a.startswith("--insecure-registry=")] == [
        f"--insecure-registry={h}" for h in spec.insecure_registries]
    assert {e["name"]: e["value"] for e in container["env"]} == spec.s3_env
    if spec.s3_secret:
        assert container["envFrom"] == [{"secretRef": {"name": "opbox-s3"}}]
    else:
        assert "envFrom" not in container
    if spec.docker_secret:
        (volume,) = pod["volumes"]
        assert volume["secret"] == {"secretName": "opbox-registry", "optional": True,
                                    "items": [{"key": ".dockerconfigjson", "path": "config.json"}]}
        assert container["volumeMounts"] == [{"name": volume["name"], "mountPath": "/kaniko/.docker",
                                              "readOnly": True}]
    else:
        assert "volumes" not in pod and "volumeMounts" not in container
    if spec.memory:
        assert container["resources"] == {"requests": {"cpu": "1", "memory": "4Gi"}, "limits": {"memory": "4Gi"}}
    else:
        assert "resources" not in container


def test_kaniko_job_keeps_values_strings_and_refuses_bad_ones():
    from opbox.platform.backends.kubernetes.kaniko import render_kaniko_job

    job = render_kaniko_job(kaniko_spec(s3_env={"S3_ENDPOINT": INJECTION}, labels={"x": "y"}))
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["env"] == [{"name": "S3_ENDPOINT", "value": INJECTION}]
    assert "hostPID" not in job["spec"]["template"]["spec"]
    for bad in (dict(destination=f"x{INJECTION}"), dict(context_uri="https://x/y.tar.gz"),
                dict(name="Not_A_Name"), dict(namespace=f"ns{INJECTION}")):
        with pytest.raises(ValidationError):
            kaniko_spec(**bad)


@pytest.mark.parametrize("env, message", [
    ({"OPBOX_KANIKO_ARGS": "--x"}, "OPBOX_KANIKO_ARGS must be a JSON list"),
    ({"OPBOX_KANIKO_MEMORY": "lots"}, "OPBOX_KANIKO_MEMORY"),
    ({"OPBOX_BUILD_NAMESPACE": "Bad_NS"}, "not a valid Kubernetes name"),
    ({"OPBOX_KANIKO_S3_SECRET": "no spaces"}, "not a valid Kubernetes name"),
    ({"OPBOX_BUILD_TIMEOUT": "soon"}, "OPBOX_BUILD_TIMEOUT must be a whole number"),
])
def test_kaniko_settings_refuse_bad_env(monkeypatch, env, message):
    from opbox.errors import ConfigError, OpboxError
    from opbox.platform.backends.kubernetes.kaniko import KanikoSettings

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises((ConfigError, OpboxError)) as info:
        KanikoSettings.from_env()
    assert message in str(info.value)


def test_kaniko_settings_defaults_follow_the_platform_namespace(monkeypatch):
    from opbox.platform.backends.kubernetes.kaniko import DEFAULT_EXECUTOR, KanikoSettings

    monkeypatch.setenv("OPBOX_SYSTEM_NAMESPACE", "platform-ns")
    settings = KanikoSettings.from_env()
    assert settings.namespace == "platform-ns" and settings.executor_image == DEFAULT_EXECUTOR
    assert settings.s3_secret == "opbox-s3" and settings.docker_secret == "opbox-registry" and settings.cache
    monkeypatch.setenv("OPBOX_BUILD_NAMESPACE", "builds")
    monkeypatch.setenv("OPBOX_KANIKO_DOCKER_SECRET", "")
    settings = KanikoSettings.from_env()
    assert settings.namespace == "builds" and settings.docker_secret is None


@pytest.mark.parametrize("env, message", [
    ({"OPBOX_BACKEND": "local"}, "use it with OPBOX_BACKEND=kubernetes"),
    ({"OPBOX_BACKEND": "container"}, "use it with OPBOX_BACKEND=kubernetes"),
    ({"OPBOX_BACKEND": "kubernetes", "OPBOX_REGISTRY": ""}, "set OPBOX_REGISTRY to a registry"),
    ({"OPBOX_BACKEND": "kubernetes", "OPBOX_REGISTRY": "registry.example.com/opbox"}, "s3:// store"),
])
def test_the_kaniko_builder_says_what_it_needs(monkeypatch, tmp_path, env, message):
    check_builder_needs("kaniko", monkeypatch, tmp_path, env, message)


@pytest.mark.parametrize("env, message", [
    ({"OPBOX_BACKEND": "local"}, "the buildkit builder runs in the cluster: use it with OPBOX_BACKEND=kubernetes"),
    ({"OPBOX_BACKEND": "kubernetes", "OPBOX_REGISTRY": ""}, "set OPBOX_REGISTRY to a registry"),
    ({"OPBOX_BACKEND": "kubernetes", "OPBOX_REGISTRY": "r.example.com/o", "OPBOX_BUILD_MEMORY": "lots"}, "OPBOX_BUILD_MEMORY"),
])
def test_the_buildkit_builder_says_what_it_needs(monkeypatch, tmp_path, env, message):
    check_builder_needs("buildkit", monkeypatch, tmp_path, env, message)


def check_builder_needs(builder, monkeypatch, tmp_path, env, message):
    from opbox.errors import ConfigError
    from opbox.platform.backends.registry import make_backend, make_builder
    from opbox.platform.settings import Settings
    from opbox.platform.store import LocalStore

    monkeypatch.setenv("OPBOX_BUILDER", builder)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings.from_env(home=tmp_path)
    store = LocalStore(tmp_path / "store", secret=b"k" * 32, base_url="http://127.0.0.1")
    with pytest.raises(ConfigError) as info:
        make_builder(settings, store, make_backend(settings, str, "http://127.0.0.1"))
    assert message in str(info.value)
