"""Fuzz the gateway from its own OpenAPI document with schemathesis: no 5xx and no hang.

The path parameters are pinned to real objects (a workspace, a job, a finished run and a
sealed batch) so that generated requests reach the handlers instead of stopping at 404.
Size: OPBOX_FUZZ_EXAMPLES cases per operation (default 25).
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

from opbox import Jobs

CODE = "from opbox import operator\n\n@operator()\ndef fuzzed(x=1, y=2):\n    return [x, y]\n"


def test_no_server_errors_and_no_hangs(plat, client, tmp_path):
    (tmp_path / "fuzzmod.py").write_text(CODE)
    sys.path.insert(0, str(tmp_path))
    try:
        remote = importlib.import_module("fuzzmod").fuzzed.deploy(client=client, quiet=True)
    finally:
        sys.modules.pop("fuzzmod", None)
    run = Jobs("fuzzed", client).trigger()
    run.result(timeout=30)
    remote.map([1, 2], progress=False)
    batch_id = client.get("/job/fuzzed/runs", params={"limit": 1}).json()["runs"][0]["batch_id"]
    config = tmp_path / "schemathesis.toml"
    config.write_text(
        "[parameters]\n"
        f'"path.workspace" = "{plat.workspace}"\n'
        '"path.job" = "fuzzed"\n'
        f'"path.run" = "{run.id}"\n'
        f'"path.batch" = "{batch_id}"\n'
    )
    st = Path(sys.executable).with_name("st")
    examples = os.environ.get("OPBOX_FUZZ_EXAMPLES", "25")
    out = subprocess.run(
        [str(st), "--config-file", str(config), "run", f"{plat.url}/openapi.json", "--checks", "not_a_server_error",
         "-H", f"Authorization: Bearer {plat.token}", "--max-examples", examples, "--request-timeout", "30",
         "--workers", "2", "--seed", "1", "--no-color"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path)
    summary = out.stdout[out.stdout.find("SUMMARY"):]
    assert out.returncode == 0, summary or out.stdout[-3000:] + out.stderr[-2000:]
    assert "passed" in summary and "failed" not in summary.split("Test cases:")[1].split("\n")[1]
    assert client.get("/jobs").status_code == 200, "the gateway is still serving"
