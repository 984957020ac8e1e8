"""A real platform for tests and benches: ``opbox up --port 0`` in a subprocess, on loopback.

The gateway announces its address on its first line; credentials are in its home's
credentials.json. ``running_platform`` stops it (and its workers) on exit.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from opbox.client import Client
from opbox.config import ClientConfig

OPBOX = [sys.executable, "-m", "opbox.cli"]


@dataclass
class RunningPlatform:
    home: Path
    url: str
    token: str
    workspace: str
    proc: subprocess.Popen
    env: dict = field(default_factory=dict)

    def client(self, token: str | None = None, workspace: str | None = None) -> Client:
        return Client(ClientConfig(self.url, token or self.token, workspace or self.workspace))

    def http(self, token: str | None = None) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {token or self.token}"}, timeout=60)

    def log(self) -> str:
        return (self.home / "gateway.log").read_text(errors="replace")

    def kill(self, sig=signal.SIGKILL) -> None:
        self.proc.send_signal(sig)
        self.proc.wait(30)


def start(home: Path, port: int = 0, extra_env: dict | None = None, timeout: float = 30) -> RunningPlatform:
    home.mkdir(parents=True, exist_ok=True)
    # most tests hand host folders to user code (marker files, data): they run unsealed; the sandbox
    # (OPBOX_SANDBOX=auto, the product's default) has its own end-to-end tests in test_sandbox.py
    env = {**os.environ, "OPBOX_HOME": str(home), "PYTHONUNBUFFERED": "1", "OPBOX_SANDBOX": "off", **(extra_env or {})}
    for name in ("OPBOX_URL", "OPBOX_TOKEN", "OPBOX_WORKSPACE"):
        if extra_env is None or name not in extra_env:
            env.pop(name, None)
    log = open(home / "gateway.log", "ab")
    proc = subprocess.Popen([*OPBOX, "up", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    url = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"platform exited with {proc.returncode}:\n{(home / 'gateway.log').read_text()}")
        match = re.search(r"opbox gateway on (http://\S+)", (home / "gateway.log").read_text(errors="replace"))
        if match:
            url = match.group(1)
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
        time.sleep(0.05)
    else:
        proc.kill()
        raise RuntimeError(f"platform did not start in {timeout} s:\n{(home / 'gateway.log').read_text()}")
    creds = json.loads((home / "credentials.json").read_text())
    return RunningPlatform(home, url, creds["token"], creds["workspace"], proc, env)


def stop(plat: RunningPlatform) -> None:
    if plat.proc.poll() is None:
        plat.proc.send_signal(signal.SIGTERM)
        try:
            plat.proc.wait(15)
        except subprocess.TimeoutExpired:
            plat.proc.kill()
            plat.proc.wait(5)


@contextmanager
def running_platform(home: Path, **kwargs):
    plat = start(home, **kwargs)
    try:
        yield plat
    finally:
        stop(plat)


class Gateway:
    """One of several gateways sharing a home and a database (OPBOX_DATABASE_URL in ``env``), with a log of its
    own (``gateway-{name}.log``); ``http`` calls its workspace "default" with ``token``."""

    def __init__(self, home: Path, name: str, env: dict, token: str):
        self.log_path = home / f"gateway-{name}.log"
        self.proc = subprocess.Popen([sys.executable, "-m", "opbox.cli", "up", "--port", "0"], env=env,
                                     stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            match = re.search(r"opbox gateway on (http://\S+)", self.log())
            if match:
                self.url = match.group(1)
                try:
                    if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"gateway {name} did not start:\n{self.log()}")
            time.sleep(0.1)
        self.http = httpx.Client(base_url=f"{self.url}/default", headers={"Authorization": f"Bearer {token}"},
                                 timeout=120)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def leads(self) -> bool:
        return "leads: it fires schedules" in self.log()

    def stop(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
