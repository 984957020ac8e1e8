"""The simulated node (and job controller, and garbage collector) of the fake API server.

For each Job it makes a Pod (labels ``job-name`` / ``batch.kubernetes.io/job-name`` and an
owner reference, as the job controller does) and runs the pod's container **with podman,
from the pod's image**, exactly as a kubelet would: the container's ``command`` as the
entrypoint, its env (values, ``secretKeyRef``, ``envFrom`` Secrets), its memory and CPU
limits; ``--network=host`` stands in for the pod network (the gateway is on 127.0.0.1).
Podman rather than a local process because the image is the thing under test: it is what
the builder made from the Dockerfile template and what a cluster would pull, and podman
starts a container in about 0.2 s here.

It reports what a kubelet and the job controller report: pod phases Pending / Running /
Succeeded / Failed with container states (``waiting`` ErrImagePull -> ImagePullBackOff for a
missing image, CreateContainerConfigError while a Secret is missing; ``terminated`` with the
exit code and reason Completed / Error / OOMKilled); Job ``active`` / ``succeeded`` /
``failed`` counts, new pods up to ``backoffLimit``, conditions Complete / Failed with reason
BackoffLimitExceeded or DeadlineExceeded (``activeDeadlineSeconds`` after the Job started,
which kills its pods), ``ttlSecondsAfterFinished``. Deleting a Job with propagationPolicy
Background or Foreground stops its pods (SIGTERM, SIGKILL after each pod's
``terminationGracePeriodSeconds``, as the garbage collector deletes them) and deletes
the objects it owns (its pods, the run's token Secret); Orphan (the API default for Jobs)
leaves them. A Knative Service gets one replica per revision: a Pod (labels
``serving.knative.dev/{service,configuration,revision}`` and the template's, the user container
plus a ``queue-proxy``; its log is the user container's output) whose container runs with podman
with the ``--port`` of its command moved to a free port, Ready once ``/readyz`` answers, its
``status.url`` that port on 127.0.0.1 (a Knative route, without the activator or autoscaling);
the previous revision's Pod goes once the new one is ready, all of them with the Service.

Images missing here are pulled (as ``imagePullPolicy: IfNotPresent`` does) from the registries
a test names in ``registries``, with the pod's imagePullSecrets. A pod of the kaniko executor
image is run by doing what the executor does (fake_kube/kaniko.py): fetch the context from S3,
build it, push it to the registry.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import re
import secrets
import shutil
import tempfile
import uuid
from pathlib import Path

from opbox.platform.backends.container.podman import MemoryCgroup
from opbox.resource import parse_quantity

from .admission import Refused, admit_pod
from .buildkit import is_buildkit, run_buildkit
from .kaniko import is_kaniko, pull_secret_auth, run_kaniko
from .scheduler import record_event, schedule
from .store import Store, now

log = logging.getLogger("fake_kube.node")


def field_value(pod: dict, path: str) -> str:
    """The downward API's ``fieldRef``: metadata.name / namespace / uid, metadata.labels['k'],
    metadata.annotations['k'], spec.nodeName, spec.serviceAccountName."""
    meta = pod["metadata"]
    keyed = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if keyed:
        return (meta.get(keyed[1]) or {}).get(keyed[2], "")
    simple = {"metadata.name": meta.get("name"), "metadata.namespace": meta.get("namespace"),
              "metadata.uid": meta.get("uid"), "spec.nodeName": pod["spec"].get("nodeName"),
              "spec.serviceAccountName": pod["spec"].get("serviceAccountName")}
    return simple.get(path) or ""


def _ranges(indexes: list[int]) -> str:
    """``[0, 1, 2, 5]`` as the Job status writes it: ``"0-2,5"``."""
    out, start = [], None
    for i, index in enumerate(indexes):
        if start is None:
            start = index
        if i + 1 == len(indexes) or indexes[i + 1] != index + 1:
            out.append(f"{start}-{index}" if index > start else str(start))
            start = None
    return ",".join(out)


def security_args(pod_spec: dict, container: dict) -> list[str]:
    """What the kubelet does with the pod's security context and emptyDir volumes: the uid and gid,
    a read-only root filesystem, an emptyDir mounted where the container asks for it."""
    context = {**(pod_spec.get("securityContext") or {}), **(container.get("securityContext") or {})}
    args = []
    if "runAsUser" in context:
        args += ["--user", f"{context['runAsUser']}:{context.get('runAsGroup', context['runAsUser'])}"]
    if context.get("readOnlyRootFilesystem"):
        args.append("--read-only")
    empty = {v["name"] for v in pod_spec.get("volumes") or [] if "emptyDir" in v}
    for mount in container.get("volumeMounts") or []:
        if mount["name"] in empty:
            args += ["--tmpfs", f"{mount['mountPath']}:rw,mode=1777"]
    return args


class Node:
    def __init__(self, store: Store, log_dir: Path | None = None, podman: str = "podman"):
        self.store = store
        self.podman = shutil.which(podman) or podman
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="fake-kube-pods-"))
        self.tasks: set[asyncio.Task] = set()
        self.containers: dict[str, str] = {}  # pod uid -> container name, while it runs
        self.deadline_hit: set[str] = set()  # uids of Jobs past activeDeadlineSeconds
        self.instance = secrets.token_hex(4)  # the label value of this node's containers
        self.registries: set[str] = set()  # registry hosts (plain HTTP) missing images are pulled from
        self.pulled: list[str] = []  # images pulled, in order
        self.revisions: dict[str, tuple] = {}  # Knative Service uid -> (generation started, None)
        self.replicas: dict[str, tuple[str, str]] = {}  # Knative Service uid -> (container, pod) serving it
        self.serving: dict[str, tuple[str, str]] = {}  # Knative Service uid -> (revision, url) traffic goes to
        self.hold_rollouts = False  # True: new revisions wait before they become ready (a slow rollout)
        self.pod_start_delay = 0.0  # seconds a pod takes to start once bound (a sandbox, an image pull)
        self.progress_deadline = 600.0  # Knative's progress-deadline (config-deployment): a revision not ready fails
        self.pull_failures: dict[str, int] = {}  # image -> pulls that fail first (a registry's 429)
        self.disrupted: dict[str, dict] = {}  # pod uid -> the status its disruption leaves
        self._pull_error = "not found"

    # -- hooks from the API ---------------------------------------------------------------
    def created(self, resource: str, obj: dict) -> None:
        if resource == "jobs" and obj["spec"].get("completionMode") == "Indexed":
            self._spawn(self._run_indexed_job(obj["metadata"]["namespace"], obj["metadata"]["name"]))
        elif resource == "jobs":
            self._spawn(self._run_job(obj["metadata"]["namespace"], obj["metadata"]["name"]))
        elif resource == "services":
            self._serve(obj)

    def updated(self, resource: str, obj: dict) -> None:
        if resource == "services":
            self._serve(obj)

    def delete(self, resource: str, obj: dict, policy: str | None, grace: int | None) -> dict:
        meta = obj["metadata"]
        if resource == "jobs":
            policy = policy or "Orphan"  # what the API server does for batch/v1 Jobs
        else:
            policy = policy or "Background"
        if resource == "pods":
            self._spawn(self._delete_pod(obj, grace))
            return obj
        if resource == "services":
            self._spawn(self._stop_service(meta["uid"]))
        if policy == "Foreground":
            meta["deletionTimestamp"] = now()
            meta.setdefault("finalizers", []).append("foregroundDeletion")
            current = self.store.put(resource, obj)
            self._spawn(self._delete_dependents(resource, obj, then_remove=True))
            return current
        gone = self.store.remove(resource, meta.get("namespace"), meta["name"])
        if policy == "Background":
            self._spawn(self._delete_dependents(resource, obj, then_remove=False))
        return gone

    def pod_log(self, namespace: str, name: str) -> str:
        pod = self.store.get("pods", namespace, name)
        path = self.log_dir / f"{pod['metadata']['uid']}.log" if pod else None
        return path.read_text(errors="replace") if path and path.exists() else ""

    def remove_containers(self) -> None:
        """Remove every container this node started (from any thread, after the server stopped)."""
        import subprocess

        ids = subprocess.run([self.podman, "ps", "-aq", "--filter", f"label=opbox.fake-kube={self.instance}"],
                             capture_output=True, text=True, stdin=subprocess.DEVNULL).stdout.split()
        if ids:
            subprocess.run([self.podman, "rm", "--force", "--time", "0", *ids], capture_output=True,
                           stdin=subprocess.DEVNULL)

    # -- internals ------------------------------------------------------------------------
    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _podman(self, *args: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(self.podman, *args, stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await proc.communicate()
        return proc.returncode, out.decode(errors="replace")

    def _owned_by(self, uid: str) -> list[tuple[str, dict]]:
        return [(res, o) for (res, _, _), o in list(self.store.objects.items())
                if any(ref.get("uid") == uid for ref in o["metadata"].get("ownerReferences") or [])]

    async def _delete_dependents(self, resource: str, obj: dict, then_remove: bool) -> None:
        """The garbage collector: it deletes dependents with default options (the owner's
        gracePeriodSeconds is not passed on), so each pod gets its own terminationGracePeriodSeconds."""
        uid = obj["metadata"]["uid"]
        waits = []
        for res, dependent in self._owned_by(uid):
            if res == "pods":
                waits.append(self._delete_pod(dependent, None))
            else:
                self.store.remove(res, dependent["metadata"].get("namespace"), dependent["metadata"]["name"])
        await asyncio.gather(*waits)
        if then_remove:
            self.store.remove(resource, obj["metadata"].get("namespace"), obj["metadata"]["name"])

    async def _delete_pod(self, pod: dict, grace: int | None) -> None:
        meta = pod["metadata"]
        if grace is None:
            grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
        current = self.store.get("pods", meta["namespace"], meta["name"])
        if current is None:
            return
        current["metadata"]["deletionTimestamp"] = now()
        current["metadata"]["deletionGracePeriodSeconds"] = grace
        self.store.put("pods", current)
        name = self.containers.get(meta["uid"])
        if name:
            await self._podman("stop", "--time", str(grace), name)
        self.store.remove("pods", meta["namespace"], meta["name"])

    # -- the job controller ---------------------------------------------------------------
    def _job(self, namespace: str, name: str, uid: str) -> dict | None:
        job = self.store.get("jobs", namespace, name)
        return job if job is not None and job["metadata"]["uid"] == uid else None

    async def _run_job(self, namespace: str, name: str) -> None:
        job = self.store.get("jobs", namespace, name)
        uid = job["metadata"]["uid"]
        spec = job["spec"]
        job["status"] = {"startTime": now(), "active": 0}
        self.store.put("jobs", job)
        deadline = spec.get("activeDeadlineSeconds")
        timer = None
        if deadline is not None:
            timer = asyncio.get_running_loop().call_later(
                deadline, lambda: self._spawn(self._deadline(namespace, name, uid)))
        failed = refusals = 0
        try:
            while True:
                job = self._job(namespace, name, uid)
                if job is None or uid in self.deadline_hit:
                    return
                pod = self._make_pod(job)
                if pod is None:  # refused (quota, PodSecurity): the controller tries again, backing off
                    refusals += 1
                    await asyncio.sleep(min(10.0, 0.5 * 2 ** refusals))
                    continue
                job["status"]["active"] = 1
                self.store.put("jobs", job)
                phase = await self._run_pod(pod)
                job = self._job(namespace, name, uid)
                if job is None or uid in self.deadline_hit or phase is None:
                    return
                job["status"]["active"] = 0
                if phase == "Succeeded":
                    job["status"].update(succeeded=1, completionTime=now(), conditions=[
                        self._condition("SuccessCriteriaMet", "CompletionsReached", "Reached expected number of succeeded pods"),
                        self._condition("Complete", "CompletionsReached", "Reached expected number of succeeded pods")])
                    self.store.put("jobs", job)
                    break
                failed += 1
                job["status"]["failed"] = failed
                if failed > spec.get("backoffLimit", 6):
                    job["status"]["conditions"] = [
                        self._condition("FailureTarget", "BackoffLimitExceeded", "Job has reached the specified backoff limit"),
                        self._condition("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")]
                    self.store.put("jobs", job)
                    break
                self.store.put("jobs", job)
        finally:
            if timer:
                timer.cancel()
        ttl = spec.get("ttlSecondsAfterFinished")
        if ttl is not None:
            await asyncio.sleep(ttl)
            job = self._job(namespace, name, uid)
            if job is not None:
                self.delete("jobs", job, "Background", None)

    async def _run_indexed_job(self, namespace: str, name: str) -> None:
        """The job controller for ``completionMode: Indexed``: a pod per index (``JOB_COMPLETION_INDEX``,
        the ``batch.kubernetes.io/job-completion-index`` label and annotation), at most ``parallelism``
        at once, ``completions`` followed as it is patched (elastic Indexed Jobs); with
        ``backoffLimitPerIndex: 0`` a failed (or deleted) index is not run again and the others go on;
        the Job ends Complete when every index succeeded, else Failed (FailedIndexes)."""
        job = self.store.get("jobs", namespace, name)
        uid = job["metadata"]["uid"]
        job["status"] = {"startTime": now(), "active": 0}
        self.store.put("jobs", job)
        done: dict[int, str] = {}  # index -> Succeeded / Failed
        running: dict[int, asyncio.Task] = {}
        refusals = 0
        while True:
            job = self._job(namespace, name, uid)
            if job is None:
                for task in running.values():
                    task.cancel()
                return
            spec = job["spec"]
            for index in [i for i, t in running.items() if t.done()]:
                phase = running.pop(index).result()
                done[index] = "Succeeded" if phase == "Succeeded" else "Failed"
            completions, parallelism = spec.get("completions", 1), spec.get("parallelism", 1)
            for index in range(completions):
                if len(running) >= parallelism:
                    break
                if index in done or index in running:
                    continue
                pod = self._make_pod(job, index)
                if pod is None:
                    refusals += 1
                    await asyncio.sleep(min(10.0, 0.5 * 2 ** refusals))
                    break
                running[index] = asyncio.ensure_future(self._run_pod(pod))
            succeeded = sorted(i for i, p in done.items() if p == "Succeeded" and i < completions)
            failed = sorted(i for i, p in done.items() if p == "Failed" and i < completions)
            status = {**job["status"], "active": len(running), "succeeded": len(succeeded), "failed": len(failed),
                      "completedIndexes": _ranges(succeeded)}
            if failed:
                status["failedIndexes"] = _ranges(failed)
            if len(succeeded) + len(failed) >= completions and not running:
                status["completionTime"] = now()
                status["conditions"] = ([self._condition("SuccessCriteriaMet", "CompletionsReached", "Reached expected number of succeeded pods"),
                                         self._condition("Complete", "CompletionsReached", "Reached expected number of succeeded pods")]
                                        if not failed else
                                        [self._condition("FailureTarget", "FailedIndexes", "Job has failed indexes"),
                                         self._condition("Failed", "FailedIndexes", "Job has failed indexes")])
            if status != job["status"]:
                job["status"] = status
                self.store.put("jobs", job)
            if "conditions" in status:
                break
            await asyncio.sleep(0.1)
        ttl = spec.get("ttlSecondsAfterFinished")
        if ttl is not None:
            await asyncio.sleep(ttl)
            job = self._job(namespace, name, uid)
            if job is not None:
                self.delete("jobs", job, "Background", None)

    @staticmethod
    def _condition(kind: str, reason: str, message: str) -> dict:
        return {"type": kind, "status": "True", "reason": reason, "message": message,
                "lastProbeTime": now(), "lastTransitionTime": now()}

    async def _deadline(self, namespace: str, name: str, uid: str) -> None:
        job = self._job(namespace, name, uid)
        if job is None or any(c["type"] in ("Complete", "Failed") for c in job["status"].get("conditions", [])):
            return
        self.deadline_hit.add(uid)
        pods = [o for res, o in self._owned_by(uid) if res == "pods"]
        for pod in pods:  # the job controller deletes the active pods
            self._spawn(self._delete_pod(pod, None))
        job["status"].update(active=0, failed=job["status"].get("failed", 0) + len(pods), conditions=[
            self._condition("FailureTarget", "DeadlineExceeded", "Job was active longer than specified deadline"),
            self._condition("Failed", "DeadlineExceeded", "Job was active longer than specified deadline")])
        self.store.put("jobs", job)

    def _make_pod(self, job: dict, index: int | None = None) -> dict | None:
        """The Job's next pod (of ``index`` in an Indexed Job); None (and a FailedCreate Event on the Job)
        when admission refuses it."""
        meta, template = job["metadata"], job["spec"]["template"]
        labels = {**(template.get("metadata", {}).get("labels") or {}), "job-name": meta["name"],
                  "batch.kubernetes.io/job-name": meta["name"], "controller-uid": meta["uid"],
                  "batch.kubernetes.io/controller-uid": meta["uid"]}
        annotations = dict(template.get("metadata", {}).get("annotations") or {})
        spec = dict(template["spec"])
        prefix = meta["name"][:57]
        if index is not None:  # pkg/controller/job/indexed_job_utils.go
            labels["batch.kubernetes.io/job-completion-index"] = annotations[
                "batch.kubernetes.io/job-completion-index"] = str(index)
            spec["containers"] = [{**c, "env": [*(c.get("env") or []), {"name": "JOB_COMPLETION_INDEX", "valueFrom": {
                "fieldRef": {"fieldPath": "metadata.labels['batch.kubernetes.io/job-completion-index']"}}}]}
                for c in spec["containers"]]
            prefix = f"{meta['name'][:50]}-{index}"
        pod = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"{prefix}-{secrets.token_hex(3)[:5]}", "namespace": meta["namespace"],
                         "labels": labels, "annotations": annotations, "ownerReferences": [{
                             "apiVersion": "batch/v1", "kind": "Job", "name": meta["name"], "uid": meta["uid"],
                             "controller": True, "blockOwnerDeletion": True}]},
            "spec": spec,
            "status": {"phase": "Pending"},
        }
        try:
            admit_pod(self.store, pod)
        except Refused as exc:
            record_event(self.store, job, "FailedCreate", f"Error creating: {exc.message}", "job-controller")
            return None
        return self.store.create("pods", pod)

    async def _bind(self, pod: dict) -> bool:
        """The scheduler: bind ``pod`` to a node that fits, retrying while none does (the pod stays
        Pending with PodScheduled=False, reason Unschedulable); False if the pod went meanwhile."""
        reported = None
        while True:
            node, why = schedule(self.store, pod)
            current = self.store.get("pods", pod["metadata"]["namespace"], pod["metadata"]["name"])
            if current is None or current["metadata"]["uid"] != pod["metadata"]["uid"]:
                return False
            if node is not None:
                current["spec"]["nodeName"] = node
                current["status"]["conditions"] = [{"type": "PodScheduled", "status": "True",
                                                    "lastTransitionTime": now()}]
                self.store.put("pods", current)
                return True
            if why != reported:
                reported = why
                current["status"]["conditions"] = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                                    "message": why, "lastTransitionTime": now()}]
                self.store.put("pods", current)
                record_event(self.store, current, "FailedScheduling", why, "default-scheduler")
            await asyncio.sleep(0.5)

    # -- the kubelet ----------------------------------------------------------------------
    def _update_pod(self, pod: dict, **status) -> dict | None:
        current = self.store.get("pods", pod["metadata"]["namespace"], pod["metadata"]["name"])
        if current is None or current["metadata"]["uid"] != pod["metadata"]["uid"]:
            return None
        current["status"].update(status)
        return self.store.put("pods", current)

    def _container_status(self, container: dict, state: dict, **extra) -> list[dict]:
        return [{"name": container["name"], "image": container["image"], "imageID": "", "restartCount": 0,
                 "ready": "running" in state, "started": "running" in state, "state": state, **extra}]

    def _env(self, namespace: str, container: dict, pod: dict | None = None) -> tuple[dict[str, str] | None, str]:
        env: dict[str, str] = {}
        for source in container.get("envFrom") or []:
            ref = source.get("secretRef")
            if ref:
                secret = self.store.get("secrets", namespace, ref["name"])
                if secret is None:
                    return None, f'secret "{ref["name"]}" not found'
                env.update({k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()})
        for item in container.get("env") or []:
            if "value" in item:  # $(VAR) of a variable defined before it expands; $$ is a literal $
                env[item["name"]] = re.sub(r"\$\$|\$\(([-._a-zA-Z0-9]+)\)", lambda m: "$" if m[0] == "$$" else
                                           env.get(m[1], m[0]), item["value"])
            elif "fieldRef" in (item.get("valueFrom") or {}) and pod is not None:
                env[item["name"]] = field_value(pod, item["valueFrom"]["fieldRef"]["fieldPath"])
            elif "secretKeyRef" in (item.get("valueFrom") or {}):
                ref = item["valueFrom"]["secretKeyRef"]
                secret = self.store.get("secrets", namespace, ref["name"])
                if secret is None or ref["key"] not in (secret.get("data") or {}):
                    return None, f'secret "{ref["name"]}" (key {ref["key"]}) not found'
                env[item["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
            else:
                env[item["name"]] = ""
        return env, ""

    async def _run_pod(self, pod: dict) -> str | None:
        """Run the pod's one container to the end; its phase, or None if the pod was deleted."""
        namespace, uid = pod["metadata"]["namespace"], pod["metadata"]["uid"]
        (container,) = pod["spec"]["containers"]
        if not await self._bind(pod):
            return None
        if self.pod_start_delay:
            await asyncio.sleep(self.pod_start_delay)
        while True:  # the kubelet retries until the Secrets exist
            env, problem = self._env(namespace, container, pod)
            if env is not None:
                break
            if self._update_pod(pod, containerStatuses=self._container_status(
                    container, {"waiting": {"reason": "CreateContainerConfigError", "message": problem}})) is None:
                return None
            await asyncio.sleep(0.2)
        if is_kaniko(container["image"]):
            return await self._run_kaniko(pod, container, env)
        if is_buildkit(container["image"]):
            return await self._run_kaniko(pod, container, env, run_buildkit, "buildkit")
        backoff = 0.3
        while not await self._pull(pod, container["image"]):  # the kubelet retries, backing off
            for reason in ("ErrImagePull", "ImagePullBackOff"):
                message = f'Back-off pulling image "{container["image"]}"' if reason == "ImagePullBackOff" else \
                    f'failed to pull and unpack image "{container["image"]}": {self._pull_error}'
                if self._update_pod(pod, containerStatuses=self._container_status(
                        container, {"waiting": {"reason": reason, "message": message}})) is None:
                    return None
                await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)
        limits = (container.get("resources") or {}).get("limits") or {}
        name = f"k8s-{pod['metadata']['name']}-{uid[:8]}"
        args = ["run", "--name", name, "--network=host", "--init", "--pull=never",
                "--label", f"opbox.fake-kube={self.instance}", "--entrypoint", container["command"][0],
                *security_args(pod["spec"], container)]
        cgroup = None
        if "memory" in limits:
            memory = int(parse_quantity(limits["memory"]))
            if MemoryCgroup.usable():
                cgroup = MemoryCgroup(name, memory)
                args += ["--cgroups=no-conmon", "--cgroup-parent", cgroup.rel]
            else:
                args += ["--memory", str(memory), "--memory-swap", str(memory)]
        if "cpu" in limits:
            args += ["--cpus", f"{float(parse_quantity(limits['cpu'])):g}"]
        for key in env:
            args += ["-e", key]
        args += [container["image"], *container["command"][1:], *(container.get("args") or [])]
        log_path = self.log_dir / f"{uid}.log"
        started = now()
        with open(log_path, "ab") as out:
            proc = await asyncio.create_subprocess_exec(  # cwd: conmon drops files (such as "oom") there
                self.podman, *args, env={**os.environ, **env}, stdin=asyncio.subprocess.DEVNULL, stdout=out,
                stderr=asyncio.subprocess.STDOUT, cwd=str(self.log_dir))
        self.containers[uid] = name
        self._update_pod(pod, phase="Running", startTime=started, containerStatuses=self._container_status(
            container, {"running": {"startedAt": started}}, containerID=f"podman://{name}"))
        try:
            code = await proc.wait()
            _, inspected = await self._podman("inspect", "--type", "container", "--format", "{{.State.OOMKilled}}", name)
            oom = inspected.strip() == "true" or (cgroup is not None and code == 137 and cgroup.hit_limit())
        finally:
            self.containers.pop(uid, None)
            await self._podman("rm", "--force", "--time", "0", name)
            if cgroup is not None:
                cgroup.remove()
        reason = "Completed" if code == 0 else ("OOMKilled" if oom else "Error")
        disruption = self.disrupted.pop(uid, None)
        phase = "Succeeded" if code == 0 and disruption is None else "Failed"
        terminated = {"exitCode": code, "reason": reason, "startedAt": started, "finishedAt": now(),
                      "containerID": f"podman://{name}"}
        if self._update_pod(pod, phase=phase, containerStatuses=self._container_status(
                container, {"terminated": terminated}, containerID=f"podman://{name}"),
                **(disruption or {})) is None:
            return None
        if disruption and disruption.get("conditions", [{}])[0].get("reason") == "DeletionByTaintManager":
            self._spawn(self._delete_pod(pod, 0))  # the taint manager deletes the pods of a lost node
        return phase

    # -- disruptions -------------------------------------------------------------------
    def evict(self, namespace: str, name: str, message: str) -> bool:
        """The kubelet evicts a running pod (node pressure): DisruptionTarget, then phase Failed with
        reason Evicted, its container killed."""
        pod = self.store.get("pods", namespace, name)
        if pod is None or pod["metadata"]["uid"] not in self.containers:
            return False
        self._disrupt(pod, "TerminationByKubelet", message, reason="Evicted", message=message)
        return True

    def lose_node(self, node: str) -> list[str]:
        """The node stops answering: it is tainted unreachable, and its pods get DisruptionTarget
        (DeletionByTaintManager) and are deleted. The pods it ran, by name."""
        current = self.store.get("nodes", None, node)
        if current is None:
            return []
        current.setdefault("spec", {})["taints"] = [{"key": "node.kubernetes.io/unreachable", "effect": "NoExecute",
                                                      "timeAdded": now()}]
        current["status"]["conditions"] = [{"type": "Ready", "status": "Unknown", "reason": "NodeStatusUnknown",
                                            "message": "Kubelet stopped posting node status."}]
        self.store.put("nodes", current)
        lost = [p for p in self.store.list("pods") if p["spec"].get("nodeName") == node
                and p["metadata"]["uid"] in self.containers]
        for pod in lost:
            self._disrupt(pod, "DeletionByTaintManager", "Taint manager: deleting due to NoExecute taint")
        return [p["metadata"]["name"] for p in lost]

    def _disrupt(self, pod: dict, why: str, text: str, **status) -> None:
        condition = {"type": "DisruptionTarget", "status": "True", "reason": why, "message": text,
                     "lastTransitionTime": now()}
        current = self.store.get("pods", pod["metadata"]["namespace"], pod["metadata"]["name"])
        self.disrupted[pod["metadata"]["uid"]] = {
            **status, "conditions": [condition, *[c for c in current["status"].get("conditions") or []
                                                  if c["type"] != "DisruptionTarget"]]}
        self._update_pod(pod, conditions=self.disrupted[pod["metadata"]["uid"]]["conditions"])
        self._spawn(self._kill(pod["metadata"]["uid"]))

    async def _kill(self, uid: str) -> None:
        """SIGKILL the pod's container; one still being created refuses it, so ask until it is gone."""
        while uid in self.containers:
            code, _ = await self._podman("kill", self.containers[uid])
            if code == 0:
                return
            await asyncio.sleep(0.2)

    async def _pull(self, pod: dict | None, image: str) -> bool:
        """Whether ``image`` is here, pulled first (as IfNotPresent does) from one of ``registries``."""
        if self.pull_failures.get(image):
            self.pull_failures[image] -= 1
            self._pull_error = "unexpected status from HEAD request: 429 Too Many Requests"
            return False
        self._pull_error = "not found"
        if (await self._podman("image", "exists", image))[0] == 0:
            return True
        host = image.split("/", 1)[0]
        if host not in self.registries:
            return False
        args = ["pull", "--quiet", "--tls-verify=false"]
        auth = pull_secret_auth(self.store, pod["metadata"]["namespace"], pod) if pod else None
        with tempfile.TemporaryDirectory(prefix="fake-kube-pull-") as tmp:
            if auth is not None:
                (Path(tmp) / "config.json").write_bytes(auth)
                args += ["--authfile", str(Path(tmp) / "config.json")]
            code, out = await self._podman(*args, image)
        if code != 0:
            log.warning("pulling %s failed: %s", image, out.strip()[-500:])
        self.pulled.append(image)
        return code == 0

    async def _run_kaniko(self, pod: dict, container: dict, env: dict[str, str], runner=run_kaniko,
                          tool: str = "kaniko") -> str | None:
        """An image builder, emulated (fake_kube/kaniko.py, fake_kube/buildkit.py): build, push, exit."""
        uid, started = pod["metadata"]["uid"], now()
        self._update_pod(pod, phase="Running", startTime=started, containerStatuses=self._container_status(
            container, {"running": {"startedAt": started}}, containerID=f"{tool}://{uid}"))
        with open(self.log_dir / f"{uid}.log", "ab") as out:
            code = await runner(self.podman, self.store, pod, container, env, out)
        terminated = {"exitCode": code, "reason": "Completed" if code == 0 else "Error", "startedAt": started,
                      "finishedAt": now(), "containerID": f"{tool}://{uid}"}
        phase = "Succeeded" if code == 0 else "Failed"
        if self._update_pod(pod, phase=phase, containerStatuses=self._container_status(
                container, {"terminated": terminated}, containerID=f"{tool}://{uid}")) is None:
            return None
        return phase

    # -- Knative Serving: one replica per Service, on a free port of 127.0.0.1 -------------------
    # Each replica is also a Pod object, as Knative's Deployment would make it: named
    # <revision>-deployment-<hash>-<id>, labelled serving.knative.dev/{service,configuration,revision}
    # plus the template's labels, owned by the revision's ReplicaSet (not modelled), with the user
    # container and a queue-proxy container. Its log is the user container's output.
    def _serve(self, service: dict) -> None:
        meta = service["metadata"]
        current = self.store.get("services", meta["namespace"], meta["name"])
        if current is None:
            return
        generation = current["metadata"].get("generation", 1)
        if self.revisions.get(current["metadata"]["uid"], (0,))[0] >= generation:
            return
        self.revisions[current["metadata"]["uid"]] = (generation, None)
        self._spawn(self._run_revision(current, generation))

    def _service_status(self, service: dict, generation: int, ready: str, reason: str = "",
                        message: str = "") -> None:
        """The Service's status while revision ``generation`` is ``ready`` (Unknown: coming up).
        As Knative's service_lifecycle.go: Ready follows ConfigurationsReady, while RoutesReady stays
        True, and the traffic on the last ready revision, as long as one serves (``self.serving``)."""
        meta = service["metadata"]
        current = self.store.get("services", meta["namespace"], meta["name"])
        if current is None or current["metadata"]["uid"] != meta["uid"]:
            return
        revision = f"{meta['name']}-{generation:05d}"
        serving = self.serving.get(meta["uid"])
        routes = "True" if serving else ("Unknown" if ready == "Unknown" else "False")

        def condition(kind: str, state: str, why: str = "", text: str = "") -> dict:
            return {"type": kind, "status": state, "lastTransitionTime": now(),
                    **({"reason": why, "message": text} if why else {})}

        status = {"observedGeneration": generation, "latestCreatedRevisionName": revision, "conditions": [
            condition("ConfigurationsReady", ready, reason, message), condition("Ready", ready, reason, message),
            condition("RoutesReady", routes, *(("", "") if serving else (reason, message)))]}
        if serving:
            status.update(url=serving[1], address={"url": serving[1]}, latestReadyRevisionName=serving[0],
                          traffic=[{"revisionName": serving[0], "latestRevision": serving[0] == revision,
                                    "percent": 100}])
        current["status"] = status
        self.store.put("services", current)

    def _revision_pod(self, service: dict, generation: int, container: dict) -> dict:
        """The Pod of a revision's replica, as Knative renders it from the Service's template."""
        meta, template = service["metadata"], service["spec"]["template"]
        revision = f"{meta['name']}-{generation:05d}"
        replica_set = f"{revision}-deployment-{secrets.token_hex(5)}"
        labels = {**(template.get("metadata", {}).get("labels") or {}),
                  "serving.knative.dev/service": meta["name"], "serving.knative.dev/serviceUID": meta["uid"],
                  "serving.knative.dev/configuration": meta["name"],
                  "serving.knative.dev/configurationGeneration": str(generation),
                  "serving.knative.dev/revision": revision, "app": revision}
        spec = {k: v for k, v in template["spec"].items()
                if k not in ("containerConcurrency", "timeoutSeconds", "responseStartTimeoutSeconds",
                             "idleTimeoutSeconds", "containers")}
        port = ((container.get("ports") or [{}])[0]).get("containerPort", 8080)
        user = {k: v for k, v in container.items() if k not in ("readinessProbe", "ports")}  # readiness: queue-proxy's
        user["ports"] = [{"name": "user-port", "containerPort": port, "protocol": "TCP"}]
        user["env"] = [*(container.get("env") or []), {"name": "PORT", "value": str(port)},
                       {"name": "K_REVISION", "value": revision}, {"name": "K_CONFIGURATION", "value": meta["name"]},
                       {"name": "K_SERVICE", "value": meta["name"]}]
        if "livenessProbe" in container:
            probe = {**container["livenessProbe"]}
            probe["httpGet"] = {**probe.get("httpGet", {}), "port": port}
            user["livenessProbe"] = probe
        queue = {"name": "queue-proxy", "image": "gcr.io/knative-releases/knative.dev/serving/cmd/queue:fake",
                 "ports": [{"name": "http-queueadm", "containerPort": 8022, "protocol": "TCP"},
                           {"name": "http-autometric", "containerPort": 9090, "protocol": "TCP"},
                           {"name": "http1", "containerPort": 8012, "protocol": "TCP"}],
                 "env": [{"name": "SERVING_SERVICE", "value": meta["name"]},
                         {"name": "SERVING_REVISION", "value": revision},
                         {"name": "USER_PORT", "value": str(port)}],
                 "readinessProbe": {"httpGet": {"port": 8012, "httpHeaders": [
                     {"name": "K-Network-Probe", "value": "queue"}]}, "periodSeconds": 1},
                 "resources": {"requests": {"cpu": "25m"}},
                 "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                     "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}}}
        pod = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"{replica_set}-{secrets.token_hex(3)[:5]}", "namespace": meta["namespace"],
                         "labels": labels, "annotations": dict(template.get("metadata", {}).get("annotations") or {}),
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": replica_set,
                                              "uid": str(uuid.uuid4()), "controller": True,
                                              "blockOwnerDeletion": True}]},
            "spec": {**spec, "containers": [user, queue], "enableServiceLinks": False, "nodeName": "fake-node",
                     "terminationGracePeriodSeconds": template["spec"].get("timeoutSeconds", 300)},
            "status": {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "True"}]},
        }
        return self.store.create("pods", pod)

    def _replica_status(self, pod: dict, state: dict, **status) -> None:
        """The user container's ``state``; the queue-proxy runs throughout."""
        user, queue = pod["spec"]["containers"]
        statuses = self._container_status(user, state) + self._container_status(
            queue, {"running": {"startedAt": pod["metadata"]["creationTimestamp"]}})
        self._update_pod(pod, containerStatuses=statuses, **status)

    def _service_pods(self, uid: str) -> list[dict]:
        return [o for (res, _, _), o in list(self.store.objects.items())
                if res == "pods" and (o["metadata"].get("labels") or {}).get("serving.knative.dev/serviceUID") == uid]

    async def _run_revision(self, service: dict, generation: int) -> None:
        """Start the revision's one replica (its Pod, and the container's command with its port
        moved to a free one), probe /readyz as the kubelet would, then route to it and stop the
        previous revision's replica (its Pod goes)."""
        import socket

        import httpx

        meta = service["metadata"]
        uid = meta["uid"]
        (container,) = service["spec"]["template"]["spec"]["containers"]
        revision = f"{meta['name']}-{generation:05d}"
        self._service_status(service, generation, "Unknown", "RevisionMissing",
                             f'Configuration "{meta["name"]}" is waiting for a Revision to become ready.')
        env, problem = self._env(meta["namespace"], container)
        if env is None:
            self._service_status(service, generation, "False", "RevisionFailed",
                                 f'Revision "{revision}" failed with message: {problem}.')
            return
        pod = self._revision_pod(service, generation, container)
        if not await self._pull(pod, container["image"]):
            message = f'Unable to fetch image "{container["image"]}": not found'
            self._replica_status(pod, {"waiting": {"reason": "ImagePullBackOff", "message": message}})
            self._service_status(service, generation, "False", "RevisionFailed",
                                 f'Revision "{revision}" failed with message: {message}.')
            return
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        command = list(container["command"])
        if "--port" in command:
            command[command.index("--port") + 1] = str(port)
        name = f"ksvc-{meta['name'][:40]}-{generation}-{secrets.token_hex(3)}"
        args = ["run", "--name", name, "--network=host", "--init", "--pull=never",
                "--label", f"opbox.fake-kube={self.instance}", "--entrypoint", command[0],
                *security_args(service["spec"]["template"]["spec"], container)]
        for key in env:
            args += ["-e", key]
        args += [container["image"], *command[1:]]
        log_path = self.log_dir / f"{pod['metadata']['uid']}.log"  # what pods/log serves
        started = now()
        with open(log_path, "ab") as out:
            proc = await asyncio.create_subprocess_exec(
                self.podman, *args, env={**os.environ, **env, "PORT": str(port)}, stdin=asyncio.subprocess.DEVNULL,
                stdout=out, stderr=asyncio.subprocess.STDOUT)
        self._replica_status(pod, {"running": {"startedAt": started}}, phase="Running", startTime=started,
                             podIP="127.0.0.1")
        url = f"http://127.0.0.1:{port}"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.progress_deadline
        async with httpx.AsyncClient(timeout=2) as client:
            while proc.returncode is None and loop.time() < deadline:
                try:
                    if (await client.get(url + "/readyz")).status_code == 200 and not self.hold_rollouts:
                        break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)
            else:
                if proc.returncode is None:  # never ready: Knative gives up after its progress deadline
                    self._replica_status(pod, {"running": {"startedAt": started}})
                    self._service_status(service, generation, "False", "ProgressDeadlineExceeded",
                                         f'Revision "{revision}" failed to become ready within the progress '
                                         f"deadline ({self.progress_deadline:g} s): {log_path.read_text()[-2000:].strip()}")
                    await self._podman("rm", "--force", "--time", "0", name)
                    return
        if proc.returncode is not None:
            # the failed pod stays (as a crash-looping one does) so its log can be read
            self._replica_status(pod, {"terminated": {"exitCode": proc.returncode, "reason": "Error",
                                                      "startedAt": started, "finishedAt": now()}}, phase="Failed")
            tail = log_path.read_text(errors="replace")[-2000:]
            self._service_status(service, generation, "False", "RevisionFailed",
                                 f'Revision "{revision}" failed with message: Container failed with: {tail}')
            await self._podman("rm", "--force", "--time", "0", name)
            return
        self._update_pod(pod, conditions=[{"type": t, "status": "True", "lastTransitionTime": now()}
                                          for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")])
        previous = self.replicas.get(uid)
        self.replicas[uid] = (name, pod["metadata"]["name"])
        self.serving[uid] = (revision, url)
        self._service_status(service, generation, "True")
        # the older revisions' pods go (the ready one's after its container stopped)
        await self._stop_replica(previous[0] if previous else None,
                                 [p for p in self._service_pods(uid) if p["metadata"]["uid"] != pod["metadata"]["uid"]])

    async def _stop_replica(self, container: str | None, pods: list[dict]) -> None:
        for pod in pods:
            current = self.store.get("pods", pod["metadata"]["namespace"], pod["metadata"]["name"])
            if current is not None:
                current["metadata"]["deletionTimestamp"] = now()
                self.store.put("pods", current)
        if container:
            await self._podman("stop", "--time", "10", container)
            await self._podman("rm", "--force", "--time", "0", container)
        for pod in pods:
            self.store.remove("pods", pod["metadata"]["namespace"], pod["metadata"]["name"])

    async def _stop_service(self, uid: str) -> None:
        replica = self.replicas.pop(uid, None)
        self.serving.pop(uid, None)
        await self._stop_replica(replica[0] if replica else None, self._service_pods(uid))
