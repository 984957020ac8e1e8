"""Map items on a cluster: a pool's warm workers as the pods of ONE Job, the local backend's
``PoolManager`` above them.

A Job per map item costs about 20 etcd writes and seconds of pod start each; a stock control
plane manages about 5 Jobs a second. So the items of a map go to the version's pool instead,
whose workers are pods running ``python -m opbox.runtime worker``: each pulls items from the
gateway (leases, per-item retries and results stay there, per worker) until the pool lets it go.
The pool starts a worker per ``items_per_worker`` queued items, up to ``max_workers`` (and the
workspace's share), and lets them go as the queue drains.

Those workers are the pods of one ``Indexed`` Job per pool and burst (render.WorkerSpec), Kubernetes'
"fine parallel processing using a work queue" with a name per pod:

    identity(pool) -> the next index of the pool's open Job: worker id ``<job>-<index>`` (what the pod
                      computes from its ``job-completion-index`` annotation) and the Job's token
    spawn(worker)  -> the first worker of a burst creates the Job's token Secret and the Job with
                      ``completions = parallelism =`` the indexes handed out so far (the PoolManager
                      asks for a burst's workers in one go: one Job, not one each); a later worker of
                      the same Job patches both up (an elastic Indexed Job). The handle's ``wait()``
                      ends when that index's pod ends, with its container's exit code
    scale down     -> a worker let go exits 0: its index completes and no pod replaces it, so the
                      Job shrinks as the queue drains, without a patch (patching ``completions`` down
                      would delete the highest indexes' pods, busy or not); once every index ended,
                      the Job is complete and the pool's next burst makes a new one
    signal         -> a pod cannot be signalled from here: any signal deletes the worker's pod (its
                      index then fails and is not run again: ``backoffLimitPerIndex: 0``)
    a disruption   -> the pod was evicted or its node lost (DisruptionTarget): the worker's item goes
                      back to the queue without spending a retry (``PoolManager.worker_disrupted``)

So Kubernetes sees one Job, one Secret and a pod per worker for a map of any size. The token is the
Job's, shared by its pods: they run the same version's code; leases stay per worker id.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import signal
import time

from ..pools import Pool, Worker
from . import render

log = logging.getLogger("opbox.kubernetes")

MAX_WORKERS_PER_JOB = 1000  # an index per worker; beyond it, the next burst opens another Job


class PodWorker:
    """The ``WorkerHandle`` of one worker: its index in its Job, its pod, how it ended."""

    pid = 0  # no local process

    def __init__(self, worker: Worker, job: "WorkerJob", index: int):
        self.worker, self.job, self.index = worker, job, index
        self.ended: asyncio.Future = asyncio.get_running_loop().create_future()
        self.tail = ""
        self.pod: dict | None = None  # its pod's latest state, from the pod watch
        self.kill = False  # a signal came before its pod was seen: delete the pod when it is

    @property
    def namespace(self) -> str:
        return self.job.namespace

    async def wait(self) -> int:
        return await self.ended

    def output_tail(self, size: int = 4000) -> str:
        return self.tail[-size:]

    def end(self, returncode: int) -> None:
        if not self.ended.done():
            self.ended.set_result(returncode)


class WorkerJob:
    """One Job of a pool's workers: the indexes handed out, and what the API has of them."""

    def __init__(self, pool: Pool, namespace: str, name: str):
        self.pool, self.namespace, self.name = pool, namespace, name
        self.token = secrets.token_urlsafe(32)
        self.size = 0  # indexes handed out (completions = parallelism once sent)
        self.sent = 0  # what the Job has
        self.handles: dict[int, PodWorker] = {}
        self.lock = asyncio.Lock()
        self.created_at: float | None = None  # monotonic, once the Job exists
        self.closed = False  # every worker ended (or the Job went): no more indexes

    def live(self) -> int:
        return sum(1 for h in self.handles.values() if not h.ended.done())


