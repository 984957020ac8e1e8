"""Services (classes, ASGI apps) on a cluster: one ``serving.knative.dev/v1`` Service each.

    deploy_service  -> refused at once when Knative's webhook would refuse it (concurrency above
                       1000, scale_to_zero above 1 h); a Secret with the service's token, then the
                       Service rendered by ``render.render_service`` created, or when it exists
                       merge-patched (patch.py; a PUT would drop the creator annotation Knative's
                       webhook guards): Knative rolls out the new revision and shifts traffic once
                       it is ready. A refusal is a ``ClusterRefused`` with the API's message.
    a watch         -> the Services' status (list + watch, as for Jobs), read as two things:
                       serving (RoutesReady=True with a ready revision: calls go to it) and the
                       rollout of the current generation (Ready Unknown: in progress, True: done,
                       False: failed while the previous revision goes on serving)
    endpoints       -> ``[status.url]`` whenever a ready revision serves: Knative routes and scales
                       (its activator holds calls while a service scaled to zero starts again)
    delete_service  -> delete the Service (its revisions and pods go with it)
    logs            -> the logs of the Service's pods (label serving.knative.dev/service), container
                       ``opbox`` only (not Knative's queue-proxy), oldest revision first, each pod's
                       read bounded by tailLines and limitBytes

The constructor's arguments are fetched by each replica from the gateway
(``OPBOX_INIT_URL``, with the service's token, checked against ``OPBOX_INIT_SHA256``): an env var
cannot carry them (Linux caps one at 128 KiB, E2BIG), nor etcd beyond ~1.5 MB, and opbox allows
64 MiB. The digest is in the pod template, so new arguments make a new revision.
"""

from __future__ import annotations

import asyncio
import functools
import logging

from opbox.errors import ClusterRefused, NotFound, ServiceFailed, Unavailable, ValidationError

from ..base import ServiceInfo, service_caller_token
from ..runtime_env import runtime_env
from . import render
from .config import api_error
from .patch import redeploy_patch
from .watch import Watcher

log = logging.getLogger("opbox.kubernetes")

GROUP, VERSION, PLURAL = "serving.knative.dev", "v1", "services"
CONTAINER = "opbox"  # the user container's name in templates/kubernetes/knative-service.yaml.j2
LINE_GUESS = 100  # bytes a log line is assumed to take when asking for the last lines of a pod's log
# What Knative's validating webhook allows (knative/serving pkg/apis/config/defaults.go
# DefaultMaxRevisionContainerConcurrency; pkg/apis/autoscaling/register.go WindowMax, which bounds
# scale-to-zero-pod-retention-period in annotation_validation.go validateLastPodRetention)
MAX_CONCURRENCY = 1000
MAX_SCALE_TO_ZERO = 3600.0


def check_limits(info: ServiceInfo) -> None:
    """``ValidationError`` for what Knative would refuse, said in opbox's terms."""
    if info.concurrency > MAX_CONCURRENCY:
        raise ValidationError(f"concurrency {info.concurrency} is more than Knative allows: at most {MAX_CONCURRENCY} "
                              "calls at once per replica (its containerConcurrency) on the kubernetes backend")
    if info.scale_to_zero is not None and info.scale_to_zero > MAX_SCALE_TO_ZERO:
        raise ValidationError(f"scale_to_zero {info.scale_to_zero:g} s is more than Knative allows: at most "
                              f"{MAX_SCALE_TO_ZERO:g} s (1 h, its scale-to-zero-pod-retention-period) on the "
                              "kubernetes backend")


def init_path(info: ServiceInfo) -> str:
    """Where a replica fetches the constructor's arguments (gateway/routes_serve.py service_init)."""
    return f"/_internal/services/{info.workspace}/{info.name}/init"


