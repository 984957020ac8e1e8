"""A fake Kubernetes API server for tests: real HTTP on 127.0.0.1, a stateful store with watches,
strict validation of every object created, and a simulated node that runs each Job's pod with
podman from its image. See api.py (the REST surface), store.py (state, resourceVersions,
watch history) and node.py (what the job controller and the kubelet would do).

    with FakeKube(tmp_path) as kube:
        env = {"KUBECONFIG": str(kube.kubeconfig)}   # the kubernetes client talks to it
        ...
        assert kube.state()["rejected"] == []
"""

from __future__ import annotations

import copy
from pathlib import Path

import httpx
import yaml

from servers import serve_app

from .api import Api
from .node import Node
from .scheduler import DEFAULT_NODE
from .store import Store


def wait_for(predicate, timeout: float = 30, what: str = "condition"):
    """``predicate()``'s first truthy value, polled until ``timeout`` (then AssertionError naming ``what``)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what} did not happen within {timeout} s")


def write_kubeconfig(path: Path, server: str, token: str = "fake-token") -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": server}}],
        "users": [{"name": "fake", "user": {"token": token}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
    }))
    return path


class FakeKube:
    def __init__(self, folder: Path, validator=None):
        from k8s_schemas import ManifestValidator

        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.store = Store()
        self.node = Node(self.store, log_dir=self.folder / "pods")
        self.node.log_dir.mkdir(exist_ok=True)
        self.api = Api(self.store, self.node, validator or ManifestValidator())
        self.store.create("nodes", copy.deepcopy(DEFAULT_NODE))
        self._serving = None
        self.url = ""
        self.kubeconfig = self.folder / "kubeconfig"

    def __enter__(self) -> "FakeKube":
        self._serving = serve_app(self.api.app(), lifespan="on")
        self.url = self._serving.__enter__()
        write_kubeconfig(self.kubeconfig, self.url)
        return self

    def __exit__(self, *exc) -> None:
        try:
            httpx.post(self.url + "/_fake/disconnect", timeout=10)
        except httpx.HTTPError:
            pass
        self._serving.__exit__(*exc)
        self.node.remove_containers()

    # -- test hooks (over HTTP, like everything else) -------------------------------------
    def state(self) -> dict:
        return httpx.get(self.url + "/_fake/state", timeout=10).json()

    def compact(self) -> None:
        httpx.post(self.url + "/_fake/compact", timeout=10).raise_for_status()

    def expire(self) -> None:
        """Compaction passed every watch: they end now and must list again."""
        httpx.post(self.url + "/_fake/expire", timeout=10).raise_for_status()

    def disconnect(self) -> None:
        httpx.post(self.url + "/_fake/disconnect", timeout=10).raise_for_status()

    def evict(self, namespace: str, pod: str, message: str | None = None) -> None:
        """The kubelet evicts ``pod`` (node pressure): DisruptionTarget, phase Failed, reason Evicted."""
        httpx.post(self.url + "/_fake/evict", json={"namespace": namespace, "name": pod, "message": message},
                   timeout=10).raise_for_status()

    def lose_node(self, node: str = "fake-node") -> list[str]:
        """``node`` stops answering: its pods get DisruptionTarget and are deleted."""
        resp = httpx.post(self.url + f"/_fake/nodes/{node}/lose", timeout=10)
        resp.raise_for_status()
        return resp.json()["pods"]

    def configure_node(self, **settings) -> dict:
        """``hold_rollouts=True``: new Knative revisions wait before becoming ready; ``pod_start_delay``:
        seconds each pod takes to start once bound; ``progress_deadline``:
        seconds a revision may take to be ready before it fails (Knative's default 600); ``pull_failures``:
        {image: n}, its next n pulls fail with a registry's 429."""
        resp = httpx.post(self.url + "/_fake/node", json=settings, timeout=10)
        resp.raise_for_status()
        return resp.json()
