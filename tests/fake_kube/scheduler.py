"""The fake cluster's scheduler and its Events: which Node (a real ``v1/Node`` object in the store)
a pod fits on, and the scheduler's message when none does, in the words of kube-scheduler's
filter plugins (NodeResourcesFit "Insufficient <resource>", NodeAffinity "didn't match Pod's node
affinity/selector", TaintToleration "had untolerated taint", NodeUnschedulable); and Events as the
controllers write them (aggregated: the same reason on the same object counts up).

A FakeKube starts with one node, ``fake-node`` (64 CPUs, 256 GiB, no GPUs); a test adds others
(say, with ``nvidia.com/gpu`` allocatable and a GPU product label) by creating Node objects.
"""

from __future__ import annotations

import secrets
from collections import Counter

from opbox.resource import parse_quantity

from .store import Store, now

DEFAULT_NODE = {
    "apiVersion": "v1", "kind": "Node",
    "metadata": {"name": "fake-node", "labels": {"kubernetes.io/hostname": "fake-node", "kubernetes.io/os": "linux",
                                                 "kubernetes.io/arch": "amd64"}},
    "spec": {},
    "status": {"allocatable": {"cpu": "64", "memory": "256Gi", "pods": "110", "ephemeral-storage": "500Gi"},
               "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}]},
}


def _requests(pod: dict) -> dict[str, float]:
    total: dict[str, float] = {}
    for container in pod["spec"].get("containers") or []:
        resources = container.get("resources") or {}
        # an extended resource (nvidia.com/gpu) may be given as a limit only: the request is the limit
        wanted = {**{k: v for k, v in (resources.get("limits") or {}).items() if "/" in k},
                  **(resources.get("requests") or {})}
        for key, value in wanted.items():
            total[key] = total.get(key, 0) + float(parse_quantity(str(value)))
    return total


def _misfit(node: dict, pod: dict) -> str | None:
    """Why ``pod`` cannot go on ``node`` (kube-scheduler's words), None when it fits."""
    if node.get("spec", {}).get("unschedulable"):
        return "node(s) were unschedulable"
    tolerated = {t.get("key") for t in pod["spec"].get("tolerations") or []}
    for taint in node.get("spec", {}).get("taints") or []:
        if taint.get("effect") in ("NoSchedule", "NoExecute") and taint["key"] not in tolerated:
            return f"node(s) had untolerated taint {{{taint['key']}: }}"
    labels = node["metadata"].get("labels") or {}
    if any(labels.get(k) != v for k, v in (pod["spec"].get("nodeSelector") or {}).items()):
        return "node(s) didn't match Pod's node affinity/selector"
    allocatable = node.get("status", {}).get("allocatable") or {}
    for resource, amount in sorted(_requests(pod).items()):
        if amount > float(parse_quantity(str(allocatable.get(resource, "0")))):
            return f"Insufficient {resource}"
    return None


def schedule(store: Store, pod: dict) -> tuple[str | None, str]:
    """(the node ``pod`` fits on, "") or (None, the scheduler's FailedScheduling message)."""
    nodes = store.list("nodes")
    reasons: Counter = Counter()
    for node in nodes:
        why = _misfit(node, pod)
        if why is None:
            return node["metadata"]["name"], ""
        reasons[why] += 1
    detail = ", ".join(f"{count} {why}" for why, count in sorted(reasons.items()))
    return None, f"0/{len(nodes)} nodes are available: {detail}." if detail else "no nodes available to schedule pods"


def record_event(store: Store, obj: dict, reason: str, message: str, component: str,
                 kind: str = "Warning") -> None:
    """An Event about ``obj``; the same reason and message again counts up (as the recorder aggregates)."""
    meta = obj["metadata"]
    for event in store.list("events", meta.get("namespace")):
        involved = event["involvedObject"]
        if involved.get("uid") == meta.get("uid") and event["reason"] == reason and event["message"] == message:
            event["count"] += 1
            event["lastTimestamp"] = now()
            store.put("events", event)
            return
    store.create("events", {
        "apiVersion": "v1", "kind": "Event", "type": kind, "reason": reason, "message": message,
        "metadata": {"name": f"{meta['name']}.{secrets.token_hex(8)}", "namespace": meta.get("namespace", "default")},
        "involvedObject": {"apiVersion": obj.get("apiVersion"), "kind": obj.get("kind"), "name": meta["name"],
                           "namespace": meta.get("namespace"), "uid": meta.get("uid")},
        "source": {"component": component}, "count": 1, "firstTimestamp": now(), "lastTimestamp": now(),
    })
