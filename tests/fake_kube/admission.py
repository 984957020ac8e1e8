"""What the real control plane does to an object between the request and etcd, beyond its schema:
server-side defaults, the API server's own validation (names, labels, immutable fields), Knative's
webhooks, and the admission of pods (PodSecurity, ResourceQuota).

Each rule is ported (read, not copied) from the source that enforces it:

- names and labels: k8s.io/apimachinery ``pkg/util/validation/validation.go`` (IsDNS1123Label,
  IsDNS1123Subdomain, IsDNS1035Label, IsQualifiedName, IsValidLabelValue) as used by
  ``pkg/api/validation/objectmeta.go`` (ValidateObjectMeta, ValidateAnnotations: 256 KiB in all);
- Jobs: kubernetes ``pkg/apis/batch/v1/defaults.go`` (completions, parallelism, backoffLimit 6, or
  MaxInt32 with ``backoffLimitPerIndex``,
  completionMode, suspend, podReplacementPolicy), ``pkg/registry/batch/job/strategy.go``
  (generateSelector: the controller-uid selector and template labels), and
  ``pkg/apis/batch/validation/validation.go`` (ValidateJobSpecUpdate: selector, template,
  completionMode and podFailurePolicy are immutable; restartPolicy Never/OnFailure);
- Knative Services (the webhook, knative/serving at 98e5ef90, the commit of the shared CRD):
  ``pkg/apis/serving/v1/service_validation.go`` (Validate: ValidateObjectMetadata, and on update
  knative.dev/pkg ``apis/metadata_validation.go`` ValidateCreatorAndModifier: the
  ``serving.knative.dev/creator`` annotation may not change, nor ``lastModifier`` unless the
  spec does), ``pkg/apis/serving/metadata_validation.go`` (SetUserInfo; ValidateContainerConcurrency
  against ``pkg/apis/config/defaults.go`` DefaultMaxRevisionContainerConcurrency = 1000),
  ``pkg/apis/autoscaling/annotation_validation.go`` (validateLastPodRetention: 0 to WindowMax = 1h,
  ``pkg/apis/autoscaling/register.go``), ``pkg/apis/serving/v1/revision_validation.go``
  (validateTimeoutSeconds: 0 to DefaultMaxRevisionTimeoutSeconds = 600) and the defaults of
  ``revision_defaults.go`` / ``route_defaults.go`` (timeoutSeconds 300, all traffic to the latest
  revision). A denial is HTTP 400 "admission webhook ... denied the request", as the API server
  relays a webhook's answer;
- Secrets: their ``data`` is ``[]byte``, so JSON decoding refuses a value that is not standard base64
  (HTTP 400 ``illegal base64 data``, encoding/json with encoding/base64.StdEncoding), and
  ``pkg/apis/core/validation/validation.go`` ValidateSecret wants keys that are IsConfigMapKey
  (``[-._a-zA-Z0-9]+``, <= 253) and at most MaxSecretSize (1 MiB) of data in all;
- pods: k8s.io/pod-security-admission ``policy/check_*.go`` for the ``restricted`` level, and the
  ResourceQuota admission plugin's "exceeded quota" for ``pods``.
"""

from __future__ import annotations

import base64
import binascii
import json
import re

from opbox.resource import parse_quantity

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")

KNATIVE = "serving.knative.dev"
CREATOR, UPDATER = f"{KNATIVE}/creator", f"{KNATIVE}/lastModifier"
MAX_CONTAINER_CONCURRENCY = 1000  # config/defaults.go DefaultMaxRevisionContainerConcurrency
MAX_RETENTION_SECONDS = 3600  # autoscaling/register.go WindowMax
MAX_TIMEOUT_SECONDS = 600  # config/defaults.go DefaultMaxRevisionTimeoutSeconds
RETENTION = "autoscaling.knative.dev/scale-to-zero-pod-retention-period"
WEBHOOK = "validation.webhook.serving.knative.dev"
USER = "fake-user"  # whom the fake's requests come from (SetUserInfo writes it)


class Refused(Exception):
    """An object the control plane does not store: HTTP ``code`` with ``reason`` and ``message``."""

    def __init__(self, code: int, reason: str, message: str):
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message


