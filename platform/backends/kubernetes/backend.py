"""The kubernetes backend (``OPBOX_BACKEND=kubernetes``): each Job-Run attempt is a batch/v1 Job.

    submit   -> (namespace and service account of the workspace, once) a Secret with the run's
                token, then the Job rendered by ``render.render_job`` (the Secret is deleted again
                if the Job is refused); at most ``max_inflight`` Jobs exist at once, and at most
                ``per_workspace`` of one workspace; the rest wait here, a queue per workspace, and a
                free slot goes to the waiting workspace with the fewest Jobs
    the pod  -> ``python -m opbox.runtime run --run-id X``: takes its arguments from the gateway
                (which marks the run running), ships its output and posts its result there
    watches  -> Jobs and pods labelled app.kubernetes.io/managed-by=opbox, cluster-wide (list, then watch
                from its resourceVersion; relist on 410 Gone; reconnect on errors); the FailedCreate
                Events of each workspace namespace in use, namespace by namespace: a Job that failed without a result ends
                its run with the pod's reason (OOMKilled, exit code, DeadlineExceeded -> timed_out,
                ImagePullBackOff...) and the tail of the pod's log
    not starting -> a pod that cannot start fails its run with the API's words: at once for what
                will not mend (a missing Secret: CreateContainerConfigError; a PodSecurity refusal:
                the Job's FailedCreate Event, from a watch of those Events), after
                ``image_pull_patience`` for ImagePullBackOff (the kubelet retries, backing off: a
                registry's 429 passes), after ``pending_timeout`` for the rest (Unschedulable,
                a quota), saying what the scheduler or the API said last
    disruptions -> a pod evicted, preempted or on a lost node (condition DisruptionTarget, or
                reason Evicted) is run again without spending one of the user's retries
                (``RunEvents.run_disrupted``, "evicted: ..."), up to MAX_DISRUPTIONS times
    cancel   -> delete the Job (propagationPolicy from the settings); its pod gets SIGTERM and,
                after the pod's terminationGracePeriodSeconds (the platform's cancel grace, or
                OPBOX_K8S_TERMINATION_GRACE), SIGKILL

Retries belong to the platform, not to the Job: every Job has ``backoffLimit: 0`` and a failed
attempt that has retries left comes back through ``submit`` as a new Job named ``...-a<N>``.
One retry count and one exit-reason history for both application errors and crashes; a
Kubernetes pod retry could not fetch its arguments anyway (the gateway hands them out once).

All kubernetes-client calls of opbox live in this package. The client is synchronous: calls
run in threads (``asyncio.to_thread``), watches in threads of their own.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import functools
import json
import logging
import math
import signal
import time
from collections import deque
from dataclasses import dataclass

from opbox.errors import ClusterRefused, ConfigError, ValidationError

from ...settings import Settings
from ..base import (InjectsSecrets, MirrorsSecrets, RunEvents, RunTicket, ServiceInfo, ServiceLogs, Serving, VersionInfo,
                    WorkerPools, run_caller_token)
from ..pools import PoolManager, PoolMethods
from ..runtime_env import runtime_env
from . import namespaces, render
from .config import KubernetesSettings, api_client, api_error
from .knative import KnativeServices
from .watch import Watcher
from .workers import PodSpawner, pod_disruption

log = logging.getLogger("opbox.kubernetes")

MANAGED = "app.kubernetes.io/managed-by=opbox"
# waiting reasons after which a pod will not start by itself
FATAL_WAITING = {"ErrImageNeverPull", "InvalidImageName", "CreateContainerConfigError"}
PULLING = {"ImagePullBackOff", "ErrImagePull"}  # the kubelet retries these (a registry's 429 passes)
TRANSIENT = {429, 500, 502, 503, 504}  # API answers worth asking again
CALL_ATTEMPTS = 4
MAX_DISRUPTIONS = 3  # evictions of one run resubmitted without spending a retry; then it fails


@dataclass
class Attempt:
    """One attempt of a run: one Job."""

    ticket: RunTicket
    version: VersionInfo
    namespace: str
    name: str
    disruption: int = 0  # times the run's pod was disrupted before this attempt (its Job's "-d<N>")
    created_at: float | None = None  # monotonic, once the Job exists
    done: bool = False
    cancelled: bool = False
    pod: dict | None = None  # the latest state of its pod, from the pod watch
    started: bool = False  # its pod ran (phase Running or later)
    waiting: str = ""  # why its pod is not running yet, in the scheduler's or the API's words
    pulling_since: float | None = None  # monotonic, when its pod began waiting for its image
    timer: asyncio.TimerHandle | None = None  # the pending timeout

    @property
    def workspace(self) -> str:
        return self.ticket.workspace

    @property
    def run_id(self) -> str:
        return self.ticket.run_id


def describe_container_exit(terminated: dict) -> str:
    code = terminated.get("exitCode")
    if terminated.get("signal"):
        sig = terminated["signal"]
    elif isinstance(code, int) and code > 128:
        sig = code - 128
    else:
        return f"the run's container exited with code {code}"
    try:
        name = signal.Signals(sig).name
    except ValueError:
        name = f"signal {sig}"
    return f"the run's container was killed by {name} (exit code {code})"


class KubernetesBackend(PoolMethods):
    name = "kubernetes"
    # single runs are Jobs; map items go to warm pools of worker pods (workers.py)
    # workspace secrets are Kubernetes Secrets of the workspace's namespace, loaded by envFrom
    abilities = frozenset({WorkerPools, Serving, ServiceLogs, InjectsSecrets, MirrorsSecrets})

    def __init__(self, settings: KubernetesSettings, *, gateway_url: str, token_for, api=None,
                 cancel_grace: float | None = None, worker_idle: float = Settings.worker_idle,
                 pool_idle: float = Settings.pool_idle):
        self.settings = settings
        # seconds between SIGTERM and SIGKILL for a cancelled run's pod: the gateway may not delete
        # pods (no RBAC for it), so the grace is the pod's terminationGracePeriodSeconds
        if settings.termination_grace is not None:
            self.termination_grace = settings.termination_grace
        else:
            self.termination_grace = max(0, math.ceil(Settings.cancel_grace if cancel_grace is None else cancel_grace))
        self.gateway_url = settings.gateway_url or gateway_url
        self.worker_url = settings.worker_url or self.gateway_url  # pool workers: their own replica
        self.token_for = token_for
        self._api = api
        self.events: RunEvents | None = None
        self.attempts: dict[str, Attempt] = {}  # by Job name
        self.current: dict[str, str] = {}  # run id -> the Job name of its current attempt
        self.queues: dict[str, deque[Attempt]] = {}  # workspace -> attempts waiting for a slot
        self.inflight: dict[str, str] = {}  # Job name -> workspace, of the Jobs being made or existing
        self.disruptions: dict[str, int] = {}  # run id -> times its pod was disrupted
        self._namespaces: dict[str, asyncio.Future] = {}
        self._tasks: set[asyncio.Task] = set()
        self.watchers: list[Watcher] = []
        self.knative = KnativeServices(self)  # its watch starts with the first service
        self.spawner = PodSpawner(self)
        self.pools = PoolManager(self.spawner, max_workers=max(1, settings.pool_workers), worker_idle=worker_idle,
                                 pool_idle=pool_idle, max_running=settings.max_inflight,
                                 items_per_worker=settings.items_per_worker, keep_warm=0)  # a pod is not kept idle

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self, events: RunEvents) -> None:
        from kubernetes import client

        self.events = events
        self.pools.events = events
        self.loop = asyncio.get_running_loop()
        api = self._api or api_client(self.settings)
        self.batch, self.core = client.BatchV1Api(api), client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.networking = client.NetworkingV1Api(api)
        timeout = self.settings.watch_timeout
        self.watchers = [
            Watcher("jobs", self.batch.list_job_for_all_namespaces, self.threadsafe(self._on_job),
                    label_selector=MANAGED, timeout=timeout),
            Watcher("pods", self.core.list_pod_for_all_namespaces, self.threadsafe(self._on_pod),
                    label_selector=MANAGED, timeout=timeout),
        ]  # a Job's FailedCreate Events are watched per workspace namespace (ensure_namespace): Events carry
        # no labels of ours, and a cluster-wide watch would read every other team's
        for watcher in self.watchers:
            watcher.start()

    # -- services: Knative Services (knative.py) ----------------------------------------
    def _knative(self) -> KnativeServices:
        if not any(w.what == "knative-services" for w in self.watchers):
            watcher = self.knative.watcher()
            self.watchers.append(watcher)
            watcher.start()
        return self.knative

    async def deploy_service(self, service: ServiceInfo, wait: float) -> dict:
        await self.prepare(service.version)
        return await self._knative().deploy(service, wait)

    async def delete_service(self, key: str) -> None:
        await self._knative().delete(key)

    async def service_endpoints(self, key: str, wait: float) -> list[str]:
        return await self._knative().endpoints(key, wait)

    def service_status(self, key: str) -> dict:
        return self.knative.status(key)

    async def service_logs(self, key: str, limit: int) -> str:
        return await self.knative.logs(key, limit)

    def threadsafe(self, handler):
        """``handler`` made callable from a watch thread: it runs on the event loop."""

        def deliver(*args):
            self.loop.call_soon_threadsafe(self._safely, handler, *args)

        return deliver

    @staticmethod
    def _safely(handler, *args) -> None:
        try:
            handler(*args)
        except Exception:
            log.exception("handling a watch event failed")

    async def close(self) -> None:
        # the pools' workers go with the gateway, as in the other backends (their items run again
        # after a restart): their Jobs are deleted now, not by tasks about to be cancelled
        jobs = self.spawner.jobs()
        await asyncio.gather(*(self.delete_job(j.namespace, j.name) for j in jobs), return_exceptions=True)
        await self.pools.close()
        for watcher in self.watchers:
            watcher.stop()
        for task in list(self._tasks):
            task.cancel()

    async def prepare(self, version: VersionInfo) -> None:
        if not version.artifact.image:
            raise ConfigError(f"version {version.key} has no image: the kubernetes backend needs the podman builder "
                              "(OPBOX_BUILDER=podman) and a registry the cluster pulls from (OPBOX_REGISTRY)")

    def describe(self, workspace: str) -> dict:
        mine = [a for a in self.attempts.values() if a.workspace == workspace and not a.done]
        return {"backend": self.name, "jobs": {"inflight": len(self.inflight),
                                              "queued": sum(len(q) for q in self.queues.values()),
                                              "max_inflight": self.settings.max_inflight,
                                              "workspace_inflight": self.settings.per_workspace,
                                              "termination_grace": self.termination_grace,
                                              "waiting": {a.run_id: a.waiting for a in mine
                                                          if a.waiting and not a.started}},
                "pools": self.pools.describe(workspace),
                "services": self.knative.describe(workspace),
                "watches": {w.what: {"resourceVersion": w.resource_version, "relists": w.relists,
                                     "reconnects": w.reconnects} for w in self.watchers}}

    # -- runs --------------------------------------------------------------------------
    def submit(self, ticket: RunTicket, version: VersionInfo) -> None:
        if ticket.batch_id is not None and self.settings.pool_workers:  # a map item: to the version's pool
            self.pools.submit(ticket, version)
            return
        try:
            namespace = self.settings.namespace(version.workspace)
            disruption = self.disruptions.get(ticket.run_id, 0)
            name = render.job_name(ticket.run_id, ticket.attempt, disruption)
        except ValidationError as exc:
            self.loop.call_soon(self.events.run_lost, ticket.run_id, f"cannot make a Job: {exc}")
            return
        attempt = Attempt(ticket, version, namespace, name, disruption=disruption)
        self.attempts[name] = attempt
        self.current[ticket.run_id] = name
        self.queues.setdefault(ticket.workspace, deque()).append(attempt)
        self._fill()

    def _fill(self) -> None:
        """Start waiting attempts while slots are free: each to the workspace with the fewest Jobs
        among those below their share, in order within a workspace."""
        while len(self.inflight) < self.settings.max_inflight:
            counts: dict[str, int] = {}
            for workspace in self.inflight.values():
                counts[workspace] = counts.get(workspace, 0) + 1
            for workspace in [w for w, q in self.queues.items() if not q]:
                del self.queues[workspace]
            eligible = [w for w in self.queues if counts.get(w, 0) < self.settings.per_workspace]
            if not eligible:
                return
            attempt = self.queues[min(eligible, key=lambda w: counts.get(w, 0))].popleft()
            if attempt.done:
                continue
            self.inflight[attempt.name] = attempt.workspace
            attempt.timer = self.loop.call_later(self.settings.pending_timeout, self._pending_expired, attempt)
            self.spawn_task(self._create(attempt))

    def spawn_task(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _create(self, attempt: Attempt) -> None:
        from kubernetes.client.exceptions import ApiException

        version, ticket = attempt.version, attempt.ticket
        try:
            await self.ensure_namespace(attempt.namespace, attempt.workspace)
            secret_name = f"{attempt.name}-token"
            workload = self.workload(version, attempt.namespace, secret_name)
            if ticket.timeout != version.resource.timeout:  # a child run's: bounded by its parent's deadline
                workload["resource"] = dataclasses.replace(version.resource, timeout=ticket.timeout)
            spec = render.JobSpec(**workload, run_id=ticket.run_id, attempt=ticket.attempt, backoff_limit=0,
                                  disruption=attempt.disruption)
            job = render.render_job(spec)

            def ours(existing: dict) -> bool:  # a restarted gateway's run finds its Job: adopt it
                labels = existing["metadata"].get("labels") or {}
                return labels.get("opbox.dev/run") == render.label_value(ticket.run_id)

            await self.create_with_token(attempt.namespace, job, secret_name, spec.labels(),
                                         self.token_for(f"run:{ticket.run_id}"), adopt=ours,
                                         caller=run_caller_token(self.token_for, ticket.run_id))
            attempt.created_at = time.monotonic()
            if attempt.done or attempt.cancelled:  # cancelled while we were creating it
                await self._delete_job(attempt)
        except Exception as exc:
            reason = api_error(exc) if isinstance(exc, ApiException) else f"{type(exc).__name__}: {exc}"
            log.warning("could not create the Job of %s: %s", ticket.run_id, reason)
            self._finish(attempt, f"could not create the run's Job {attempt.namespace}/{attempt.name}: {reason}")

    def workload(self, version: VersionInfo, namespace: str, token_secret: str) -> dict:
        """What every pod of ``version`` has, a run's or a pool worker's (render.JobSpec, render.WorkerSpec)."""
        settings = self.settings
        return dict(namespace=namespace, workspace=version.workspace, job_id=version.job_id, version=version.version,
                    image=version.artifact.image or "", gateway_url=self.gateway_url, token_secret=token_secret,
                    resource=version.resource, service_account=settings.service_account,
                    env={**settings.env, **runtime_env(version, in_image=True)}, secrets=self.secret_refs(version),
                    image_pull_secrets=settings.image_pull_secrets, image_pull_policy=settings.image_pull_policy,
                    gpu_label_key=settings.gpu_label_key, ttl_seconds_after_finished=settings.ttl_after_finished,
                    termination_grace_period_seconds=self.termination_grace, run_as_non_root=settings.run_as_non_root)

    def secret_refs(self, version: VersionInfo) -> tuple[str, ...]:
        """The Secrets a pod of ``version`` loads whole (``envFrom``): OPBOX_K8S_SECRETS, then the
        version's workspace secrets in their order (a later one's key wins, as in the other backends)."""
        return self.settings.secrets + tuple(render.secret_object_name(name) for name in version.resource.secrets)

    # -- workspace secrets as Kubernetes Secrets (MirrorsSecrets) -------------------------
    async def put_secret(self, workspace: str, name: str, values) -> None:
        from kubernetes.client.exceptions import ApiException

        namespace, object_name = self.settings.namespace(workspace), render.secret_object_name(name)
        secret = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                  "metadata": {"name": object_name, "namespace": namespace,
                               "labels": {**namespaces.MANAGED, "opbox.dev/workspace": render.label_value(workspace),
                                          "opbox.dev/secret": render.label_value(name)}},
                  "data": {key: base64.b64encode(value.encode()).decode() for key, value in values.items()}}
        try:
            await self.ensure_namespace(namespace, workspace)
            if await self.call(self.core.create_namespaced_secret, namespace, secret, conflict_ok=True) is None:
                await self.call(self.core.replace_namespaced_secret, object_name, namespace, secret)
        except ApiException as exc:
            raise ClusterRefused(f"the cluster refused Secret {namespace}/{object_name} (secret {name!r}): "
                                 f"{api_error(exc)}", status=exc.status) from None

    async def delete_secret(self, workspace: str, name: str) -> None:
        from kubernetes.client.exceptions import ApiException

        namespace, object_name = self.settings.namespace(workspace), render.secret_object_name(name)
        try:
            await self.call(self.core.delete_namespaced_secret, object_name, namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise ClusterRefused(f"the cluster refused to delete Secret {namespace}/{object_name}: "
                                     f"{api_error(exc)}", status=exc.status) from None

    async def create_with_token(self, namespace: str, job: dict, secret_name: str, labels: dict, token: str,
                                adopt=None, caller: str | None = None) -> dict:
        """A Secret holding ``token`` (the pod's OPBOX_RUN_TOKEN) and ``caller`` (its OPBOX_TOKEN, for the SDK in
        user code: jobs calling jobs), then ``job``, then the Secret tied to
        the Job (so it is garbage-collected with it). A refused Job takes its Secret with it. On 409,
        ``adopt(existing)`` says whether the Job of that name is ours to take over."""
        from kubernetes.client.exceptions import ApiException

        secret = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                  "metadata": {"name": secret_name, "namespace": namespace, "labels": labels},
                  "stringData": {"token": token, **({"caller": caller} if caller else {})}}
        created_secret = await self.call(self.core.create_namespaced_secret, namespace, secret, conflict_ok=True)
        name = job["metadata"]["name"]
        try:
            created = await self.call(self.batch.create_namespaced_job, namespace, job)
        except ApiException as exc:
            if exc.status != 409 or adopt is None:
                if created_secret is not None:  # nothing would ever delete it
                    await self._delete_secret(namespace, secret_name)
                raise
            created = await self.call(self.batch.read_namespaced_job, name, namespace)
            if not adopt(created):
                raise
            log.info("adopting the existing Job %s/%s", namespace, name)
        if created_secret is not None:
            owned = {**secret, "metadata": {**secret["metadata"],
                                            "resourceVersion": created_secret["metadata"]["resourceVersion"],
                                            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": name,
                                                                 "uid": created["metadata"]["uid"]}]}}
            try:
                await self.call(self.core.replace_namespaced_secret, secret_name, namespace, owned)
            except ApiException as exc:  # not fatal: the Secret outlives its Job
                log.warning("could not tie Secret %s to its Job: %s", secret_name, api_error(exc))
        return created

    async def _delete_secret(self, namespace: str, name: str) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            await asyncio.to_thread(self.core.delete_namespaced_secret, name, namespace, _request_timeout=30)
        except ApiException as exc:
            if exc.status != 404:
                log.warning("could not delete Secret %s/%s: %s", namespace, name, api_error(exc))

    async def call(self, fn, *args, conflict_ok: bool = False, **kwargs):
        """A client call in a thread, its answer as a dict (None for a tolerated 409). What an API
        server says when it is overloaded or restarting (429, 5xx, a reset connection) is retried
        with backoff, a few times: a create that did happen then meets 409, which callers handle."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        delay = 0.5
        for attempt in range(CALL_ATTEMPTS):
            try:
                resp = await asyncio.to_thread(fn, *args, _preload_content=False, _request_timeout=30, **kwargs)
            except ApiException as exc:
                if conflict_ok and exc.status == 409:
                    return None
                if exc.status not in TRANSIENT or attempt == CALL_ATTEMPTS - 1:
                    raise
            except HTTPError:
                if attempt == CALL_ATTEMPTS - 1:
                    raise
            else:
                return json.loads(resp.data) if resp.data else {}
            await asyncio.sleep(delay)
            delay *= 2

    async def ensure_namespace(self, namespace: str, workspace: str) -> None:
        """The workspace's namespace made (once), and its Jobs' FailedCreate Events watched from then on."""
        fut = self._namespaces.get(namespace)
        if fut is None or (fut.done() and fut.exception() is not None):
            fut = self._namespaces[namespace] = asyncio.ensure_future(self._make_namespace(namespace, workspace))
        await asyncio.shield(fut)
        if not any(w.what == f"job-events/{namespace}" for w in self.watchers):
            watcher = Watcher(f"job-events/{namespace}", functools.partial(self.core.list_namespaced_event, namespace),
                              self.threadsafe(self._on_event), field_selector="involvedObject.kind=Job,reason=FailedCreate",
                              timeout=self.settings.watch_timeout)
            self.watchers.append(watcher)
            watcher.start()

    async def _make_namespace(self, namespace: str, workspace: str) -> None:
        if not self.settings.create_namespaces:
            return
        settings = self.settings
        await self.call(self.core.create_namespace, namespaces.namespace_manifest(namespace, workspace, settings),
                        conflict_ok=True)
        if settings.service_account:
            await self.call(self.core.create_namespaced_service_account, namespace, {
                "apiVersion": "v1", "kind": "ServiceAccount", "automountServiceAccountToken": False,
                "metadata": {"name": settings.service_account, "namespace": namespace, "labels": namespaces.MANAGED}},
                conflict_ok=True)
        if settings.network_policy:
            await self.call(self.networking.create_namespaced_network_policy, namespace,
                            namespaces.egress_policy(namespace, settings), conflict_ok=True)
        for manifest in namespaces.quota_manifests(namespace, settings):
            create = (self.core.create_namespaced_resource_quota if manifest["kind"] == "ResourceQuota"
                      else self.core.create_namespaced_limit_range)
            await self.call(create, namespace, manifest, conflict_ok=True)

    async def cancel(self, run_id: str, grace: float) -> None:
        await self.pools.cancel(run_id, grace)  # a leased map item (queued ones are skipped when leased)
        name = self.current.get(run_id)
        attempt = self.attempts.get(name) if name else None
        if attempt is None or attempt.done:
            return
        attempt.cancelled = True
        if attempt.created_at is not None:
            await self._delete_job(attempt)
        self._finish(attempt, None)

    async def _delete_job(self, attempt: Attempt) -> None:
        await self.delete_job(attempt.namespace, attempt.name)

    async def delete_job(self, namespace: str, name: str) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            await asyncio.to_thread(self.batch.delete_namespaced_job, name, namespace,
                                    propagation_policy=self.settings.delete_propagation, _request_timeout=30)
        except ApiException as exc:
            if exc.status != 404:
                log.warning("could not delete Job %s/%s: %s", namespace, name, api_error(exc))

    async def delete_pod(self, namespace: str, name: str) -> None:
        """A pool worker's pod (its index of the pool's Job), with the platform's grace (SIGTERM, then SIGKILL)."""
        from kubernetes.client.exceptions import ApiException

        try:
            await asyncio.to_thread(self.core.delete_namespaced_pod, name, namespace,
                                    grace_period_seconds=self.termination_grace, _request_timeout=30)
        except ApiException as exc:
            if exc.status != 404:
                log.warning("could not delete pod %s/%s: %s", namespace, name, api_error(exc))

    def _finish(self, attempt: Attempt, reason: str | None, status: str = "failed") -> None:
        """The attempt is over: free its slot and, when it is the run's current attempt and
        ``reason`` is given, tell the platform (ignored if the run already has its result)."""
        if attempt.done:
            return
        attempt.done = True
        if attempt.timer is not None:
            attempt.timer.cancel()
        self.inflight.pop(attempt.name, None)
        self.attempts.pop(attempt.name, None)
        current = self.current.get(attempt.run_id) == attempt.name
        if current:
            self.current.pop(attempt.run_id, None)
            if status != "disrupted":
                self.disruptions.pop(attempt.run_id, None)
        if reason is not None and current and not attempt.cancelled:
            if status == "disrupted":
                self.events.run_disrupted(attempt.run_id, reason)
            else:
                self.events.run_lost(attempt.run_id, reason, status)
        self._fill()

    def _pending_expired(self, attempt: Attempt) -> None:
        if attempt.done or attempt.started:
            return
        self.spawn_task(self._expire(attempt))

    async def _expire(self, attempt: Attempt) -> None:
        if not attempt.waiting and attempt.created_at is not None:  # the Events' watch may lag: ask once
            try:
                listed = await self.call(self.core.list_namespaced_event, attempt.namespace,
                                         field_selector=f"involvedObject.name={attempt.name},reason=FailedCreate")
                for event in (listed.get("items") or [])[-1:]:
                    attempt.waiting = f"the Job cannot make its pod: {event.get('message', '')}"
            except Exception as exc:
                log.info("could not read the Events of Job %s: %s", attempt.name, exc)
        if attempt.done or attempt.started:
            return
        self.spawn_task(self._delete_job(attempt))
        self._finish(attempt, f"the run's pod did not start within {self.settings.pending_timeout:g} s "
                              f"(OPBOX_K8S_PENDING_TIMEOUT): {attempt.waiting or 'no pod was made'}")

    # -- watch events ------------------------------------------------------------------
    def _on_job(self, kind: str, obj, started: float | None = None) -> None:
        if kind == "SYNC":  # obj: the (namespace, name) of every Job listed, each delivered already
            self.spawner.resync(obj, started)
            for attempt in list(self.attempts.values()):
                if (attempt.created_at is not None and attempt.created_at < started
                        and (attempt.namespace, attempt.name) not in obj and not attempt.done):
                    self._finish(attempt, f"the run's Job {attempt.namespace}/{attempt.name} disappeared")
            return
        if self.spawner.on_job(kind, obj):
            return
        attempt = self.attempts.get(obj["metadata"]["name"])
        if attempt is None or attempt.done or obj["metadata"].get("namespace") != attempt.namespace:
            return
        if kind == "DELETED":
            self._finish(attempt, f"the run's Job {attempt.namespace}/{attempt.name} was deleted")
            return
        for condition in (obj.get("status") or {}).get("conditions") or []:
            if condition.get("status") != "True":
                continue
            if condition.get("type") == "Complete":
                self._finish(attempt, "the run's pod ended without reporting a result")
                return
            if condition.get("type") == "Failed":
                if condition.get("reason") == "DeadlineExceeded":
                    timeout = attempt.ticket.timeout or attempt.version.resource.timeout
                    self._finish(attempt, f"timed out after {timeout:g} s (the Job's activeDeadlineSeconds passed)",
                                 "timed_out")
                else:
                    self.spawn_task(self._explain_failure(attempt, condition))
                return

    def _on_pod(self, kind: str, obj, started: float | None = None) -> None:
        if kind == "SYNC":  # each listed pod came as MODIFIED already
            return
        worker = self.spawner.on_pod(kind, obj)
        if worker is not None:
            why = _cannot_start(obj) if kind != "DELETED" and not worker.ended.done() else None
            if why:
                why += secret_hint(why, worker.worker.pool.version)
                self.spawner.fail(worker, why)
            return
        labels = obj["metadata"].get("labels") or {}
        attempt = self.attempts.get(labels.get("batch.kubernetes.io/job-name") or labels.get("job-name") or "")
        if attempt is None or attempt.done or kind == "DELETED":
            return
        attempt.pod = obj
        status, name = obj.get("status") or {}, obj["metadata"]["name"]
        if status.get("phase") in ("Running", "Succeeded", "Failed"):
            attempt.started = True
        for condition in status.get("conditions") or []:
            if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
                attempt.waiting = f"pod {name} is {condition.get('reason')}: {condition.get('message', '')}"
        for container in status.get("containerStatuses") or []:
            waiting = (container.get("state") or {}).get("waiting") or {}
            why = waiting.get("reason")
            if why not in FATAL_WAITING and why not in PULLING:
                continue
            attempt.waiting = f"pod {name} cannot start: {why}" + (f": {waiting['message']}" if waiting.get("message") else "")
            attempt.waiting += secret_hint(waiting.get("message") or "", attempt.version)
            if why in PULLING:
                now = time.monotonic()
                attempt.pulling_since = attempt.pulling_since or now
                if now - attempt.pulling_since < self.settings.image_pull_patience:
                    continue
                attempt.waiting += f" (still after {self.settings.image_pull_patience:g} s of retries)"
            self.spawn_task(self._delete_job(attempt))
            self._finish(attempt, attempt.waiting)
            return
        if attempt.started:
            attempt.waiting, attempt.pulling_since = "", None

    def _on_event(self, kind: str, obj, started: float | None = None) -> None:
        """A Job's FailedCreate Event: its pod was refused (PodSecurity, a quota, a webhook, a missing
        ServiceAccount). PodSecurity will not change its mind: the run fails at once; the rest wait
        for the pending timeout, with the API's message."""
        if kind in ("SYNC", "DELETED"):
            return
        involved = obj.get("involvedObject") or {}
        attempt = self.attempts.get(involved.get("name") or "")
        if attempt is None or attempt.done or attempt.started or involved.get("namespace") != attempt.namespace:
            return
        attempt.waiting = f"the Job cannot make its pod: {obj.get('message', '')}"
        if "violates PodSecurity" in (obj.get("message") or ""):
            self.spawn_task(self._delete_job(attempt))
            self._finish(attempt, attempt.waiting)

    async def _explain_failure(self, attempt: Attempt, condition: dict) -> None:
        """The Job failed: say why, from its pod (termination reason, exit code, log tail)."""
        pod = attempt.pod
        try:
            pods = await self.call(self.core.list_namespaced_pod, attempt.namespace,
                                    label_selector=f"job-name={attempt.name}")
            mine = pods.get("items") or []
            if mine:
                pod = max(mine, key=lambda p: p["metadata"].get("creationTimestamp") or "")
        except Exception as exc:
            log.warning("could not read the pods of Job %s: %s", attempt.name, exc)
        if attempt.done:  # another watch event explained it meanwhile
            return
        disruption = pod_disruption(pod) if pod is not None else None
        if disruption is not None:
            count = attempt.disruption + 1
            if count <= MAX_DISRUPTIONS:
                self.disruptions[attempt.run_id] = count
                self._finish(attempt, f"evicted: {disruption}; run again, not counted as a retry", "disrupted")
            else:
                self._finish(attempt, f"evicted: {disruption} ({count} times in a row: not run again)")
            return
        parts = []
        if pod is not None:
            parts.append(self._pod_reason(attempt, pod))
            tail = await self.log_tail(attempt.namespace, pod["metadata"]["name"])
            if tail.strip():
                parts.append(f"its log ends with:\n{tail.rstrip()}")
        else:
            parts.append(f"the run's Job failed: {condition.get('reason')}: {condition.get('message', '')}")
        self._finish(attempt, "; ".join(parts))

    def _pod_reason(self, attempt: Attempt, pod: dict) -> str:
        status = pod.get("status") or {}
        for container in status.get("containerStatuses") or []:
            terminated = (container.get("state") or {}).get("terminated")
            if terminated:
                if terminated.get("reason") == "OOMKilled":
                    return (f"OOMKilled: the run's container passed its memory limit "
                            f"{attempt.version.resource.memory} (pod {pod['metadata']['name']})")
                return f"{describe_container_exit(terminated)} (pod {pod['metadata']['name']})"
        if status.get("reason"):
            return f"pod {pod['metadata']['name']} failed: {status['reason']}: {status.get('message', '')}"
        return f"pod {pod['metadata']['name']} failed (phase {status.get('phase')})"

    async def log_tail(self, namespace: str, pod: str) -> str:
        try:
            resp = await asyncio.to_thread(self.core.read_namespaced_pod_log, pod, namespace,
                                           tail_lines=self.settings.log_tail_lines, _preload_content=False,
                                           _request_timeout=10)
            return resp.data.decode(errors="replace")[-4000:]
        except Exception as exc:
            log.info("no log for pod %s/%s: %s", namespace, pod, exc)
            return ""


