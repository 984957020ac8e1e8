"""Render opbox workloads as Kubernetes manifests: a batch/v1 Job per Job-Run, a Knative Service per class.

Pure functions: no cluster and no kubernetes-client calls. The specs validate their inputs
(names, env, scale settings) when made and raise ``ValidationError``; the Jinja templates in
``opbox/templates/kubernetes/`` lay the values out, every interpolated value passing through
the ``toyaml`` filter (a YAML double-quoted scalar or flow collection), so user-provided
strings can never become YAML structure.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import yaml

from opbox.errors import ConfigError, ValidationError
from opbox.resource import Resource

from ..base import worker_caller_token
from ..runtime_env import identity_env

# <package>/platform/backends/kubernetes/render.py -> <package>/templates/kubernetes
TEMPLATES = Path(__file__).parents[3] / "templates" / "kubernetes"

RUNTIME_PORT = 8080
GPU_RESOURCE = "nvidia.com/gpu"
# Set by NVIDIA GPU Feature Discovery / the GPU operator. On GKE use "cloud.google.com/gke-accelerator".
DEFAULT_GPU_LABEL_KEY = "nvidia.com/gpu.product"
DEFAULT_SERVICE_ACCOUNT = "opbox-runner"
DEFAULT_TTL_AFTER_FINISHED = 3600
RUN_AS_USER = 10001  # the uid of non-root pods (the gateway's too)
# Knative names revisions "<service>-00001"; keep that within a 63-character label.
MAX_SERVICE_NAME = 56
# Env the platform sets itself; users may not override it.
RESERVED_ENV = frozenset({
    "OPBOX_GATEWAY_URL", "OPBOX_WORKSPACE", "OPBOX_RUN_ID", "OPBOX_JOB_ID", "OPBOX_VERSION", "OPBOX_RUN_TOKEN",
    "OPBOX_TOKEN",  # the pod's caller token (the token Secret's "caller" key): its SDK calls its own workspace
})
# Knative rejects user env with these names.
KNATIVE_RESERVED_ENV = frozenset({"PORT", "K_SERVICE", "K_CONFIGURATION", "K_REVISION"})

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")  # RFC 1123 label, <= 63
_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")  # RFC 1035 label (Service names), <= 63
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")  # <= 253
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")  # <= 63
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")  # <= 63
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
_DURATION = re.compile(r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$")  # Go time.Duration
_PULL_POLICIES = ("Always", "IfNotPresent", "Never")


# --- names -------------------------------------------------------------------------------

def check_dns_label(value: Any, what: str) -> str:
    """``value`` if it is an RFC 1123 label (namespace, Job names), else ``ValidationError``."""
    if not isinstance(value, str) or len(value) > 63 or not _DNS_LABEL.fullmatch(value):
        raise ValidationError(
            f"{what} {value!r} is not a valid Kubernetes name: use 1 to 63 lowercase letters, digits"
            " or '-', starting and ending with a letter or digit"
        )
    return value


def check_dns_subdomain(value: Any, what: str) -> str:
    """``value`` if it is an RFC 1123 subdomain (Secret, ServiceAccount names), else ``ValidationError``."""
    if not isinstance(value, str) or len(value) > 253 or not _DNS_SUBDOMAIN.fullmatch(value):
        raise ValidationError(
            f"{what} {value!r} is not a valid Kubernetes name: use up to 253 lowercase letters, digits,"
            " '-' or '.', starting and ending with a letter or digit"
        )
    return value


def check_label_key(value: Any, what: str) -> str:
    """``value`` if it is a label key (``[prefix/]name``), else ``ValidationError``."""
    prefix, _, name = value.rpartition("/") if isinstance(value, str) else ("", "", "")
    if not name or len(name) > 63 or not _LABEL_NAME.fullmatch(name) or (
        prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.fullmatch(prefix))
    ):
        raise ValidationError(f"{what} {value!r} is not a valid label key (such as 'nvidia.com/gpu.product')")
    return value


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def label_value(value: Any) -> str:
    """``value`` as a label value: as is when valid, else cleaned and made unique with a hash suffix."""
    text = str(value)
    if len(text) <= 63 and _LABEL_VALUE.fullmatch(text):
        return text
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", text)[:54].strip("-_.")
    return f"{cleaned}-{_digest(text)}" if cleaned else _digest(text)


def service_name(name: str) -> str:
    """A Knative Service name (RFC 1035 label, <= MAX_SERVICE_NAME) for ``name``.

    Valid names stay as they are; others are lowercased, cleaned and get a hash suffix so two
    names that clean to the same text ("My_Model", "my-model") do not collide.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValidationError(f"service name {name!r}: expected a non-empty string")
    if len(name) <= MAX_SERVICE_NAME and _DNS_1035.fullmatch(name):
        return name
    cleaned = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    cleaned = re.sub(r"^[0-9-]+", "", cleaned)  # must start with a letter
    cleaned = cleaned[: MAX_SERVICE_NAME - 9].rstrip("-") or "svc"
    return f"{cleaned}-{_digest(name)}"


