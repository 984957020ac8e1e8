"""The gateway's image (builder/gateway_image.py), built with podman and started as
manifests/deployment.yaml starts it: its command and probes, its uid, a read-only root
filesystem with the data volume and a /tmp emptyDir, the ConfigMap's settings as env (the
endpoints pointed at this machine), the S3 keys of the opbox-s3 Secret; against the fake API
server and SeaweedFS."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from fake_kube import FakeKube, write_kubeconfig
from opbox.builder.gateway_image import UID, build_gateway_image
from opbox.builder.wheelhouse import Wheelhouse
from opbox.resource import parse_quantity
from podman_env import podman, wheelhouse  # noqa: F401 (fixtures)
from s3server import seaweedfs_with_bucket

MANIFESTS = Path(__file__).resolve().parents[1] / "manifests"
BUCKET = "opbox"
WORKSPACE, TOKEN = "imaged", "image-admin-token-0123456789"


def manifest(name: str) -> dict:
    return yaml.safe_load((MANIFESTS / name).read_text())


@pytest.fixture(scope="module")
def image(podman, wheelhouse, tmp_path_factory):
    return build_gateway_image(tmp_path_factory.mktemp("gateway-context"), Wheelhouse(wheelhouse))


@pytest.fixture(scope="module")
def s3():
    with seaweedfs_with_bucket(BUCKET) as server:
        yield server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_args(tmp: Path, kubeconfig: Path, s3, port: int) -> tuple[list[str], dict[str, str], dict]:
    """``podman run`` arguments doing what the Deployment's pod spec says, and its env."""
    deployment, config = manifest("deployment.yaml"), manifest("configmap.yaml")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    security = {**pod["securityContext"], **container["securityContext"]}
    assert security["runAsUser"] == security["runAsGroup"] == UID and security["runAsNonRoot"] is True
    env = dict(config["data"])
    env.update({"OPBOX_S3_ENDPOINT_URL": s3.endpoint_url, "AWS_REGION": s3.region,  # this machine's S3
                "AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key,  # the opbox-s3 Secret
                "OPBOX_WORKSPACE": WORKSPACE, "OPBOX_TOKEN": TOKEN,  # the optional opbox-admin Secret
                "OPBOX_PUBLIC_URL": f"http://127.0.0.1:{port}", "KUBECONFIG": "/etc/opbox/kube/config"})
    for item in container["env"]:
        env[item["name"]] = item.get("value") or "opbox-system"  # the fieldRef: the pod's namespace
    args = ["--network=host", "--user", f"{security['runAsUser']}:{security['runAsGroup']}",
            "-v", f"{kubeconfig}:/etc/opbox/kube/config:ro"]
    if security["readOnlyRootFilesystem"]:
        args.append("--read-only")
    volumes = {v["name"]: v for v in pod["volumes"]}
    for mount in container["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "emptyDir" in volume:
            size = int(parse_quantity(volume["emptyDir"].get("sizeLimit", "64Mi")))
            args += ["--tmpfs", f"{mount['mountPath']}:rw,size={size}"]
        elif "persistentVolumeClaim" in volume:
            data = tmp / mount["name"]
            data.mkdir()
            os.chown(data, UID, pod["securityContext"]["fsGroup"])  # what fsGroup does to the volume
            args += ["-v", f"{data}:{mount['mountPath']}"]
        else:  # the optional registry Secret: absent here
            assert volume["secret"]["optional"] is True
    command = list(container["command"])
    command[command.index("--port") + 1] = str(port)  # a free port: this machine is shared
    return args + ["--entrypoint", command[0]], env, {"command": command[1:], "container": container}


def test_the_gateway_image_runs_as_the_manifests_start_it(image, podman, s3, tmp_path):
    port = free_port()
    name = f"opbox-gateway-test-{port}"
    with FakeKube(tmp_path / "kube") as kube:
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", kube.url)
        kubeconfig.chmod(0o644)
        args, env, spec = run_args(tmp_path, kubeconfig, s3, port)
        started = subprocess.run([podman, "run", "-d", "--name", name, *[a for k in env for a in ("-e", k)], *args,
                                  image, *spec["command"]], env={**os.environ, **env}, capture_output=True, text=True)
        assert started.returncode == 0, started.stderr
        try:
            probe = spec["container"]["startupProbe"]["httpGet"]
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(url + probe["path"], timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                state = subprocess.run([podman, "inspect", "--format", "{{.State.Running}}", name],
                                       capture_output=True, text=True).stdout.strip()
                logs = subprocess.run([podman, "logs", name], capture_output=True, text=True)
                assert state == "true", f"the gateway exited:\n{logs.stdout}{logs.stderr}"
                assert time.monotonic() < deadline, f"no answer on {probe['path']}:\n{logs.stdout}{logs.stderr}"
                time.sleep(0.5)
            status = httpx.get(f"{url}/{WORKSPACE}/status", headers={"Authorization": f"Bearer {TOKEN}"}).json()
            assert status["backend"] == "kubernetes", status
            assert status["watches"]["jobs"]["relists"] >= 1, "its watches reached the (fake) API server"
            assert ("GET", "/apis/batch/v1/jobs") in kube.store.requests
            whoami = subprocess.run([podman, "exec", name, "id", "-u"], capture_output=True, text=True)
            assert whoami.stdout.strip() == str(UID)
            writes = subprocess.run([podman, "exec", name, "touch", "/opt/venv/x"], capture_output=True, text=True)
            assert writes.returncode != 0 and "Read-only file system" in writes.stderr
            assert any((tmp_path / "data").iterdir()), "its state is on the data volume"
        finally:
            subprocess.run([podman, "rm", "--force", "--time", "5", name], capture_output=True)
