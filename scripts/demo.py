"""`make demo`: start a fresh platform (its own OPBOX_HOME, a free port), run the quickstart, stop it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from platform_fixture import running_platform  # noqa: E402


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp) / "moonshot"
        shutil.copytree(ROOT / "examples" / "moonshot", project)
        with running_platform(Path(tmp) / "home") as plat:
            print(f"platform up on {plat.url}; running examples/moonshot/main.py", flush=True)
            env = {**os.environ, "OPBOX_URL": plat.url, "OPBOX_TOKEN": plat.token, "OPBOX_WORKSPACE": plat.workspace}
            return subprocess.run([sys.executable, "main.py"], cwd=project, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