SECRET_PREFIX = "opbox-secret-"


def secret_object_name(name: str) -> str:
    """The Kubernetes Secret of the workspace secret ``name`` (``[a-z0-9][-a-z0-9_]*``): ``opbox-secret-<name>``,
    with ``_`` (not allowed in object names) made ``-`` and a hash suffix, so ``a_b`` and ``a-b`` stay apart."""
    cleaned = name.replace("_", "-")
    if cleaned != name:
        cleaned = f"{cleaned.rstrip('-')}-{_digest(name)}"
    return check_dns_subdomain(SECRET_PREFIX + cleaned, "Secret name (from the secret's name)")


def job_name(run_id: str, attempt: int = 0, disruption: int = 0) -> str:
    """The Job of a Job-Run's attempt: ``opbox-run-<run id lowercased>`` (``.`` of map items as
    ``-``), with ``-a<N>`` for retries: each attempt is a Job of its own; and ``-d<N>`` when it is
    run again after its pod was disrupted (evicted, its node lost)."""
    if not isinstance(run_id, str) or not run_id:
        raise ValidationError(f"run id {run_id!r}: expected a non-empty string")
    suffix = (f"-a{attempt}" if attempt else "") + (f"-d{disruption}" if disruption else "")
    return check_dns_label(f"opbox-run-{run_id.lower().replace('.', '-')}{suffix}", "Job name (from the run id)")


# --- resources ---------------------------------------------------------------------------

def to_resources(
    resource: Resource, gpu_label_key: str = DEFAULT_GPU_LABEL_KEY
) -> tuple[dict[str, str], dict[str, str], dict[str, str], list[dict[str, str]]]:
    """Container ``(requests, limits, nodeSelector, tolerations)`` for a ``Resource``.

    cpu, memory and disk (as ``ephemeral-storage``) are requested and limited alike; GPUs are
    a ``nvidia.com/gpu`` limit (an extended resource's request defaults to its limit), a node
    selector on ``gpu_label_key`` when a GPU type is named, and a toleration of GPU node taints.
    """
    amounts = {"cpu": resource.cpu, "memory": resource.memory, "ephemeral-storage": resource.disk}
    requests = {key: str(value) for key, value in amounts.items() if value is not None}
    limits = dict(requests)
    node_selector: dict[str, str] = {}
    tolerations: list[dict[str, str]] = []
    if resource.gpu_count:
        limits[GPU_RESOURCE] = str(resource.gpu_count)
        tolerations.append({"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"})
        if resource.gpu:
            node_selector[check_label_key(gpu_label_key, "gpu_label_key")] = resource.gpu
    return requests, limits, node_selector, tolerations


# --- the toyaml filter -------------------------------------------------------------------

def _quote(text: str) -> str:
    # PyYAML's own emitter: escapes quotes, line breaks, control and non-ASCII characters.
    out = yaml.safe_dump(text, default_style='"', width=math.inf, allow_unicode=False).rstrip("\n")
    if "\n" in out:  # pragma: no cover - width=inf keeps it on one line
        raise ValidationError(f"cannot quote {text!r} on one line")
    return out


