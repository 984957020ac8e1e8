"""The simulated node's stand-in for the kaniko executor image (no registry to pull it from here).

A pod whose container image is a kaniko executor is run the way kaniko would run it, from
the same inputs, with the same effects:

    --context=s3://bucket/key.tar.gz   fetched with boto3 using the pod's env (S3_ENDPOINT,
                                       S3_FORCE_PATH_STYLE, AWS_REGION, the AWS keys from the
                                       Secret in envFrom), unpacked
    --dockerfile, --destination        ``podman build`` of that context (no network, as in
                                       every build here), then ``podman push`` of each
                                       destination to the real registry, then the local tag is
                                       removed: whoever runs the image must pull it
    --insecure-registry=<host>         plain HTTP for that host (pull of the base image, push)
    /kaniko/.docker/config.json        the dockerconfigjson Secret mounted there: the push's
                                       credentials (``--authfile``)

Output goes to the pod's log, as kaniko's would; the exit code is the container's.
"""

from __future__ import annotations

import asyncio
import base64
import tarfile
import tempfile
from pathlib import Path
from urllib.parse import urlsplit


def is_kaniko(image: str) -> bool:
    repository = image.rsplit("@", 1)[0].rsplit(":", 1)[0] if "/" in image else image
    return repository.rsplit("/", 1)[-1] in ("executor", "kaniko") and "kaniko" in repository


def parse_args(args: list[str]) -> dict[str, list[str]]:
    flags: dict[str, list[str]] = {}
    for arg in args:
        name, _, value = arg.partition("=")
        flags.setdefault(name.lstrip("-"), []).append(value)
    return flags


def docker_config(store, namespace: str, pod: dict, container: dict) -> bytes | None:
    """The config.json mounted at /kaniko/.docker, if its Secret exists."""
    mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts") or []}
    for volume in pod["spec"].get("volumes") or []:
        if mounts.get(volume["name"]) != "/kaniko/.docker" or "secret" not in volume:
            continue
        secret = store.get("secrets", namespace, volume["secret"]["secretName"])
        if secret is None:
            return None
        for item in volume["secret"].get("items") or [{"key": ".dockerconfigjson", "path": "config.json"}]:
            if item["path"] == "config.json" and item["key"] in (secret.get("data") or {}):
                return base64.b64decode(secret["data"][item["key"]])
    return None


def _fetch_context(uri: str, env: dict[str, str], dest: Path) -> int:
    import boto3
    from botocore.config import Config

    parts = urlsplit(uri)
    path_style = env.get("S3_FORCE_PATH_STYLE", "").lower() == "true"
    client = boto3.client(
        "s3", endpoint_url=env.get("S3_ENDPOINT") or None, region_name=env.get("AWS_REGION") or "us-east-1",
        aws_access_key_id=env.get("AWS_ACCESS_KEY_ID"), aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY"),
        config=Config(signature_version="s3v4", s3={"addressing_style": "path" if path_style else "virtual"}))
    archive = dest / "context.tar.gz"
    client.download_file(parts.netloc, parts.path.lstrip("/"), str(archive))
    with tarfile.open(archive) as tar:
        tar.extractall(dest / "context", filter="data")
    return archive.stat().st_size


async def run_kaniko(podman: str, store, pod: dict, container: dict, env: dict[str, str], out) -> int:
    """Do what the kaniko executor would; returns its exit code. ``out`` is the pod's log (binary)."""

    def say(line: str) -> None:
        out.write(f"{line}\n".encode())
        out.flush()

    async def podman_step(*args: str) -> int:
        proc = await asyncio.create_subprocess_exec(podman, *args, stdin=asyncio.subprocess.DEVNULL, stdout=out,
                                                    stderr=asyncio.subprocess.STDOUT)
        return await proc.wait()

    flags = parse_args(list(container.get("args") or []))
    context = (flags.get("context") or [""])[0]
    destinations = flags.get("destination") or []
    insecure = set(flags.get("insecure-registry") or [])
    if not context.startswith("s3://") or not destinations:
        say("Error: kaniko needs --context=s3://... and --destination (this node emulates those only)")
        return 1
    with tempfile.TemporaryDirectory(prefix="fake-kaniko-") as tmp:
        work = Path(tmp)
        say(f"INFO Retrieving the build context from {context}")
        try:
            size = await asyncio.to_thread(_fetch_context, context, env, work)
        except Exception as exc:
            say(f"error resolving the build context: {type(exc).__name__}: {exc}")
            return 1
        say(f"INFO Build context unpacked ({size} bytes)")
        config = docker_config(store, pod["metadata"]["namespace"], pod, container)
        auth = []
        if config is not None:
            (work / "config.json").write_bytes(config)
            auth = ["--authfile", str(work / "config.json")]
        dockerfile = work / "context" / (flags.get("dockerfile") or ["Dockerfile"])[0]
        base_tls = ["--tls-verify=false"] if insecure else []
        tags = [arg for dest in destinations for arg in ("--tag", dest)]
        say(f"INFO Building {', '.join(destinations)}")
        code = await podman_step("build", "--layers", "--network=none", "--pull=missing", *base_tls, *auth, *tags,
                                 "--file", str(dockerfile), str(work / "context"))
        if code != 0:
            say(f"error building image: exit status {code}")
            return 1
        for dest in destinations:
            host = dest.split("/", 1)[0]
            tls = ["--tls-verify=false"] if host in insecure else []
            say(f"INFO Pushing image to {dest}")
            code = await podman_step("push", "--quiet", *tls, *auth, dest)
            if code != 0:
                say(f"error pushing image: failed to push to destination {dest}: exit status {code}")
                return 1
            say(f"INFO Pushed {dest}")
            await podman_step("untag", dest, dest)  # the runs must pull what was pushed
    return 0


def pull_secret_auth(store, namespace: str, pod: dict) -> bytes | None:
    """The first imagePullSecret's config.json, if any (for the node's own pulls)."""
    for ref in pod["spec"].get("imagePullSecrets") or []:
        secret = store.get("secrets", namespace, ref["name"])
        if secret and ".dockerconfigjson" in (secret.get("data") or {}):
            return base64.b64decode(secret["data"][".dockerconfigjson"])
    return None

