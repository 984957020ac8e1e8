"""Fan-out on a cluster, both designs side by side, against the fake API server (tests/fake_kube)
with a simulated pod start of 2 s: a Job per map item (OPBOX_K8S_POOL_WORKERS=0) against warm
pools of worker pods, one Indexed Job per pool burst (platform/backends/kubernetes/workers.py).
Printed as JSON, never asserted.

    python bench/bench_kube_fanout.py [--items 10000] [--job-items 300] [--workers 20] [--inflight 20]

For each design: the Kubernetes objects created (Jobs, pods, Secrets, Events: what etcd stores and
the controllers work through), per item, the Job patches (the pool's Job growing), and items/s. A Job per item is measured on --job-items
(10,000 of them take hours on a 2-core machine running each pod with podman) and its 10,000-item
time extrapolated from its rate; the pool is measured on --items. The fake's API server, job
controller and kubelet are instantaneous apart from the start delay and podman: a real control
plane's limits (about 5 Jobs/s for a stock kube-controller-manager) come on top for Jobs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

CODE = "from opbox import operator\n\n@operator()\ndef square(x=2):\n    return x * x\n"


def measure(tmp: Path, name: str, items: int, env: dict, wheelhouse: Path) -> dict:
    from fake_kube import FakeKube
    from platform_fixture import running_platform

    with FakeKube(tmp / f"kube-{name}") as kube:
        kube.configure_node(pod_start_delay=2.0)
        settings = {"OPBOX_BACKEND": "kubernetes", "KUBECONFIG": str(kube.kubeconfig), "OPBOX_WORKSPACE": "bench",
                    "OPBOX_WHEELHOUSE": str(wheelhouse), "OPBOX_SANDBOX": "off", **env}
        with running_platform(tmp / f"home-{name}", extra_env=settings, timeout=60) as plat:
            code = tmp / f"code-{name}"
            code.mkdir()
            (code / f"fan_{name}.py").write_text(CODE)
            sys.path.insert(0, str(code))
            module = __import__(f"fan_{name}")
            remote = module.square.deploy(client=plat.client(), quiet=True)
            assert remote(3) == 9
            before, requests = dict(kube.state()["created"]), len(kube.store.requests)
            started = time.perf_counter()
            out = remote.map(range(items), progress=False)
            elapsed = time.perf_counter() - started
            assert out == [x * x for x in range(items)]
            created = {k: v - before.get(k, 0) for k, v in kube.state()["created"].items() if v - before.get(k, 0)}
            patches = sum(1 for method, path in kube.store.requests[requests:] if method == "PATCH" and "/jobs/" in path)
    total = sum(created.values())
    return {"items": items, "seconds": round(elapsed, 1), "items_per_s": round(items / elapsed, 1),
            "objects_created": created, "objects_per_item": round(total / items, 3), "job_patches": patches}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=10000)
    parser.add_argument("--job-items", type=int, default=300)
    parser.add_argument("--workers", type=int, default=20, help="OPBOX_K8S_POOL_WORKERS")
    parser.add_argument("--inflight", type=int, default=20, help="OPBOX_K8S_MAX_INFLIGHT (Jobs at once)")
    args = parser.parse_args()
    wheelhouse = Path(os.environ.get("OPBOX_WHEELHOUSE") or Path.home() / ".cache" / "opbox" / "wheelhouse")
    inflight = {"OPBOX_K8S_MAX_INFLIGHT": str(args.inflight), "OPBOX_K8S_WORKSPACE_INFLIGHT": str(args.inflight)}
    result = {"machine": {"cpus": os.cpu_count()}, "pod_start_delay_s": 2.0}
    with tempfile.TemporaryDirectory() as tmp:
        pools = measure(Path(tmp), "pool", args.items, {**inflight, "OPBOX_K8S_POOL_WORKERS": str(args.workers),
                                                        "OPBOX_K8S_ITEMS_PER_WORKER": "50"}, wheelhouse)
        print(json.dumps({"worker_pool": pools}), file=sys.stderr, flush=True)  # kept if the second part fails
        result["worker_pool"] = pools
        if args.job_items:  # --job-items 0: the pool only
            jobs = measure(Path(tmp), "jobs", args.job_items, {**inflight, "OPBOX_K8S_POOL_WORKERS": "0"}, wheelhouse)
            jobs["extrapolated_10000_items_s"] = round(10000 / jobs["items_per_s"])
            result["job_per_item"] = jobs
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