def toyaml(value: Any) -> str:
    """``value`` as one line of YAML: a double-quoted string, a number, or a flow collection."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValidationError(f"cannot render {value!r} in a manifest")
        return repr(value)
    if isinstance(value, str):
        return _quote(value)
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_quote(str(k))}: {toyaml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toyaml(v) for v in value) + "]"
    raise TypeError(f"toyaml: cannot render a {type(value).__name__}")


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    if not TEMPLATES.is_dir():
        raise ConfigError(f"opbox's Kubernetes templates are missing: {TEMPLATES} is not a folder")
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        autoescape=False,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["toyaml"] = toyaml
    env.globals["to_resources"] = to_resources
    return env


def render_text(template: str, **context: Any) -> str:
    """The YAML text of a template (for debugging, ``kubectl apply -f -``)."""
    return environment().get_template(template).render(**context)


# --- specs -------------------------------------------------------------------------------

def _positive_int(value: Any, what: str, *, zero: bool = False) -> int:
    low = 0 if zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValidationError(f"{what}: expected a whole number >= {low}, got {value!r}")
    return value


@dataclass(frozen=True, kw_only=True)
class WorkloadSpec:
    """What a Job and a Knative Service have in common: the runtime container and its pod."""

    namespace: str
    workspace: str
    job_id: str
    version: int | str
    image: str
    gateway_url: str
    token_secret: str  # Secret holding the run token, exposed as OPBOX_RUN_TOKEN (its "caller" key as OPBOX_TOKEN)
    token_secret_key: str = "token"
    command: tuple[str, ...] | None = None  # default: the runtime entrypoint
    resource: Resource = field(default_factory=Resource)
    env: Mapping[str, str] = field(default_factory=dict, hash=False)  # operator env; resource.env wins
    secrets: tuple[str, ...] = ()  # user Secrets, each loaded whole with envFrom
    service_account: str | None = DEFAULT_SERVICE_ACCOUNT
    image_pull_secrets: tuple[str, ...] = ()
    image_pull_policy: str | None = None
    gpu_label_key: str = DEFAULT_GPU_LABEL_KEY
    # the pod as PodSecurity "restricted" wants it: a non-root uid (whatever the image's user), a
    # read-only root filesystem and a writable /tmp emptyDir (HOME too, for libraries' caches)
    run_as_non_root: bool = False
    run_as_user: int = RUN_AS_USER

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        for name in ("command", "secrets", "image_pull_secrets"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or (value is not None and not isinstance(value, (list, tuple))):
                raise ValidationError(f"{name}: expected a list of strings, got {value!r}")
            if value is not None:
                set_(self, name, tuple(value))
        if not isinstance(self.env, Mapping):
            raise ValidationError(f"env: expected a mapping of names to values, got {type(self.env).__name__}")
        set_(self, "env", dict(self.env))
        check_dns_label(self.namespace, "namespace")
        if not isinstance(self.resource, Resource):
            raise ValidationError(f"resource: expected a Resource, got {type(self.resource).__name__}")
        for what in ("workspace", "job_id", "gateway_url"):
            value = getattr(self, what)
            if not isinstance(value, str) or not value:
                raise ValidationError(f"{what}: expected a non-empty string, got {value!r}")
        if isinstance(self.version, bool) or not isinstance(self.version, (int, str)) or self.version == "":
            raise ValidationError(f"version: expected a number or a string, got {self.version!r}")
        if not isinstance(self.image, str) or not self.image or any(c.isspace() for c in self.image):
            raise ValidationError(f"image {self.image!r}: expected an image reference such as 'registry/name:tag'")
        if self.command is not None and (not self.command or not all(isinstance(a, str) for a in self.command)):
            raise ValidationError(f"command: expected a non-empty list of strings, got {self.command!r}")
        check_dns_subdomain(self.token_secret, "token_secret")
        if not isinstance(self.token_secret_key, str) or not re.fullmatch(r"[-._a-zA-Z0-9]+", self.token_secret_key):
            raise ValidationError(f"token_secret_key {self.token_secret_key!r} is not a valid Secret key")
        for secret in self.secrets:
            check_dns_subdomain(secret, "secret")
        for secret in self.image_pull_secrets:
            check_dns_subdomain(secret, "image pull secret")
        if self.service_account is not None:
            check_dns_subdomain(self.service_account, "service_account")
        if self.image_pull_policy is not None and self.image_pull_policy not in _PULL_POLICIES:
            raise ValidationError(f"image_pull_policy {self.image_pull_policy!r}: expected one of {_PULL_POLICIES}")
        check_label_key(self.gpu_label_key, "gpu_label_key")
        _positive_int(self.run_as_user, "run_as_user")
        for name, value in self.user_env.items():
            if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
                raise ValidationError(
                    f"env {name!r} is not a valid variable name: use letters, digits, '_', '-' or '.',"
                    " not starting with a digit"
                )
            if not isinstance(value, str):
                raise ValidationError(f"env {name}: expected a string value, got {type(value).__name__}")
            if name in RESERVED_ENV:
                raise ValidationError(f"env {name} is set by opbox itself and cannot be overridden")

    @property
    def user_env(self) -> dict[str, str]:
        return {**self.env, **self.resource.env}

    def labels(self) -> dict[str, str]:
        return {
            "app.kubernetes.io/managed-by": "opbox",
            "opbox.dev/workspace": label_value(self.workspace),
            "opbox.dev/job": label_value(self.job_id),
            "opbox.dev/version": label_value(self.version),
        }

    def platform_env(self) -> dict[str, str]:
        return identity_env(self.gateway_url, self.workspace, self.job_id, self.version)

    def context(self) -> dict[str, Any]:
        """What every template gets."""
        return {
            "namespace": self.namespace,
            "image": self.image,
            "image_pull_policy": self.image_pull_policy,
            "env": list({**self.platform_env(), **({"HOME": "/tmp"} if self.run_as_non_root else {}),
                         **self.user_env}.items()),
            "token_secret": self.token_secret,
            "token_secret_key": self.token_secret_key,
            "caller_token": None,  # None: the token Secret's "caller" key (a run's, a service's)
            "secrets": list(self.secrets),
            "service_account": self.service_account,
            "image_pull_secrets": list(self.image_pull_secrets),
            "resource": self.resource,
            "gpu_label_key": self.gpu_label_key,
            "run_as_non_root": self.run_as_non_root,
            "run_as_user": self.run_as_user,
            "field_env": [],  # (name, fieldPath) from the downward API, before the others
            "indexed": None,  # a worker pool's Job: completions = parallelism = this
        }


@dataclass(frozen=True, kw_only=True)
class JobSpec(WorkloadSpec):
    """One Job-Run as a one-shot batch/v1 Job."""

    run_id: str
    ttl_seconds_after_finished: int | None = DEFAULT_TTL_AFTER_FINISHED
    attempt: int = 0  # the platform's attempt number: part of the Job's name and labels
    disruption: int = 0  # times this attempt's pod was disrupted before (evicted, its node lost): part of the name
    backoff_limit: int | None = None  # None: resource.max_retries (the kubernetes backend sets 0: it retries itself)
    # the pod's terminationGracePeriodSeconds: SIGTERM, then SIGKILL this many seconds later when
    # the Job is deleted (cancel) or its deadline passes; None: Kubernetes' default (30 s)
    termination_grace_period_seconds: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive_int(self.attempt, "attempt", zero=True)
        if self.backoff_limit is not None:
            _positive_int(self.backoff_limit, "backoff_limit", zero=True)
        if self.termination_grace_period_seconds is not None:
            _positive_int(self.termination_grace_period_seconds, "termination_grace_period_seconds", zero=True)
        _positive_int(self.disruption, "disruption", zero=True)
        job_name(self.run_id, self.attempt, self.disruption)
        if self.ttl_seconds_after_finished is not None:
            _positive_int(self.ttl_seconds_after_finished, "ttl_seconds_after_finished", zero=True)

    @property
    def name(self) -> str:
        return job_name(self.run_id, self.attempt, self.disruption)

    def labels(self) -> dict[str, str]:
        return {**super().labels(), "opbox.dev/run": label_value(self.run_id), "opbox.dev/attempt": str(self.attempt)}

    def platform_env(self) -> dict[str, str]:
        return identity_env(self.gateway_url, self.workspace, self.job_id, self.version, self.run_id)

    def context(self) -> dict[str, Any]:
        timeout = self.resource.timeout
        return {
            **super().context(),
            "name": self.name,
            "labels": self.labels(),
            "command": list(self.command or ("python", "-m", "opbox.runtime", "run", "--run-id", self.run_id)),
            "backoff_limit": self.resource.max_retries if self.backoff_limit is None else self.backoff_limit,
            "active_deadline_seconds": None if timeout is None else max(1, math.ceil(timeout)),
            "ttl_seconds_after_finished": self.ttl_seconds_after_finished,
            "termination_grace_period_seconds": self.termination_grace_period_seconds,
        }


COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"  # the job controller's, on each pod


@dataclass(frozen=True, kw_only=True)
class WorkerSpec(WorkloadSpec):
    """The warm workers of a job version's pool as ONE batch/v1 Job in ``Indexed`` completion mode,
    a pod per index, each running ``python -m opbox.runtime worker``: it pulls map items from the
    gateway until the pool lets it go (it exits 0, its index completes). ``workers`` is both
    ``completions`` and ``parallelism`` (an elastic Indexed Job: more workers are a patch of both);
    ``backoffLimitPerIndex: 0``: a worker that fails is not run again and the others go on. A pod's
    worker id is ``<name>-<its index>`` (the downward API); the token in ``token_secret`` is the
    Job's, shared by its pods (one version's workers); run timeouts are the pool's: no deadline."""

    name: str  # the Job's
    pool_id: str  # the version's key, "<job id>.v<N>"
    workers: int = 1
    ttl_seconds_after_finished: int | None = DEFAULT_TTL_AFTER_FINISHED
    termination_grace_period_seconds: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.pool_id, str) or not self.pool_id:
            raise ValidationError("pool_id: expected a non-empty string")
        _positive_int(self.workers, "workers")
        check_dns_label(self.name, "worker Job name")
        if len(self.name) > 50:  # its pods are named <name>-<index>-<5 characters>
            raise ValidationError(f"worker Job name {self.name!r}: at most 50 characters")

    def labels(self) -> dict[str, str]:
        return {**super().labels(), "opbox.dev/pool": label_value(self.pool_id), "opbox.dev/worker": "pool"}

    def platform_env(self) -> dict[str, str]:
        return {**super().platform_env(), "OPBOX_POOL": self.pool_id,
                "OPBOX_WORKER_ID": f"{self.name}-$(OPBOX_WORKER_INDEX)"}

    def context(self) -> dict[str, Any]:
        return {
            **super().context(),
            "name": self.name,
            "labels": self.labels(),
            "field_env": [("OPBOX_WORKER_INDEX", f"metadata.annotations['{COMPLETION_INDEX}']")],
            # each pod's own caller token, made by Kubernetes from its worker id and the Job's token (the env
            # entries it names come before it): a Secret shared by the Job's pods cannot hold one per pod
            "caller_token": worker_caller_token(self.pool_id, "$(OPBOX_WORKER_ID)", "$(OPBOX_RUN_TOKEN)"),
            "command": list(self.command or ("python", "-m", "opbox.runtime", "worker")),
            "indexed": self.workers,
            "active_deadline_seconds": None,
            "ttl_seconds_after_finished": self.ttl_seconds_after_finished,
            "termination_grace_period_seconds": self.termination_grace_period_seconds,
        }


