"""The kubernetes backend's settings (from the environment) and its API client (kubeconfig or in-cluster)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from opbox.errors import ConfigError

from ...settings import env_float, env_int, env_json_strings
from . import render


def _csv(name: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in os.environ.get(name, "").split(",") if part.strip())


@dataclass(frozen=True)
class KubernetesSettings:
    """The kubernetes backend's settings, from the environment (see docs/kubernetes.md)."""

    kubeconfig: str | None = None  # OPBOX_KUBECONFIG, else KUBECONFIG; neither: in-cluster, else ~/.kube/config
    context: str | None = None  # OPBOX_KUBE_CONTEXT
    namespace_template: str = "opbox-{workspace}"  # OPBOX_NAMESPACE_TEMPLATE
    create_namespaces: bool = True  # OPBOX_K8S_CREATE_NAMESPACES=0: they must exist (with the service account)
    service_account: str | None = render.DEFAULT_SERVICE_ACCOUNT  # OPBOX_RUNNER_SERVICE_ACCOUNT ("" for none)
    gateway_url: str | None = None  # OPBOX_K8S_GATEWAY_URL: how pods reach the gateway (default OPBOX_PUBLIC_URL)
    # OPBOX_K8S_WORKER_URL: how a pool's worker pods reach the gateway replica that started them, whose
    # memory holds their pool (several replicas: this pod's own address, http://$(POD_IP):8000); default gateway_url
    worker_url: str | None = None
    max_inflight: int = 200  # OPBOX_K8S_MAX_INFLIGHT: Jobs at once; more runs wait in a queue
    # OPBOX_K8S_WORKSPACE_INFLIGHT: Jobs at once of one workspace (None: half of max_inflight), so
    # one workspace's stuck runs cannot hold every slot; free slots go to the workspace with fewest
    workspace_inflight: int | None = None
    # OPBOX_K8S_POOL_WORKERS: worker pods at most per job version's pool, which map items go to
    # (workers.py); 0: a Job per map item, as for single runs
    pool_workers: int = 50
    items_per_worker: int = 50  # OPBOX_K8S_ITEMS_PER_WORKER: queued map items per worker pod started
    pending_timeout: float = 600.0  # OPBOX_K8S_PENDING_TIMEOUT: seconds a run's pod may take to start
    image_pull_patience: float = 300.0  # OPBOX_K8S_IMAGE_PULL_PATIENCE: seconds of ImagePullBackOff retries
    ttl_after_finished: int = render.DEFAULT_TTL_AFTER_FINISHED  # OPBOX_K8S_TTL_AFTER_FINISHED
    env: dict = field(default_factory=dict, hash=False)  # OPBOX_K8S_ENV: a JSON object of env for every run
    secrets: tuple[str, ...] = ()  # OPBOX_K8S_SECRETS: Secrets (in the workspace namespace) loaded as env
    image_pull_secrets: tuple[str, ...] = ()  # OPBOX_K8S_IMAGE_PULL_SECRETS
    image_pull_policy: str | None = None  # OPBOX_K8S_IMAGE_PULL_POLICY
    gpu_label_key: str = render.DEFAULT_GPU_LABEL_KEY  # OPBOX_K8S_GPU_LABEL_KEY
    delete_propagation: str = "Background"  # OPBOX_K8S_DELETE_PROPAGATION: Background or Foreground
    watch_timeout: int = 300  # OPBOX_K8S_WATCH_TIMEOUT: seconds a watch request lasts before it is renewed
    # OPBOX_K8S_TERMINATION_GRACE: whole seconds between SIGTERM and SIGKILL when a run's Job is
    # deleted (its pods' terminationGracePeriodSeconds); None: the platform's cancel grace
    termination_grace: int | None = None
    log_tail_lines: int = 20  # lines of a failed pod's log put in the run's exit reason
    # workspace namespaces (namespaces.py) and their pods
    pod_security: str | None = "restricted"  # OPBOX_K8S_POD_SECURITY: the namespaces' PodSecurity level ("": none)
    run_as_non_root: bool = True  # OPBOX_K8S_RUN_AS_NON_ROOT: pods run as uid 10001 on a read-only root
    network_policy: bool = True  # OPBOX_K8S_NETWORK_POLICY: default-deny egress but DNS and the gateway
    gateway_namespace: str = "opbox-system"  # OPBOX_SYSTEM_NAMESPACE: where the gateway's pods are
    gateway_port: int = 8000  # OPBOX_K8S_GATEWAY_PORT: the port its pods listen on
    resource_quota: dict = field(default_factory=dict, hash=False)  # OPBOX_K8S_RESOURCE_QUOTA: spec.hard, JSON
    limit_range: dict = field(default_factory=dict, hash=False)  # OPBOX_K8S_LIMIT_RANGE: a Container limit, JSON

    @classmethod
    def from_env(cls) -> "KubernetesSettings":
        env = os.environ
        run_env = env_json_strings("OPBOX_K8S_ENV", dict)
        propagation = env.get("OPBOX_K8S_DELETE_PROPAGATION") or cls.delete_propagation
        if propagation not in ("Background", "Foreground"):
            raise ConfigError(f"OPBOX_K8S_DELETE_PROPAGATION must be Background or Foreground, not {propagation!r}")
        template = env.get("OPBOX_NAMESPACE_TEMPLATE") or cls.namespace_template
        if "{workspace}" not in template:
            raise ConfigError(f"OPBOX_NAMESPACE_TEMPLATE must contain {{workspace}}, got {template!r}")
        account = env.get("OPBOX_RUNNER_SERVICE_ACCOUNT", cls.service_account)
        grace = None
        if env.get("OPBOX_K8S_TERMINATION_GRACE"):
            grace = env_int("OPBOX_K8S_TERMINATION_GRACE", 0)
            if grace < 0:
                raise ConfigError(f"OPBOX_K8S_TERMINATION_GRACE must be a whole number of seconds >= 0, got {grace}")
        return cls(
            kubeconfig=env.get("OPBOX_KUBECONFIG") or env.get("KUBECONFIG") or None,
            context=env.get("OPBOX_KUBE_CONTEXT") or None,
            namespace_template=template,
            create_namespaces=env.get("OPBOX_K8S_CREATE_NAMESPACES", "1") not in ("0", "false", "no"),
            service_account=account or None,
            gateway_url=env.get("OPBOX_K8S_GATEWAY_URL") or None,
            worker_url=env.get("OPBOX_K8S_WORKER_URL") or None,
            max_inflight=max(1, env_int("OPBOX_K8S_MAX_INFLIGHT", cls.max_inflight)),
            workspace_inflight=max(1, env_int("OPBOX_K8S_WORKSPACE_INFLIGHT", 0)) if
            env.get("OPBOX_K8S_WORKSPACE_INFLIGHT") else None,
            pool_workers=max(0, env_int("OPBOX_K8S_POOL_WORKERS", cls.pool_workers)),
            items_per_worker=max(1, env_int("OPBOX_K8S_ITEMS_PER_WORKER", cls.items_per_worker)),
            pending_timeout=max(1.0, env_float("OPBOX_K8S_PENDING_TIMEOUT", cls.pending_timeout)),
            image_pull_patience=max(0.0, env_float("OPBOX_K8S_IMAGE_PULL_PATIENCE", cls.image_pull_patience)),
            ttl_after_finished=env_int("OPBOX_K8S_TTL_AFTER_FINISHED", cls.ttl_after_finished),
            env=run_env,
            secrets=_csv("OPBOX_K8S_SECRETS"),
            image_pull_secrets=_csv("OPBOX_K8S_IMAGE_PULL_SECRETS"),
            image_pull_policy=env.get("OPBOX_K8S_IMAGE_PULL_POLICY") or None,
            gpu_label_key=env.get("OPBOX_K8S_GPU_LABEL_KEY") or cls.gpu_label_key,
            delete_propagation=propagation,
            watch_timeout=max(1, env_int("OPBOX_K8S_WATCH_TIMEOUT", cls.watch_timeout)),
            termination_grace=grace,
            pod_security=_pod_security(env.get("OPBOX_K8S_POD_SECURITY", cls.pod_security)),
            run_as_non_root=env.get("OPBOX_K8S_RUN_AS_NON_ROOT", "1") not in ("0", "false", "no"),
            network_policy=env.get("OPBOX_K8S_NETWORK_POLICY", "1") not in ("0", "false", "no"),
            gateway_namespace=env.get("OPBOX_SYSTEM_NAMESPACE") or cls.gateway_namespace,
            gateway_port=env_int("OPBOX_K8S_GATEWAY_PORT", cls.gateway_port),
            resource_quota=env_json_strings("OPBOX_K8S_RESOURCE_QUOTA", dict),
            limit_range=_json_object("OPBOX_K8S_LIMIT_RANGE"),
        )

    @property
    def per_workspace(self) -> int:
        return self.workspace_inflight or max(1, self.max_inflight // 2)

    def namespace(self, workspace: str) -> str:
        return render.check_dns_label(self.namespace_template.replace("{workspace}", workspace),
                                      "namespace (from OPBOX_NAMESPACE_TEMPLATE)")


def _pod_security(level: str | None) -> str | None:
    if level and level not in ("privileged", "baseline", "restricted"):
        raise ConfigError(f"OPBOX_K8S_POD_SECURITY must be privileged, baseline, restricted or empty, not {level!r}")
    return level or None


def _json_object(name: str) -> dict:
    raw = os.environ.get(name) or "{}"
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} must be a JSON object: {exc}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{name} must be a JSON object, got {raw!r}")
    return value


def api_client(settings: KubernetesSettings):
    """A kubernetes ApiClient: the kubeconfig when one is named, in-cluster config inside a pod."""
    from kubernetes import client, config

    if settings.kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        configuration = client.Configuration()
        config.load_incluster_config(client_configuration=configuration)
        return client.ApiClient(configuration)
    try:
        return config.new_client_from_config(config_file=settings.kubeconfig, context=settings.context)
    except Exception as exc:
        raise ConfigError(f"cannot load the kubeconfig {settings.kubeconfig or '~/.kube/config'}: {exc}") from exc


def api_error(exc) -> str:
    """An ``ApiException`` in one line: status, reason and the API server's message."""
    try:
        body = json.loads(exc.body or "{}")
    except (ValueError, TypeError):
        body = {}
    if not isinstance(body, dict):
        body = {}
    return f"{exc.status} {body.get('reason') or exc.reason}: {body.get('message') or ''}".strip()
