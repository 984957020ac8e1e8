"""Map items on a cluster: warm pool workers as pods, the local backend's ``PoolManager`` above them.

A Job per map item costs about 20 etcd writes and seconds of pod start each; a stock control
plane manages about 5 Jobs a second. So the items of a map go to the version's pool instead,
whose workers are pods running ``python -m opbox.runtime worker``: each pulls items from the
gateway (leases, per-item retries and results stay there) until the pool lets it go. The pool
starts a worker per ``items_per_worker`` queued items, up to ``max_workers`` (and the workspace's
share), and lets them go as the queue drains: Kubernetes sees O(workers) objects, not O(items).

    spawn(worker) -> a Secret with the worker's own token, then a Job of one pod (render.WorkerSpec),
                     the Secret owned by the Job; the handle's ``wait()`` ends when the Job ends
                     (complete, failed, deleted), with the container's exit code
    signal        -> a pod cannot be signalled from here: any signal deletes the worker's Job (its pod
                     gets SIGTERM, then SIGKILL after its grace); cancel thus ends the worker with its run
    a disruption  -> the pod was evicted or its node lost (DisruptionTarget): the worker's item goes back
                     to the queue without spending a retry (``PoolManager.worker_disrupted``)

One Job per worker rather than one Job with ``parallelism: P``: each worker has its own token (as in
the other backends, a worker can take or end only its own runs) and its own lifetime (the pool
scales down one worker at a time). The cost stays O(P): a Job, a Secret and a pod per worker.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import signal
import time

from ..base import worker_caller_token
from ..pools import Worker
from . import render

log = logging.getLogger("opbox.kubernetes")


class PodWorker:
    """The ``WorkerHandle`` of a worker pod: its Job, and how it ended."""

    pid = 0  # no local process

    def __init__(self, worker: Worker, namespace: str, name: str):
        self.worker, self.namespace, self.name = worker, namespace, name
        self.ended: asyncio.Future = asyncio.get_running_loop().create_future()
        self.tail = ""
        self.pod: dict | None = None  # its pod's latest state, from the pod watch
        self.created_at: float | None = None  # monotonic, once its Job exists

    async def wait(self) -> int:
        return await self.ended

    def output_tail(self, size: int = 4000) -> str:
        return self.tail[-size:]

    def end(self, returncode: int) -> None:
        if not self.ended.done():
            self.ended.set_result(returncode)


class PodSpawner:
    """``Spawner`` for the PoolManager of a ``KubernetesBackend`` (``backend``: settings, calls, watches)."""

    def __init__(self, backend):
        self.backend = backend
        self.by_job: dict[str, PodWorker] = {}  # Job name -> its worker's handle

    async def spawn(self, worker: Worker) -> PodWorker:
        backend, version = self.backend, worker.pool.version
        namespace = backend.settings.namespace(version.workspace)
        await backend.ensure_namespace(namespace)
        nonce = secrets.token_hex(3)
        secret_name = f"opbox-worker-{nonce}-{worker.id}-token".lower()
        spec = render.WorkerSpec(**backend.workload(version, namespace, secret_name), pool_id=worker.pool.id,
                                 worker_id=worker.id, nonce=nonce)
        handle = PodWorker(worker, namespace, spec.name)
        self.by_job[spec.name] = handle
        try:
            await backend.create_with_token(namespace, render.render_worker(spec), secret_name, spec.labels(),
                                            worker.token,
                                            caller=worker_caller_token(worker.pool.id, worker.id, worker.token))
        except Exception:
            self.by_job.pop(spec.name, None)
            raise
        handle.created_at = time.monotonic()
        return handle

    def signal(self, worker: Worker, signum: int) -> None:
        handle = worker.handle
        if isinstance(handle, PodWorker) and not handle.ended.done():
            self.backend.spawn_task(self.backend.delete_job(handle.namespace, handle.name))
            if signum == signal.SIGKILL:
                handle.end(-signal.SIGKILL)

    # -- from the backend's watches -------------------------------------------------------
    def on_pod(self, pod: dict) -> PodWorker | None:
        """A pod event: the handle of the worker it belongs to, if any."""
        labels = pod["metadata"].get("labels") or {}
        handle = self.by_job.get(labels.get("batch.kubernetes.io/job-name") or labels.get("job-name") or "")
        if handle is not None:
            handle.pod = pod
        return handle

    def fail(self, handle: PodWorker, reason: str) -> None:
        """The worker's pod will not start (say, its image cannot be pulled): it ends with ``reason``
        as its output, and the pool counts a failed start (three in a row fail what waits)."""
        self.by_job.pop(handle.name, None)
        handle.tail = reason
        self.backend.spawn_task(self.backend.delete_job(handle.namespace, handle.name))
        handle.end(1)

    def on_job(self, kind: str, job: dict) -> bool:
        """A Job event: True when it was a worker's. A finished or deleted Job ends its handle."""
        handle = self.by_job.get(job["metadata"]["name"])
        if handle is None:
            return False
        conditions = {c.get("type") for c in (job.get("status") or {}).get("conditions") or []
                      if c.get("status") == "True"}
        if kind == "DELETED" or conditions & {"Complete", "Failed"}:
            self.by_job.pop(job["metadata"]["name"], None)
            self.backend.spawn_task(self._ended(handle, kind == "DELETED"))
        return True

    async def _ended(self, handle: PodWorker, deleted: bool) -> None:
        pod = handle.pod or {}
        disruption = pod_disruption(pod) if pod else None
        if disruption is not None:
            self.backend.pools.worker_disrupted(handle.worker, f"evicted: {disruption}; its item runs again, "
                                                               "not counted as a retry")
        code = 0 if not deleted else -signal.SIGKILL
        for status in (pod.get("status") or {}).get("containerStatuses") or []:
            terminated = (status.get("state") or {}).get("terminated")
            if terminated:
                code = terminated.get("exitCode", code)
        if code and pod:
            handle.tail = await self.backend.log_tail(handle.namespace, pod["metadata"]["name"])
        handle.end(code)

    def resync(self, present: set, started: float) -> None:
        """After a relist begun at ``started``: a worker whose Job existed before and is gone ended unseen."""
        for name, handle in list(self.by_job.items()):
            if handle.created_at is not None and handle.created_at < started and (handle.namespace, name) not in present:
                self.by_job.pop(name, None)
                handle.end(-signal.SIGKILL)


def pod_disruption(pod: dict) -> str | None:
    """Why ``pod`` was disrupted (evicted, preempted, its node lost), or None. Kubernetes >= 1.26 says
    so with the DisruptionTarget condition; a kubelet's eviction also sets reason Evicted."""
    status = pod.get("status") or {}
    for condition in status.get("conditions") or []:
        if condition.get("type") == "DisruptionTarget" and condition.get("status") == "True":
            message = status.get("message") or condition.get("message") or ""
            return f"{message} ({condition.get('reason')}, pod {pod['metadata']['name']})"
    if status.get("reason") == "Evicted":
        return f"{status.get('message', '')} (pod {pod['metadata']['name']})"
    return None