class KnativeServices:
    def __init__(self, backend):
        self.backend = backend  # KubernetesBackend: settings, call, ensure_namespace, threadsafe, token_for
        self.services: dict[str, dict] = {}  # key -> {"info", "namespace", "name", "object", "changed"}

    def watcher(self) -> Watcher:
        custom = self.backend.custom
        list_fn = functools.partial(custom.list_cluster_custom_object, GROUP, VERSION, PLURAL)
        return Watcher("knative-services", list_fn, self.backend.threadsafe(self._on_service),
                       label_selector="app.kubernetes.io/managed-by=opbox", timeout=self.backend.settings.watch_timeout)

    def _entry(self, key: str) -> dict:
        entry = self.services.get(key)
        if entry is None:
            raise NotFound(f"no service {key}")
        return entry

    def _spec(self, info: ServiceInfo, namespace: str, token_secret: str) -> render.ServiceSpec:
        version, settings = info.version, self.backend.settings
        init_url = self.backend.gateway_url.rstrip("/") + init_path(info)
        env = {**settings.env, **runtime_env(version, in_image=True, serve=info, init_url=init_url)}
        retention = None
        if info.scale_to_zero is not None:
            retention = f"{max(0, int(info.scale_to_zero))}s"
        return render.ServiceSpec(
            namespace=namespace, workspace=info.workspace, job_id=version.job_id, version=version.version,
            image=version.artifact.image or "", gateway_url=self.backend.gateway_url,
            token_secret=token_secret, name=info.name, resource=version.resource, env=env,
            service_account=settings.service_account, secrets=self.backend.secret_refs(version),
            image_pull_secrets=settings.image_pull_secrets, image_pull_policy=settings.image_pull_policy,
            gpu_label_key=settings.gpu_label_key, min_scale=0 if info.scale_to_zero is not None else info.replicas,
            max_scale=max(info.replicas, 1), container_concurrency=info.concurrency,
            scale_to_zero_retention=retention, run_as_non_root=settings.run_as_non_root,
        )

    async def deploy(self, info: ServiceInfo, wait: float) -> dict:
        from kubernetes.client.exceptions import ApiException

        check_limits(info)
        backend = self.backend
        namespace = backend.settings.namespace(info.workspace)
        await backend.ensure_namespace(namespace, info.workspace)
        name = render.service_name(info.name)
        token_secret = f"opbox-service-{name}-token"
        spec = self._spec(info, namespace, token_secret)
        manifest = render.render_service(spec)
        secret = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                  "metadata": {"name": token_secret, "namespace": namespace, "labels": spec.labels()},
                  "stringData": {"token": backend.token_for(f"service:{info.key}"),
                                 "caller": service_caller_token(backend.token_for, info.key)}}
        previous = (self.services.get(info.key) or {}).get("info")
        entry = self.services.setdefault(info.key, {"changed": asyncio.Event()})
        entry.update(info=info, namespace=namespace, name=name, error=None)
        try:
            await backend.call(backend.core.create_namespaced_secret, namespace, secret, conflict_ok=True)
            try:
                created = await backend.call(backend.custom.create_namespaced_custom_object, GROUP, VERSION,
                                              namespace, PLURAL, manifest)
            except ApiException as exc:
                if exc.status != 409:
                    raise
                current = await backend.call(backend.custom.get_namespaced_custom_object, GROUP, VERSION,
                                              namespace, PLURAL, name)
                created = await backend.call(backend.custom.patch_namespaced_custom_object, GROUP, VERSION,
                                              namespace, PLURAL, name, redeploy_patch(current, manifest))
        except ApiException as exc:  # nothing changed: the service is as it was (or unknown)
            if previous is None:
                self.services.pop(info.key, None)
            else:
                entry["info"] = previous
            raise ClusterRefused(f"the cluster refused Knative Service {namespace}/{name}: {api_error(exc)}",
                                 status=exc.status) from None
        entry["generation"] = created["metadata"].get("generation", 1)
        entry.setdefault("object", created)
        await self._wait(entry, lambda: self._rollout(entry)[0] != "in_progress", wait)
        state, condition = self._rollout(entry)
        if state == "failed":
            raise ServiceFailed(f"Knative Service {namespace}/{name} could not roll out version "
                                f"{info.version.version}: {_why(condition)}"
                                + ("; the previous revision goes on serving" if self._serving(entry) else ""),
                                cause={"reason": condition.get("reason"), "message": condition.get("message")})
        return self.status(info.key)

    async def _wait(self, entry: dict, done, wait: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while not done() and loop.time() < deadline:
            event = entry["changed"]
            try:
                await asyncio.wait_for(event.wait(), deadline - loop.time())
            except asyncio.TimeoutError:
                return

    def _on_service(self, kind: str, obj, started: float | None = None) -> None:
        if kind == "SYNC":  # every object listed came as MODIFIED already
            return
        meta = obj["metadata"]
        for entry in self.services.values():
            if entry.get("name") == meta["name"] and entry.get("namespace") == meta.get("namespace"):
                entry["object"] = None if kind == "DELETED" else obj
                if self._rollout(entry)[0] == "complete":
                    entry["serving"] = entry["info"]  # the version calls reach, until a rollout completes
                entry["changed"].set()
                entry["changed"] = asyncio.Event()

    @staticmethod
    def _conditions(entry: dict) -> dict[str, dict]:
        status = (entry.get("object") or {}).get("status") or {}
        return {c.get("type"): c for c in status.get("conditions") or []}

    def _serving(self, entry: dict) -> str | None:
        """The URL calls go to, when a ready revision serves (RoutesReady=True): during a rollout and
        after a failed one that is the previous revision (Knative's service_lifecycle.go)."""
        status = (entry.get("object") or {}).get("status") or {}
        routes = self._conditions(entry).get("RoutesReady") or {}
        if routes.get("status") == "True" and status.get("latestReadyRevisionName") and status.get("url"):
            return status["url"]
        return None

    def _rollout(self, entry: dict) -> tuple[str, dict]:
        """The rollout of the generation opbox last wrote: in_progress, complete or failed (with the
        Ready condition that says why)."""
        status = (entry.get("object") or {}).get("status") or {}
        if status.get("observedGeneration", 0) < entry.get("generation", 1):
            return "in_progress", {}
        ready = self._conditions(entry).get("Ready") or {}
        return {"True": "complete", "False": "failed"}.get(ready.get("status"), "in_progress"), ready

    def _state(self, entry: dict) -> str:
        if self._serving(entry):
            return "ready"
        return "failed" if self._rollout(entry)[0] == "failed" else "deploying"

    async def delete(self, key: str) -> None:
        from kubernetes.client.exceptions import ApiException

        entry = self.services.pop(key, None)
        if entry is None:
            return
        backend = self.backend
        for fn, args in ((backend.custom.delete_namespaced_custom_object,
                          (GROUP, VERSION, entry["namespace"], PLURAL, entry["name"])),
                         (backend.core.delete_namespaced_secret,
                          (f"opbox-service-{entry['name']}-token", entry["namespace"]))):
            try:
                await asyncio.to_thread(fn, *args, _request_timeout=30)
            except ApiException as exc:
                if exc.status != 404:
                    raise

    async def endpoints(self, key: str, wait: float) -> list[str]:
        entry = self._entry(key)
        await self._wait(entry, lambda: self._state(entry) != "deploying", wait)
        url = self._serving(entry)
        if url:  # with the service's token as userinfo: the proxy sends it, the replica checks it
            token = self.backend.token_for(f"service:{key}")
            return [url.replace("://", f"://opbox:{token}@", 1)]
        state, condition = self._rollout(entry)
        if state == "failed":
            raise ServiceFailed(f"Knative Service {entry['namespace']}/{entry['name']} is not ready: {_why(condition)}")
        return []

    def status(self, key: str) -> dict:
        entry = self._entry(key)
        status = (entry.get("object") or {}).get("status") or {}
        state = self._state(entry)
        rollout, condition = self._rollout(entry)
        info: ServiceInfo = entry["info"]
        error = {"reason": condition.get("reason"), "message": condition.get("message")} if rollout == "failed" else None
        serving: ServiceInfo = entry.get("serving") or info
        return {"status": state, "version": serving.version.version, "latest_version": info.version.version,
                "url": status.get("url"), "knative_service": f"{entry['namespace']}/{entry['name']}",
                "revision": status.get("latestReadyRevisionName"),
                "rollout": {"state": rollout, "revision": status.get("latestCreatedRevisionName"), "error": error},
                "error": error if state == "failed" else None}

    async def logs(self, key: str, limit: int) -> str:
        """What the Service's pods printed: the user container's log of each pod (Knative's
        queue-proxy left out), a header line a pod, oldest revision first, at most ``limit`` bytes
        in all (each pod's share read with tailLines and limitBytes, never the whole log)."""
        from kubernetes.client.exceptions import ApiException

        entry = self.services.get(key)
        if entry is not None:
            namespace, name = entry["namespace"], entry["name"]
        else:  # not deployed by this gateway process (e.g. after a restart): the names are derived
            workspace, _, service = key.partition("/")
            namespace, name = self.backend.settings.namespace(workspace), render.service_name(service)
        selector = f"serving.knative.dev/service={name}"
        try:
            listed = await self.backend.call(self.backend.core.list_namespaced_pod, namespace,
                                              label_selector=selector)
        except ApiException as exc:
            raise Unavailable(f"cannot list the pods of Knative Service {namespace}/{name}: {api_error(exc)}") from None
        except Exception as exc:  # the API server is unreachable
            raise Unavailable(f"cannot list the pods of Knative Service {namespace}/{name}: "
                              f"{type(exc).__name__}: {exc}") from None
        pods = sorted(listed.get("items") or [], key=_pod_order)
        if not pods:
            return ""
        share = max(1024, limit // len(pods))
        parts = []
        for pod in pods:
            meta = pod["metadata"]
            text = await self._pod_log(namespace, meta["name"], share)
            if text is None:  # gone between the list and the read
                continue
            revision = (meta.get("labels") or {}).get("serving.knative.dev/revision", "?")
            phase = (pod.get("status") or {}).get("phase", "Unknown")
            parts.append(f"==> pod {meta['name']} (revision {revision}, {phase}) <==\n{text}")
        return "\n".join(parts)[-limit:]

    async def _pod_log(self, namespace: str, pod: str, limit: int) -> str | None:
        """The end of one pod's user-container log, at most ``limit`` bytes; None if the pod is gone.

        The API has no "last N bytes": ask for the last lines (tailLines) and cap the answer
        (limitBytes, which keeps the start); when the cap cut it, the lines were long: ask for
        fewer, so what comes back is the newest output."""
        from kubernetes.client.exceptions import ApiException

        core = self.backend.core
        lines = max(10, limit // LINE_GUESS)
        for _ in range(4):
            try:
                resp = await asyncio.to_thread(core.read_namespaced_pod_log, pod, namespace, container=CONTAINER,
                                               tail_lines=lines, limit_bytes=limit, _preload_content=False,
                                               _request_timeout=30)
            except ApiException as exc:
                if exc.status == 404:
                    return None
                # e.g. 400 while the container is still being created
                return f"[opbox: cannot read the log of pod {pod}: {api_error(exc)}]\n"
            except Exception as exc:  # the API server is unreachable
                return f"[opbox: cannot read the log of pod {pod}: {type(exc).__name__}: {exc}]\n"
            data = resp.data[:limit]
            if len(data) < limit or lines == 1:
                break
            lines = max(1, lines // 4)  # the cap cut the newest lines off: ask for fewer
        return data.decode(errors="replace")

    def describe(self, workspace: str) -> list[dict]:
        return [{"service": key, "status": self._state(e), "rollout": self._rollout(e)[0],
                 "knative_service": f"{e['namespace']}/{e['name']}"}
                for key, e in self.services.items() if key.startswith(f"{workspace}/")]


def _why(condition: dict) -> str:
    return f"{condition.get('reason')}: {condition.get('message', '')}"


def _pod_order(pod: dict) -> tuple:
    """Oldest revision first (Knative numbers them ``<service>-00001``, ``-00002``...), then by age."""
    meta = pod["metadata"]
    return ((meta.get("labels") or {}).get("serving.knative.dev/revision", ""),
            meta.get("creationTimestamp") or "", meta["name"])