# -- names and labels ------------------------------------------------------------------------
def name_errors(value: str, rule: str) -> list[str]:
    pattern, limit, what = {
        "label": (DNS1123_LABEL, 63, "a lowercase RFC 1123 label"),
        "subdomain": (DNS1123_SUBDOMAIN, 253, "a lowercase RFC 1123 subdomain"),
        "1035": (DNS1035_LABEL, 63, "a DNS-1035 label"),
    }[rule]
    out = []
    if len(value) > limit:
        out.append(f"must be no more than {limit} characters")
    if not pattern.fullmatch(value):
        out.append(f"a {what} must consist of lower case alphanumeric characters or '-'"
                   + (" or '.'" if rule == "subdomain" else "")
                   + (", start with an alphabetic character" if rule == "1035" else ", start")
                   + " and end with an alphanumeric character")
    return out


def key_errors(key: str) -> list[str]:
    prefix, _, name = key.rpartition("/")
    out = []
    if not name or len(name) > 63 or not QUALIFIED_NAME.fullmatch(name):
        out.append(f"name part must be 1 to 63 characters of [-A-Za-z0-9_.], alphanumeric at both ends: {key!r}")
    if prefix and (len(prefix) > 253 or not DNS1123_SUBDOMAIN.fullmatch(prefix)):
        out.append(f"prefix part must be a lowercase RFC 1123 subdomain: {key!r}")
    return out


def meta_errors(meta: dict, path: str) -> list[str]:
    out = []
    for key, value in (meta.get("labels") or {}).items():
        out += [f"{path}.labels: Invalid value: {key!r}: {e}" for e in key_errors(key)]
        if not isinstance(value, str) or len(value) > 63 or not LABEL_VALUE.fullmatch(value):
            out.append(f"{path}.labels: Invalid value: {value!r}: a valid label must be an empty string or "
                       "consist of at most 63 alphanumeric characters, '-', '_' or '.', alphanumeric at both ends")
    annotations = meta.get("annotations") or {}
    for key in annotations:
        out += [f"{path}.annotations: Invalid value: {key!r}: {e}" for e in key_errors(key)]
    if sum(len(k) + len(str(v)) for k, v in annotations.items()) > 256 * 1024:
        out.append(f"{path}.annotations: Too long: must have at most 262144 bytes")
    return out


NAME_RULE = {"namespaces": "label", "nodes": "subdomain", "pods": "subdomain", "secrets": "subdomain",
             "serviceaccounts": "subdomain", "jobs": "subdomain", "events": "subdomain",
             "resourcequotas": "subdomain", "limitranges": "subdomain", "networkpolicies": "subdomain",
             "services": "1035"}


def validate(plural: str, obj: dict) -> list[str]:
    """The API server's (and for Knative Services the webhook's) checks of one object."""
    meta = obj.get("metadata") or {}
    name = meta.get("name") or ""
    out = [f"metadata.name: Invalid value: {name!r}: {e}" for e in name_errors(name, NAME_RULE[plural])]
    if not name:
        out = ["metadata.name: Required value: name or generateName is required"]
    out += meta_errors(meta, "metadata")
    if plural == "jobs":
        out += _job_errors(obj)
    elif plural == "pods":
        out += _pod_spec_errors(obj.get("spec") or {}, "spec")
    elif plural == "secrets":
        out += _secret_errors(obj)
    return out


CONFIG_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
MAX_SECRET_SIZE = 1024 * 1024  # pkg/apis/core/types.go MaxSecretSize


def decode_secret(secret: dict) -> None:
    """What JSON decoding of a Secret's ``data`` ([]byte) refuses: a value that is not standard base64."""
    for key, value in (secret.get("data") or {}).items():
        try:
            if not isinstance(value, str):
                raise ValueError("not a string")
            base64.b64decode(value, validate=True)
        except (ValueError, binascii.Error):
            raise Refused(400, "BadRequest", f'Secret in version "v1" cannot be handled as a Secret: '
                                             f'illegal base64 data in data[{key!r}]') from None


