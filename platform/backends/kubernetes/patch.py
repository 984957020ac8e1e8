"""JSON merge patches (RFC 7386) that turn what the cluster has into what opbox renders.

A redeploy must not PUT a freshly rendered object: that drops what others own on it, such as
the ``serving.knative.dev/creator`` annotation Knative's webhook wrote and will not let change
(knative.dev/pkg apis/metadata_validation.go, ValidateCreatorAndModifier). A merge patch changes
only the fields named; the fields opbox owns but no longer renders are named with null so they go.
"""

from __future__ import annotations

from typing import Any


def replacing(current: Any, desired: Any) -> Any:
    """A merge patch making ``current`` equal ``desired``: desired's values, null for keys it lacks.
    Lists and scalars are replaced whole (merge patches cannot address list items)."""
    if not isinstance(desired, dict) or not isinstance(current, dict):
        return desired
    patch = {key: replacing(current.get(key), value) for key, value in desired.items()}
    patch.update({key: None for key in current if key not in desired})
    return patch


def redeploy_patch(current: dict, desired: dict) -> dict:
    """The merge patch that rolls ``current`` (a Knative Service as read) to ``desired`` (rendered):
    the pod template and opbox's labels replaced, annotations added to (the ones Knative and
    others wrote stay), the rest of the spec (say ``traffic``, which Knative defaults) left alone."""
    meta, current_meta = desired["metadata"], current.get("metadata") or {}
    patch = {"metadata": {"labels": replacing(current_meta.get("labels") or {}, meta.get("labels") or {})},
             "spec": {"template": replacing((current.get("spec") or {}).get("template") or {},
                                            desired["spec"]["template"])}}
    if meta.get("annotations"):
        patch["metadata"]["annotations"] = meta["annotations"]
    return patch