def secret_hint(message: str, version: VersionInfo) -> str:
    """For a kubelet's 'secret "opbox-secret-x" not found': which workspace secret that is, and what to do."""
    for name in version.resource.secrets:
        if f'secret "{render.secret_object_name(name)}" not found' in message:
            return (f" (the workspace secret {name!r} is not in the cluster: set it again with "
                    f"`opbox secrets set {name} KEY=VALUE`)")
    return ""


def _cannot_start(pod: dict) -> str | None:
    """Why a pool worker's pod will not start by itself (its runs are not leased yet: no patience)."""
    status = pod.get("status") or {}
    for container in status.get("containerStatuses") or []:
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in FATAL_WAITING or waiting.get("reason") == "ImagePullBackOff":
            return f"pod {pod['metadata']['name']} cannot start: {waiting['reason']}: {waiting.get('message', '')}"
    return None


def create(settings: Settings, token_for, gateway_url: str) -> KubernetesBackend:
    """The registry's factory (``OPBOX_BACKEND=kubernetes``): its own settings are read here, once."""
    return KubernetesBackend(KubernetesSettings.from_env(), gateway_url=gateway_url, token_for=token_for,
                             cancel_grace=settings.cancel_grace, worker_idle=settings.worker_idle,
                             pool_idle=settings.pool_idle)