def _secret_errors(secret: dict) -> list[str]:
    data = {**(secret.get("data") or {}), **(secret.get("stringData") or {})}
    out = [f"data[{key}]: Invalid value: {key!r}: a valid config key must consist of alphanumeric characters, "
           "'-', '_' or '.'" for key in data if not CONFIG_KEY.fullmatch(key) or len(key) > 253]
    size = sum(len(base64.b64decode(v)) for v in (secret.get("data") or {}).values())
    size += sum(len(v.encode()) for v in (secret.get("stringData") or {}).values())
    if size > MAX_SECRET_SIZE:
        out.append(f"data: Too long: must have at most {MAX_SECRET_SIZE} bytes")
    return out


def _pod_spec_errors(spec: dict, path: str) -> list[str]:
    out = []
    for i, container in enumerate(spec.get("containers") or []):
        out += [f"{path}.containers[{i}].name: Invalid value: {container.get('name')!r}: {e}"
                for e in name_errors(container.get("name") or "", "label")]
    return out


def _job_errors(job: dict) -> list[str]:
    spec, name = job.get("spec") or {}, job["metadata"].get("name") or ""
    template = spec.get("template") or {}
    out = _pod_spec_errors(template.get("spec") or {}, "spec.template.spec")
    out += meta_errors(template.get("metadata") or {}, "spec.template.metadata")
    if len(name) > 63:  # the job-name label the controller puts on its pods must be a label value
        out.append(f"spec.template.labels: Invalid value: {name!r}: must be no more than 63 characters")
    policy = (template.get("spec") or {}).get("restartPolicy")
    if policy not in ("Never", "OnFailure"):
        out.append(f'spec.template.spec.restartPolicy: Required value: valid values: "OnFailure", "Never" (got {policy!r})')
    for field in ("backoffLimit", "activeDeadlineSeconds", "ttlSecondsAfterFinished", "parallelism", "completions"):
        if isinstance(spec.get(field), int) and spec[field] < 0:
            out.append(f"spec.{field}: Invalid value: {spec[field]}: must be greater than or equal to 0")
    return out


def knative_webhook(service: dict, old: dict | None) -> None:
    """Refused as Knative's validating webhook refuses a Service (HTTP 400, its messages)."""
    errors = [e for e in validate("services", service)] + _knative_errors(service)
    if old is not None:
        before, after = old["metadata"].get("annotations") or {}, service["metadata"].get("annotations") or {}
        if before.get(CREATOR) != after.get(CREATOR):  # apis.ValidateCreatorAndModifier
            errors.append(f"annotation value is immutable: metadata.annotations.{CREATOR}")
        if old.get("spec") == service.get("spec") and before.get(UPDATER) != after.get(UPDATER):
            errors.append(f"invalid value: {after.get(UPDATER)}: metadata.annotations.{UPDATER}")
    if errors:
        raise Refused(400, "BadRequest", f'admission webhook "{WEBHOOK}" denied the request: validation failed: '
                      + "; ".join(errors))


def _knative_errors(service: dict) -> list[str]:
    template = (service.get("spec") or {}).get("template") or {}
    tspec, annotations = template.get("spec") or {}, (template.get("metadata") or {}).get("annotations") or {}
    out = []
    name = service["metadata"].get("name") or ""
    if len(name) + len("-00001") > 63:  # revision names must be labels too
        out.append(f"metadata.name: Invalid value: {name!r}: revision names {name}-00001 pass 63 characters")
    cc = tspec.get("containerConcurrency")
    if cc is not None and not 0 <= cc <= MAX_CONTAINER_CONCURRENCY:
        out.append(f"expected 0 <= {cc} <= {MAX_CONTAINER_CONCURRENCY}: spec.template.spec.containerConcurrency")
    timeout = tspec.get("timeoutSeconds")
    if timeout is not None and not 0 <= timeout <= MAX_TIMEOUT_SECONDS:
        out.append(f"expected 0 <= {timeout} <= {MAX_TIMEOUT_SECONDS}: spec.template.spec.timeoutSeconds")
    if RETENTION in annotations:
        seconds = go_duration(annotations[RETENTION])
        if seconds is None:
            out.append(f"invalid value: {annotations[RETENTION]}: spec.template.metadata.annotations.{RETENTION}")
        elif not 0 <= seconds <= MAX_RETENTION_SECONDS:
            out.append(f"expected 0s <= {annotations[RETENTION]} <= 1h0m0s: "
                       f"spec.template.metadata.annotations.{RETENTION}")
    return out


