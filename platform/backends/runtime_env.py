"""The runtime's environment contract, written once for every backend.

``python -m opbox.runtime`` (runtime/__main__.py, worker.py, batch.py, serve.py) learns what
to run and whom to report to from these variables only. Every spawn site (a local process,
a podman container, a Kubernetes Job or Knative Service) gets them from ``runtime_env``, so
a new backend cannot forget one and a new variable is added in one place. How they reach
the process (inherited environment, ``podman -e``, a pod template) stays the backend's.
"""

from __future__ import annotations

import hashlib
import os

from opbox.otel import ENDPOINT_VARS

from .base import ServiceInfo, VersionInfo


def runtime_env(version: VersionInfo, *, in_image: bool = False, gateway_url: str | None = None,
                worker: tuple[str, str, str] | None = None, run: tuple[str, str] | None = None,
                serve: ServiceInfo | None = None, replica: str | None = None, init_file: str | None = None,
                init_url: str | None = None, replica_token: str | None = None,
                secrets: bool = False, caller: str | None = None) -> dict[str, str]:
    """The variables for one runtime process of ``version``.

    ``in_image``: the code is the image's (``Artifact.image_code_dir``), not a folder here.
    ``worker``: (pool id, worker id, pool token) of a warm worker; ``run``: (run id, run token)
    of a one-shot run; ``serve``: a replica of this service, named ``replica``, reading its
    constructor's arguments from ``init_file`` or, ``init_url``, from the gateway (with the run token,
    checked against their digest: a cluster pod has no file of ours, and an env var is too small).
    ``secrets``: with the values of the version's workspace secrets (``version.secret_env``), for
    spawn sites that hand the environment to a process directly (not those that write it into a
    manifest or a command line); the runtime's own variables win over theirs.
    ``caller``: the process's caller token (``backends/base.py``), ``OPBOX_TOKEN`` for the SDK in user code,
    which the runtime points at ``OPBOX_GATEWAY_URL`` and the version's workspace (jobs calling jobs).
    """
    artifact = version.artifact
    env = dict(version.secret_env) if secrets else {}
    env |= {"PYTHONUNBUFFERED": "1", "OPBOX_ENTRY": version.entry,
           "OPBOX_CODE_DIR": artifact.code_dir_in_image if in_image else artifact.code_dir}
    if gateway_url is not None:  # a cluster pod is told these by its template (identity_env)
        env["OPBOX_GATEWAY_URL"], env["OPBOX_WORKSPACE"] = gateway_url, version.workspace
    # the runtime's spans go where the gateway's do (the endpoints only: the exporter's headers may hold a secret)
    env |= {name: os.environ[name] for name in ENDPOINT_VARS if os.environ.get(name)}
    if worker is not None:
        env["OPBOX_POOL"], env["OPBOX_WORKER_ID"], env["OPBOX_WORKER_TOKEN"] = worker
    if run is not None:
        env["OPBOX_RUN_ID"], env["OPBOX_RUN_TOKEN"] = run
    if caller is not None:
        env["OPBOX_TOKEN"] = caller
    if init_file is not None:
        env["OPBOX_INIT_FILE"] = init_file
    if serve is not None:
        env["OPBOX_CONCURRENCY"], env["OPBOX_QUEUE"] = str(serve.concurrency), str(serve.queue)
        if replica is not None:
            env["OPBOX_SERVICE"], env["OPBOX_REPLICA"] = serve.name, replica
        if replica_token is not None:  # calls must carry it: other local processes share the loopback
            env["OPBOX_REPLICA_TOKEN"] = replica_token
        if init_url is not None and serve.init:
            env["OPBOX_INIT_URL"], env["OPBOX_INIT_SHA256"] = init_url, hashlib.sha256(serve.init).hexdigest()
    return env


def identity_env(gateway_url: str, workspace: str, job_id: str, version: int | str,
                 run_id: str | None = None) -> dict[str, str]:
    """What a cluster pod is told about itself and its gateway (the pod template sets these;
    the run token comes from a Secret). Users may not override them."""
    env = {"OPBOX_GATEWAY_URL": gateway_url, "OPBOX_WORKSPACE": workspace, "OPBOX_JOB_ID": job_id,
           "OPBOX_VERSION": str(version)}
    if run_id is not None:
        env["OPBOX_RUN_ID"] = run_id
    return env
