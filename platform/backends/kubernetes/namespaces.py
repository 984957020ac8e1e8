"""What a workspace's namespace gets when the backend creates it, from the settings: its labels
(``opbox.dev/workspace``, ``app.kubernetes.io/managed-by``, which label selectors pick it by), PodSecurity
labels (``restricted`` by default: every pod opbox makes complies), a default-deny egress
NetworkPolicy that lets pods reach DNS and the gateway only (not the cloud's metadata endpoint,
the object store or other workspaces), and optionally a ResourceQuota and a LimitRange.
Plain manifests; the backend creates them (tolerating 409)."""

from __future__ import annotations

from .config import KubernetesSettings
from .render import label_value

MANAGED = {"app.kubernetes.io/managed-by": "opbox"}


WORKSPACE_LABEL = "opbox.dev/workspace"


def namespace_manifest(name: str, workspace: str, settings: KubernetesSettings) -> dict:
    labels = {**MANAGED, WORKSPACE_LABEL: label_value(workspace)}
    if settings.pod_security:  # enforce, and warn and audit at the same level
        for mode in ("enforce", "warn", "audit"):
            labels[f"pod-security.kubernetes.io/{mode}"] = settings.pod_security
            labels[f"pod-security.kubernetes.io/{mode}-version"] = "latest"
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def egress_policy(namespace: str, settings: KubernetesSettings) -> dict:
    """Default-deny egress for every pod of the namespace, but DNS (kube-dns) and the gateway's pods."""
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "opbox-egress", "namespace": namespace, "labels": MANAGED},
        "spec": {"podSelector": {}, "policyTypes": ["Egress"], "egress": [
            {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                     "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
             "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]},
            {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": settings.gateway_namespace}},
                     "podSelector": {"matchLabels": {"app.kubernetes.io/component": "gateway"}}}],
             "ports": [{"protocol": "TCP", "port": settings.gateway_port}]},
        ]},
    }


def quota_manifests(namespace: str, settings: KubernetesSettings) -> list[dict]:
    out = []
    if settings.resource_quota:
        out.append({"apiVersion": "v1", "kind": "ResourceQuota",
                    "metadata": {"name": "opbox", "namespace": namespace, "labels": MANAGED},
                    "spec": {"hard": dict(settings.resource_quota)}})
    if settings.limit_range:
        out.append({"apiVersion": "v1", "kind": "LimitRange",
                    "metadata": {"name": "opbox", "namespace": namespace, "labels": MANAGED},
                    "spec": {"limits": [{"type": "Container", **settings.limit_range}]}})
    return out