def go_duration(text: str) -> float | None:
    """A Go ``time.ParseDuration`` string in seconds (None when it is not one)."""
    units = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"([0-9]+(?:\.[0-9]+)?)(ns|us|µs|ms|s|m|h)", text)
    if not parts or "".join(a + b for a, b in parts) != text:
        return None
    return sum(float(a) * units[b] for a, b in parts)


# -- defaults ----------------------------------------------------------------------------------
def _pod_defaults(spec: dict) -> None:
    """pkg/apis/core/v1/defaults.go, the fields the backend could notice."""
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("schedulerName", "default-scheduler")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("securityContext", {})
    for container in spec.get("containers") or []:
        container.setdefault("terminationMessagePath", "/dev/termination-log")
        container.setdefault("terminationMessagePolicy", "File")
        image = container.get("image") or ""
        latest = ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest")
        container.setdefault("imagePullPolicy", "Always" if latest else "IfNotPresent")


def default(plural: str, obj: dict, old: dict | None = None) -> None:
    """Server-side defaults (and the Knative defaulting webhook), applied in place."""
    meta = obj.setdefault("metadata", {})
    if plural == "jobs":
        spec = obj.setdefault("spec", {})
        if "backoffLimitPerIndex" in spec:
            spec.setdefault("backoffLimit", 2147483647)
        for key, value in (("completions", 1), ("parallelism", 1), ("backoffLimit", 6),
                           ("completionMode", "NonIndexed"), ("suspend", False),
                           ("podReplacementPolicy", "TerminatingOrFailed"), ("manualSelector", None)):
            if key not in spec and value is not None:
                spec[key] = value
        uid = meta["uid"]
        if not spec.get("manualSelector"):  # strategy.go generateSelector
            spec.setdefault("selector", {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}})
            labels = spec.setdefault("template", {}).setdefault("metadata", {}).setdefault("labels", {})
            labels.update({"batch.kubernetes.io/controller-uid": uid, "batch.kubernetes.io/job-name": meta["name"],
                           "controller-uid": uid, "job-name": meta["name"]})
        _pod_defaults(spec.setdefault("template", {}).setdefault("spec", {}))
    elif plural == "pods":
        _pod_defaults(obj.setdefault("spec", {}))
    elif plural == "services":
        spec = obj.setdefault("spec", {})
        tspec = spec.setdefault("template", {}).setdefault("spec", {})
        tspec.setdefault("timeoutSeconds", 300)
        tspec.setdefault("containerConcurrency", 0)
        tspec.setdefault("enableServiceLinks", False)
        containers = tspec.get("containers") or []
        for container in containers:  # revision_defaults.go: a lone container is "user-container"
            container.setdefault("name", "user-container" if len(containers) == 1 else "")
        spec.setdefault("traffic", [{"latestRevision": True, "percent": 100}])
        annotations = meta.setdefault("annotations", {})
        if old is None:  # metadata_validation.go SetUserInfo
            annotations[CREATOR] = annotations[UPDATER] = USER
        elif spec != old.get("spec"):
            annotations[UPDATER] = USER


# -- updates -------------------------------------------------------------------------------------
IMMUTABLE = {"jobs": ("selector", "template", "completionMode", "podFailurePolicy")}