class PodSpawner:
    """``Spawner`` for the PoolManager of a ``KubernetesBackend`` (``backend``: settings, calls, watches)."""

    interrupts = False  # any signal ends the pod (it is deleted): its workers take a map's runs one at a time

    def __init__(self, backend):
        self.backend = backend
        self.by_job: dict[str, WorkerJob] = {}  # Job name -> its workers
        self.open: dict[str, WorkerJob] = {}  # pool id -> the Job its next workers join
        self.slots: dict[str, tuple[WorkerJob, int]] = {}  # worker id -> (its Job, its index), until spawned

    def identity(self, pool: Pool) -> tuple[str, str]:
        job = self.open.get(pool.id)
        # join the open Job only while one of its workers is still the pool's (not let go): a Job whose
        # workers all left completes, and a finished Job takes no more indexes
        if (job is None or job.closed or job.size >= MAX_WORKERS_PER_JOB
                or not any(w.id in pool.workers for w in (h.worker for h in job.handles.values()))
                and job.sent == job.size and job.sent):
            namespace = self.backend.settings.namespace(pool.version.workspace)
            digest = hashlib.sha256(pool.id.encode()).hexdigest()[:8]
            job = WorkerJob(pool, namespace, f"opbox-workers-{digest}-{secrets.token_hex(3)}")
            self.open[pool.id] = self.by_job[job.name] = job
        index, job.size = job.size, job.size + 1
        worker_id = f"{job.name}-{index}"
        self.slots[worker_id] = (job, index)
        return worker_id, job.token

    async def spawn(self, worker: Worker) -> PodWorker:
        job, index = self.slots.pop(worker.id)
        handle = job.handles[index] = PodWorker(worker, job, index)
        try:
            async with job.lock:
                if job.sent < job.size and not job.closed:
                    await self._send(job)
        except Exception:
            job.handles.pop(index, None)
            raise
        return handle

    async def _send(self, job: WorkerJob) -> None:
        """The Job made (with its token Secret), or its completions and parallelism patched up to ``size``."""
        backend, version, size = self.backend, job.pool.version, job.size
        if job.created_at is None:
            await backend.ensure_namespace(job.namespace, version.workspace)
            secret_name = f"{job.name}-token"
            workload = {**backend.workload(version, job.namespace, secret_name), "gateway_url": backend.worker_url}
            spec = render.WorkerSpec(**workload, name=job.name, pool_id=job.pool.id, workers=size)
            await backend.create_with_token(job.namespace, render.render_worker(spec), secret_name, spec.labels(),
                                            job.token)
            job.created_at = time.monotonic()
        else:
            await backend.call(backend.batch.patch_namespaced_job, job.name, job.namespace,
                               {"spec": {"completions": size, "parallelism": size}})
        job.sent = size

    def signal(self, worker: Worker, signum: int) -> None:
        handle = worker.handle
        if not isinstance(handle, PodWorker) or handle.ended.done():
            return
        if handle.pod is not None:
            self.backend.spawn_task(self.backend.delete_pod(handle.namespace, handle.pod["metadata"]["name"]))
        else:
            handle.kill = True
        if signum == signal.SIGKILL:
            handle.end(-signal.SIGKILL)

    # -- from the backend's watches -------------------------------------------------------
    def on_pod(self, kind: str, pod: dict) -> PodWorker | None:
        """A pod event: the handle of the worker it is, if any. A pod that ended (or went) ends it."""
        meta = pod["metadata"]
        labels = meta.get("labels") or {}
        job = self.by_job.get(labels.get("batch.kubernetes.io/job-name") or labels.get("job-name") or "")
        index = (meta.get("annotations") or {}).get(render.COMPLETION_INDEX) or labels.get(render.COMPLETION_INDEX)
        handle = job.handles.get(int(index)) if job is not None and index is not None and index.isdigit() else None
        if handle is None or handle.ended.done():
            return handle
        handle.pod = pod
        if handle.kill:
            handle.kill = False
            self.backend.spawn_task(self.backend.delete_pod(handle.namespace, meta["name"]))
        if kind == "DELETED" or (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            self.backend.spawn_task(self._ended(handle, kind == "DELETED"))
        return handle

    def fail(self, handle: PodWorker, reason: str) -> None:
        """The worker's pod will not start (say, its image cannot be pulled): it ends with ``reason``
        as its output, and the pool counts a failed start (three in a row fail what waits)."""
        handle.tail = reason
        if handle.pod is not None:
            self.backend.spawn_task(self.backend.delete_pod(handle.namespace, handle.pod["metadata"]["name"]))
        handle.end(1)
        self._maybe_close(handle.job)

    def on_job(self, kind: str, job: dict) -> bool:
        """A Job event: True when it was a pool's. A deleted or finished Job ends what is left of it."""
        workers = self.by_job.get(job["metadata"]["name"])
        if workers is None:
            return False
        conditions = {c.get("type") for c in (job.get("status") or {}).get("conditions") or []
                      if c.get("status") == "True"}
        if kind == "DELETED" or conditions & {"Complete", "Failed"}:
            self._forget(workers)
            for handle in list(workers.handles.values()):
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
        if code and pod and not handle.ended.done():
            handle.tail = await self.backend.log_tail(handle.namespace, pod["metadata"]["name"])
        handle.end(code)
        self._maybe_close(handle.job)

    def _maybe_close(self, job: WorkerJob) -> None:
        """Every worker of the Job ended: its next burst gets a new Job (the finished one takes no patches)."""
        if job.sent == job.size and not job.live():
            job.closed = True
            if self.open.get(job.pool.id) is job:
                del self.open[job.pool.id]

    def _forget(self, job: WorkerJob) -> None:
        job.closed = True
        self.by_job.pop(job.name, None)
        if self.open.get(job.pool.id) is job:
            del self.open[job.pool.id]

    def jobs(self) -> list[WorkerJob]:
        return [job for job in self.by_job.values() if job.created_at is not None]

    def resync(self, present: set, started: float) -> None:
        """After a relist begun at ``started``: a Job that existed before and is gone ended unseen."""
        for name, job in list(self.by_job.items()):
            if job.created_at is not None and job.created_at < started and (job.namespace, name) not in present:
                self._forget(job)
                for handle in job.handles.values():
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
