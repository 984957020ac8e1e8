"""Offline validators for what opbox hands Kubernetes, shared by test_k8s_manifests.py and the fake
API server (tests/fake_kube), which refuses any object that fails them.

Built-in kinds: kubernetes-validate's strict schemas (unknown fields fail) for K8S_VERSIONS.
Knative Services: the CRD's structural openAPIV3Schema as JSON Schema, with the API server's
rules for unknown fields; root metadata is kubernetes-validate's strict ObjectMeta.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
CRD_PATH = Path(
    os.environ.get("OPBOX_KNATIVE_CRD") or ROOT.parent / "shared" / "knative" / "service.serving.knative.dev.crd.yaml"
)
K8S_VERSIONS = ("1.34", "1.35", "1.36", "1.37")  # kubernetes-validate >= 1.37 ships these
OBJECT_META = "https://kubernetes.io/api/_definitions.json#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"


def k8s_error(kvu, manifest: dict, version: str) -> str | None:
    """None when ``manifest`` passes strict validation for ``version``, else the error.

    A missing schema (or a silent fallback to another version) is an AssertionError: the
    check itself is broken then, not the manifest.
    """
    try:
        validated = kvu.validate(manifest, version, strict=True)
    except kvu.ValidationError as exc:
        return f"{'.'.join(map(str, exc.path)) or '<root>'}: {exc.message}"
    except (kvu.SchemaNotFoundError, kvu.VersionNotSupportedError) as exc:
        raise AssertionError(exc.message) from None
    assert validated == version, f"kubernetes-validate fell back to {validated} for {version}"
    return None


def structural_to_jsonschema(node: dict) -> dict:
    """A CRD's structural openAPIV3Schema as JSON Schema, with the API server's field rules.

    An object without ``additionalProperties`` or ``x-kubernetes-preserve-unknown-fields``
    has exactly its ``properties`` (the server prunes, or with kubectl's default strict field
    validation rejects, anything else); ``x-kubernetes-preserve-unknown-fields`` allows any
    other field; ``x-kubernetes-int-or-string`` is an integer or a string; ``nullable`` admits null.
    """
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: structural_to_jsonschema(sub) for name, sub in value.items()}
        elif key in ("items", "not"):
            out[key] = structural_to_jsonschema(value)
        elif key == "additionalProperties":
            out[key] = structural_to_jsonschema(value) if isinstance(value, dict) else value
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [structural_to_jsonschema(sub) for sub in value]
        elif key in ("type", "required", "enum", "pattern", "minimum", "maximum", "exclusiveMinimum",
                     "exclusiveMaximum", "minLength", "maxLength", "minItems", "maxItems", "uniqueItems",
                     "minProperties", "maxProperties", "multipleOf"):
            out[key] = value
        # description, default, format, example and the other x-kubernetes-* keys do not restrict.
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("type") == "object" and "additionalProperties" not in node and not node.get(
        "x-kubernetes-preserve-unknown-fields"
    ):
        out["additionalProperties"] = False
    return out


def load_crd_schema(path: Path = CRD_PATH) -> dict:
    """The Knative Service CRD's v1 openAPIV3Schema (FileNotFoundError when the file is missing)."""
    crd = yaml.safe_load(Path(path).read_text())
    assert crd["spec"]["names"]["kind"] == "Service" and crd["spec"]["group"] == "serving.knative.dev", path
    return next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]


def knative_validator(kvu, crd_schema: dict):
    """A jsonschema validator for serving.knative.dev/v1 Service."""
    import jsonschema
    import referencing

    schema = structural_to_jsonschema(crd_schema)
    schema["properties"]["metadata"] = {"$ref": OBJECT_META}
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)
    latest = next(v for v in kvu.all_versions() if kvu.major_minor(v) == K8S_VERSIONS[-1])
    definitions = kvu.schema_contents(f"kubernetes-json-schema/v{latest}-local-strict/_definitions.json", latest)
    registry = referencing.Resource.from_contents(definitions) @ referencing.Registry()
    return jsonschema.Draft202012Validator(schema, registry=registry)


def knative_errors(validator, manifest: dict) -> list[str]:
    return [
        f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in sorted(validator.iter_errors(manifest), key=lambda e: list(map(str, e.absolute_path)))
    ]


class ManifestValidator:
    """Everything above in one object: ``errors(manifest)`` -> [] when every check passes."""

    def __init__(self, versions: tuple[str, ...] = K8S_VERSIONS, crd_path: Path = CRD_PATH):
        import kubernetes_validate.utils as kvu

        self.kvu = kvu
        self.versions = versions
        self.knative = knative_validator(kvu, load_crd_schema(crd_path))

    def errors(self, manifest: dict) -> list[str]:
        if manifest.get("apiVersion") == "serving.knative.dev/v1":
            return knative_errors(self.knative, manifest)
        found = []
        for version in self.versions:
            error = k8s_error(self.kvu, manifest, version)
            if error:
                found.append(f"Kubernetes {version}: {error}")
        return found