def check_update(plural: str, old: dict, new: dict) -> None:
    """Refused (422 Invalid): an update that changes an immutable field."""
    errors = []
    for field in IMMUTABLE.get(plural, ()):
        if (old.get("spec") or {}).get(field) != (new.get("spec") or {}).get(field):
            errors.append(f"spec.{field}: Invalid value: {json.dumps(new['spec'].get(field))[:200]}: "
                          "field is immutable")
    if plural == "jobs":  # validation.go ValidateJobSpecUpdate: elastic Indexed Jobs (GA 1.31)
        spec, before = new.get("spec") or {}, old.get("spec") or {}
        if spec.get("completions") != before.get("completions") and (
                spec.get("completionMode") != "Indexed" or spec.get("completions") != spec.get("parallelism")):
            errors.append(f"spec.completions: Invalid value: {spec.get('completions')}: can only be modified in "
                          "tandem with spec.parallelism for Indexed Jobs")
    if errors:
        raise Refused(422, "Invalid", f"{new['kind']}.{group(plural)} {new['metadata']['name']!r} is invalid: "
                      + "; ".join(errors))


def group(plural: str) -> str:
    return {"jobs": "batch", "services": KNATIVE}.get(plural, "")


# -- pod admission -----------------------------------------------------------------------------
def restricted_violations(spec: dict) -> list[str]:
    """What the PodSecurity ``restricted`` level (pod-security-admission policy/check_*.go) finds."""
    pod_sc = spec.get("securityContext") or {}
    containers = [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]
    out = []

    def lacking(test) -> list[str]:
        return [c["name"] for c in containers if not test(c.get("securityContext") or {})]

    if spec.get("hostNetwork") or spec.get("hostPID") or spec.get("hostIPC"):
        out.append("host namespaces (hostNetwork=true)")
    names = lacking(lambda sc: sc.get("allowPrivilegeEscalation") is False)
    if names:
        out.append(f"allowPrivilegeEscalation != false (containers {names} must set "
                   "securityContext.allowPrivilegeEscalation=false)")
    names = lacking(lambda sc: "ALL" in ((sc.get("capabilities") or {}).get("drop") or []))
    if names:
        out.append(f'unrestricted capabilities (containers {names} must set securityContext.capabilities.drop=["ALL"])')
    names = lacking(lambda sc: sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True)
    if names:
        out.append(f"runAsNonRoot != true (pod or containers {names} must set securityContext.runAsNonRoot=true)")
    names = lacking(lambda sc: ((sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
                                in ("RuntimeDefault", "Localhost")))
    if names:
        out.append(f'seccompProfile (pod or containers {names} must set securityContext.seccompProfile.type to '
                   '"RuntimeDefault" or "Localhost")')
    if any("hostPath" in volume for volume in spec.get("volumes") or []):
        out.append("restricted volume types (hostPath)")
    return out


def admit_pod(store, pod: dict) -> None:
    """Refused (403 Forbidden) when the namespace's PodSecurity level or a ResourceQuota says no."""
    meta = pod["metadata"]
    namespace = store.get("namespaces", None, meta["namespace"]) or {}
    labels = namespace.get("metadata", {}).get("labels") or {}
    name = meta.get("name") or meta.get("generateName", "")
    if labels.get("pod-security.kubernetes.io/enforce") == "restricted":
        violations = restricted_violations(pod.get("spec") or {})
        if violations:
            raise Refused(403, "Forbidden", f'pods "{name}" is forbidden: violates PodSecurity "restricted:latest": '
                          + ", ".join(violations))
    admit_count(store, "pods", pod)


def admit_count(store, plural: str, obj: dict) -> None:
    """The ResourceQuota admission plugin's object counts: ``pods`` (those not finished) and
    ``count/jobs.batch``; refused (403) with its "exceeded quota" message."""
    meta = obj["metadata"]
    resource = {"pods": "pods", "jobs": "count/jobs.batch"}.get(plural)
    if resource is None:
        return
    for quota in store.list("resourcequotas", meta["namespace"]):
        hard = (quota.get("spec") or {}).get("hard") or {}
        if resource not in hard:
            continue
        used = sum(1 for o in store.list(plural, meta["namespace"])
                   if (o.get("status") or {}).get("phase") not in ("Succeeded", "Failed"))
        limit = int(parse_quantity(str(hard[resource])))
        if used + 1 > limit:
            raise Refused(403, "Forbidden", f'{plural} "{meta.get("name")}" is forbidden: exceeded quota: '
                          f"{quota['metadata']['name']}, requested: {resource}=1, used: {resource}={used}, "
                          f"limited: {resource}={limit}")
