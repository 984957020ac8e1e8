"""The simulated node's stand-in for rootless BuildKit (``buildctl-daemonless.sh build``; no registry to
pull ``moby/buildkit`` from here). A pod of that image is run the way BuildKit would run it, from the
same inputs, with the same effects, and nothing else:

    --opt context=<url>                fetched with plain HTTP(S), no credentials (a presigned URL),
                                       unpacked: a remote tarball context, as the dockerfile frontend does
    --opt filename=<Dockerfile>        ``podman build`` of it (no network, as every build here)
    --output type=image,name=<dest>,push=true[,registry.insecure=true]
                                       pushed to the real registry with the credentials of
                                       ``$DOCKER_CONFIG/config.json`` (the Secret mounted there): a
                                       ``registrytoken`` is sent as the bearer token as is, as BuildKit's
                                       docker auth provider does (so the registry's own check of the
                                       token's scope decides); an ``auth`` entry through ``podman push``
    --export-cache / --import-cache    not emulated (said in the log)

Output goes to the pod's log; the exit code is the container's.
"""

from __future__ import annotations

import asyncio
import base64
import json
import tarfile
import tempfile
from pathlib import Path
from urllib.parse import quote

import httpx


def is_buildkit(image: str) -> bool:
    repository = image.rsplit("@", 1)[0].rsplit(":", 1)[0]
    return repository.rsplit("/", 1)[-1] == "buildkit"


def _options(args: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """``--opt k=v`` as a dict, and ``--output``'s ``k=v,...`` as a dict."""
    opts, output = {}, {}
    for flag, value in zip(args, args[1:]):
        if flag == "--opt":
            key, _, val = value.partition("=")
            opts[key] = val
        elif flag == "--output":
            output = dict(part.partition("=")[::2] for part in value.split(","))
    return opts, output


def mounted_config(store, pod: dict, container: dict, env: dict[str, str]) -> dict:
    """The config.json under $DOCKER_CONFIG, from the Secret volume mounted there ({} without one)."""
    where = env.get("DOCKER_CONFIG", "")
    mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts") or []}
    for volume in pod["spec"].get("volumes") or []:
        if mounts.get(volume["name"]) != where or "secret" not in volume:
            continue
        secret = store.get("secrets", pod["metadata"]["namespace"], volume["secret"]["secretName"])
        for item in volume["secret"].get("items") or []:
            if secret and item["path"] == "config.json" and item["key"] in (secret.get("data") or {}):
                return json.loads(base64.b64decode(secret["data"][item["key"]]))
    return {}


def push_layout(layout: Path, dest: str, token: str, insecure: bool, say) -> bool:
    """Push the OCI layout's image to ``dest`` with ``Authorization: Bearer <token>`` (the registry API)."""
    host, _, rest = dest.partition("/")
    repo, _, tag = rest.rpartition(":")
    base = f"{'http' if insecure else 'https'}://{host}/v2/{repo}"
    headers = {"Authorization": f"Bearer {token}"}
    index = json.loads((layout / "index.json").read_text())
    manifest_desc = index["manifests"][0]

    def blob(digest: str) -> bytes:
        algorithm, _, hexdigest = digest.partition(":")
        return (layout / "blobs" / algorithm / hexdigest).read_bytes()

    manifest = json.loads(blob(manifest_desc["digest"]))
    with httpx.Client(timeout=60) as http:
        for desc in [manifest["config"], *manifest["layers"]]:
            if http.head(f"{base}/blobs/{desc['digest']}", headers=headers).status_code == 200:
                continue
            started = http.post(f"{base}/blobs/uploads/", headers=headers)
            if started.status_code != 202:
                say(f"error pushing image: {dest}: upload refused: HTTP {started.status_code} {started.text.strip()}")
                return False
            location = str(httpx.URL(f"{base}/").join(started.headers["location"]))
            location += ("&" if "?" in location else "?") + "digest=" + quote(desc["digest"])
            done = http.put(location, content=blob(desc["digest"]),
                            headers={**headers, "Content-Type": "application/octet-stream"})
            if done.status_code != 201:
                say(f"error pushing image: {dest}: blob refused: HTTP {done.status_code}")
                return False
        put = http.put(f"{base}/manifests/{tag}", content=blob(manifest_desc["digest"]),
                       headers={**headers, "Content-Type": manifest.get("mediaType") or manifest_desc["mediaType"]})
        if put.status_code != 201:
            say(f"error pushing image: {dest}: manifest refused: HTTP {put.status_code} {put.text.strip()}")
            return False
    return True


async def run_buildkit(podman: str, store, pod: dict, container: dict, env: dict[str, str], out) -> int:
    """Do what ``buildctl-daemonless.sh build`` would; returns its exit code. ``out`` is the pod's log."""

    def say(line: str) -> None:
        out.write(f"{line}\n".encode())
        out.flush()

    async def podman_step(*args: str) -> int:
        proc = await asyncio.create_subprocess_exec(podman, *args, stdin=asyncio.subprocess.DEVNULL, stdout=out,
                                                    stderr=asyncio.subprocess.STDOUT)
        return await proc.wait()

    args = list(container.get("args") or [])
    opts, output = _options(args)
    dest, url = output.get("name", ""), opts.get("context", "")
    if args[:1] != ["build"] or not url.startswith(("http://", "https://")) or output.get("push") != "true" or not dest:
        say("error: this node emulates `buildctl build` of an http(s) context with --output type=image,push=true only")
        return 1
    with tempfile.TemporaryDirectory(prefix="fake-buildkit-") as tmp:
        work = Path(tmp)
        say("#1 [internal] load remote build context")
        try:
            async with httpx.AsyncClient(timeout=60, follow_redirects=True) as http:
                answer = await http.get(url)
            answer.raise_for_status()
            (work / "context.tar.gz").write_bytes(answer.content)
            with tarfile.open(work / "context.tar.gz") as tar:
                tar.extractall(work / "context", filter="data")
        except Exception as exc:
            say(f"error: failed to load the build context: {type(exc).__name__}: {exc}")
            return 1
        say(f"#1 DONE ({len(answer.content)} bytes)")
        if "--export-cache" in args:
            say("(the registry cache is not emulated by the fake node)")
        local = f"localhost/fake-buildkit-{pod['metadata']['uid'][:12]}:build"
        code = await podman_step("build", "--layers", "--network=none", "--pull=missing", "--tag", local,
                                 "--file", str(work / "context" / opts.get("filename", "Dockerfile")),
                                 str(work / "context"))
        if code != 0:
            say(f"error: failed to solve: process did not complete successfully: exit code: {code}")
            return 1
        try:
            config = mounted_config(store, pod, container, env)
            host = dest.split("/", 1)[0]
            entry = (config.get("auths") or {}).get(host) or {}
            insecure = output.get("registry.insecure") == "true"
            say(f"#9 exporting to image, pushing {dest}")
            if entry.get("registrytoken"):
                if await podman_step("push", "--quiet", local, f"oci:{work / 'layout'}:build") != 0:
                    say("error: could not export the image")
                    return 1
                ok = await asyncio.to_thread(push_layout, work / "layout", dest, entry["registrytoken"], insecure, say)
            else:
                auth = []
                if config:
                    (work / "config.json").write_text(json.dumps(config))
                    auth = ["--authfile", str(work / "config.json")]
                tls = ["--tls-verify=false"] if insecure else []
                ok = await podman_step("push", "--quiet", *tls, *auth, local, dest) == 0
            if not ok:
                say(f"error: failed to push {dest}")
                return 1
            say(f"#9 DONE pushed {dest}")
        finally:
            await podman_step("rmi", "--force", local)
    return 0
