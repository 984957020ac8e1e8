"""Services (classes, ASGI apps) on a cluster: one ``serving.knative.dev/v1`` Service each.

    deploy_service  -> a Secret with the service's token, then the Service rendered by
                       ``render.render_service`` created, or replaced (resourceVersion from a
                       read) when it exists: Knative rolls out the new revision and shifts
                       traffic once it is ready
    a watch         -> the Services' ``Ready`` condition (list + watch, as for Jobs): ready when
                       Ready=True for the current generation, failed when Ready=False with a reason
    endpoints       -> ``[status.url]``: Knative routes and scales (its activator holds calls
                       while a service scaled to zero starts again)
    delete_service  -> delete the Service (its revisions and pods go with it)
    logs            -> the logs of the Service's pods (label serving.knative.dev/service), container
                       ``opbox`` only (not Knative's queue-proxy), oldest revision first, each pod's
                       read bounded by tailLines and limitBytes

The constructor's arguments travel base64-encoded in OPBOX_INIT_B64 (an env var: a Service
template has no other per-service data channel; the args envelope is small).
"""

from __future__ import annotations

import asyncio
import functools
import logging

from opbox.errors import NotFound, ServiceFailed, Unavailable

from ..base import ServiceInfo
from ..runtime_env import runtime_env
from . import render
from .config import api_error
from .watch import Watcher

log = logging.getLogger("opbox.kubernetes")

GROUP, VERSION, PLURAL = "serving.knative.dev", "v1", "services"
CONTAINER = "opbox"  # the user container's name in templates/kubernetes/knative-service.yaml.j2
LINE_GUESS = 100  # bytes a log line is assumed to take when asking for the last lines of a pod's log


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
        env = {**settings.env, **runtime_env(version, in_image=True, serve=info, init_inline=True)}
        retention = None
        if info.scale_to_zero is not None:
            retention = f"{max(0, int(info.scale_to_zero))}s"
        return render.ServiceSpec(
            namespace=namespace, workspace=info.workspace, job_id=version.job_id, version=version.version,
            image=version.artifact.image or "", gateway_url=self.backend.gateway_url,
            token_secret=token_secret, name=info.name, resource=version.resource, env=env,
            service_account=settings.service_account, secrets=settings.secrets,
            image_pull_secrets=settings.image_pull_secrets, image_pull_policy=settings.image_pull_policy,
            gpu_label_key=settings.gpu_label_key, min_scale=0 if info.scale_to_zero is not None else info.replicas,
            max_scale=max(info.replicas, 1), container_concurrency=info.concurrency,
            scale_to_zero_retention=retention,
        )

    async def deploy(self, info: ServiceInfo, wait: float) -> dict:
        from kubernetes.client.exceptions import ApiException

        backend = self.backend
        namespace = backend.settings.namespace(info.workspace)
        await backend.ensure_namespace(namespace)
        name = render.service_name(info.name)
        token_secret = f"opbox-service-{name}-token"
        spec = self._spec(info, namespace, token_secret)
        manifest = render.render_service(spec)
        secret = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                  "metadata": {"name": token_secret, "namespace": namespace, "labels": spec.labels()},
                  "stringData": {"token": backend.token_for(f"service:{info.key}")}}
        await backend.call(backend.core.create_namespaced_secret, namespace, secret, conflict_ok=True)
        entry = self.services.setdefault(info.key, {"changed": asyncio.Event()})
        entry.update(info=info, namespace=namespace, name=name, error=None)
        try:
            created = await backend.call(backend.custom.create_namespaced_custom_object, GROUP, VERSION, namespace,
                                          PLURAL, manifest)
        except ApiException as exc:
            if exc.status != 409:
                raise
            current = await backend.call(backend.custom.get_namespaced_custom_object, GROUP, VERSION, namespace,
                                          PLURAL, name)
            manifest["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            created = await backend.call(backend.custom.replace_namespaced_custom_object, GROUP, VERSION,
                                          namespace, PLURAL, name, manifest)
        entry["generation"] = created["metadata"].get("generation", 1)
        entry.setdefault("object", created)
        await self._wait(entry, lambda: self._state(entry) != "deploying", wait)
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
        items = obj if kind == "SYNC" else [obj]
        for item in items:
            meta = item["metadata"]
            for entry in self.services.values():
                if entry.get("name") == meta["name"] and entry.get("namespace") == meta.get("namespace"):
                    if kind == "DELETED":
                        entry["object"] = None
                    else:
                        entry["object"] = item
                    entry["changed"].set()
                    entry["changed"] = asyncio.Event()

    def _ready(self, entry: dict) -> tuple[str | None, dict | None]:
        obj = entry.get("object") or {}
        status = obj.get("status") or {}
        if status.get("observedGeneration", 0) < entry.get("generation", 1):
            return None, None
        for condition in status.get("conditions") or []:
            if condition.get("type") == "Ready":
                return condition.get("status"), condition
        return None, None

    def _state(self, entry: dict) -> str:
        ready, _ = self._ready(entry)
        return {"True": "ready", "False": "failed"}.get(ready or "", "deploying")

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
        state = self._state(entry)
        if state == "failed":
            _, condition = self._ready(entry)
            raise ServiceFailed(f"Knative Service {entry['namespace']}/{entry['name']} is not ready: "
                                f"{condition.get('reason')}: {condition.get('message', '')}")
        url = ((entry.get("object") or {}).get("status") or {}).get("url")
        return [url] if state == "ready" and url else []

    def status(self, key: str) -> dict:
        entry = self._entry(key)
        obj = entry.get("object") or {}
        _, condition = self._ready(entry)
        state = self._state(entry)
        info: ServiceInfo = entry["info"]
        return {"status": state, "version": info.version.version, "latest_version": info.version.version,
                "url": (obj.get("status") or {}).get("url"), "knative_service": f"{entry['namespace']}/{entry['name']}",
                "revision": (obj.get("status") or {}).get("latestReadyRevisionName"),
                "error": None if state != "failed" or condition is None else
                {"reason": condition.get("reason"), "message": condition.get("message")}}

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
        return [{"service": key, "status": self._state(e), "knative_service": f"{e['namespace']}/{e['name']}"}
                for key, e in self.services.items() if key.startswith(f"{workspace}/")]


def _pod_order(pod: dict) -> tuple:
    """Oldest revision first (Knative numbers them ``<service>-00001``, ``-00002``...), then by age."""
    meta = pod["metadata"]
    return ((meta.get("labels") or {}).get("serving.knative.dev/revision", ""),
            meta.get("creationTimestamp") or "", meta["name"])