@dataclass(frozen=True, kw_only=True)
class ServiceSpec(WorkloadSpec):
    """A class as a Knative Service running the runtime in serve mode.

    ``max_scale`` None leaves Knative's default (unlimited); ``target`` is the concurrent
    requests per replica the autoscaler aims at; ``container_concurrency`` 0 is unlimited;
    ``timeout_seconds`` defaults to ``resource.timeout`` (rounded up), else Knative's default.
    ``cluster_local`` keeps the Service off the public ingress: only the gateway calls it.
    """

    name: str
    min_scale: int = 0
    max_scale: int | None = None
    target: int | None = None
    container_concurrency: int = 0
    timeout_seconds: int | None = None
    scale_to_zero_retention: str | None = None  # e.g. "5m"
    cluster_local: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        service_name(self.name)
        _positive_int(self.min_scale, "min_scale", zero=True)
        _positive_int(self.container_concurrency, "container_concurrency", zero=True)
        if self.max_scale is not None:
            _positive_int(self.max_scale, "max_scale", zero=True)
            if self.max_scale and self.max_scale < self.min_scale:
                raise ValidationError(f"max_scale {self.max_scale} is less than min_scale {self.min_scale}")
        if self.target is not None:
            _positive_int(self.target, "target")
        if self.timeout_seconds is not None:
            _positive_int(self.timeout_seconds, "timeout_seconds")
        if self.scale_to_zero_retention is not None and (
            not isinstance(self.scale_to_zero_retention, str) or not _DURATION.fullmatch(self.scale_to_zero_retention)
        ):
            raise ValidationError(
                f"scale_to_zero_retention {self.scale_to_zero_retention!r}: expected a duration such as '90s' or '5m'"
            )
        clash = sorted(KNATIVE_RESERVED_ENV & set(self.user_env))
        if clash:
            raise ValidationError(f"env {', '.join(clash)}: reserved by Knative Serving")

    @property
    def service_name(self) -> str:
        return service_name(self.name)

    def context(self) -> dict[str, Any]:
        timeout = self.timeout_seconds
        if timeout is None and self.resource.timeout is not None:
            timeout = max(1, math.ceil(self.resource.timeout))
        annotations = {"autoscaling.knative.dev/min-scale": str(self.min_scale)}
        if self.max_scale is not None:
            annotations["autoscaling.knative.dev/max-scale"] = str(self.max_scale)
        if self.target is not None:
            annotations["autoscaling.knative.dev/target"] = str(self.target)
        if self.scale_to_zero_retention is not None:
            annotations["autoscaling.knative.dev/scale-to-zero-pod-retention-period"] = self.scale_to_zero_retention
        labels = self.labels()
        service_labels = dict(labels)
        if self.cluster_local:
            service_labels["networking.knative.dev/visibility"] = "cluster-local"
        return {
            **super().context(),
            "name": self.service_name,
            "labels": service_labels,
            "template_labels": labels,
            "annotations": annotations,
            "command": list(self.command or ("python", "-m", "opbox.runtime", "serve", "--port", str(RUNTIME_PORT))),
            "port": RUNTIME_PORT,
            "container_concurrency": self.container_concurrency,
            "timeout_seconds": timeout,
        }


# --- rendering ---------------------------------------------------------------------------

def _load(text: str, what: str) -> dict:
    try:
        manifest = yaml.safe_load(text)
    except yaml.YAMLError as exc:  # a template bug, never user input: every value is quoted
        raise ConfigError(f"{what} template rendered invalid YAML: {exc}") from exc
    if not isinstance(manifest, dict):
        raise ConfigError(f"{what} template did not render a mapping")
    return manifest


def render_job(spec: JobSpec) -> dict:
    """The batch/v1 Job of one Job-Run."""
    return _load(render_text("job.yaml.j2", **spec.context()), "job")


def render_worker(spec: WorkerSpec) -> dict:
    """The batch/v1 Job of a pool's workers (the Job-Run template, Indexed, the worker's command)."""
    return _load(render_text("job.yaml.j2", **spec.context()), "job")


def render_service(spec: ServiceSpec) -> dict:
    """The serving.knative.dev/v1 Service of a class."""
    return _load(render_text("knative-service.yaml.j2", **spec.context()), "knative-service")
