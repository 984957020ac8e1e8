"""Check the import-linter contracts in pyproject.toml.

grimp, import-linter's engine, skips folders without ``__init__.py`` inside a package, and
``opbox.platform`` has none on purpose (the repo's top-level ``platform/`` must never shadow
the standard library's ``platform``). So the package is staged: copied (following the
symlinks) into a temporary folder, ``__init__.py`` added where Python would see a namespace
package, and ``lint-imports`` run there against the same contracts.

    python scripts/lint_imports.py [--inject MODULE:STATEMENT]   (--inject proves a contract can fail)
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def stage(dest: Path) -> Path:
    pkg = dest / "opbox"
    shutil.copytree(ROOT / "opbox", pkg, symlinks=False,
                    ignore=shutil.ignore_patterns("__pycache__", "templates", "*.pyc"))
    for folder, dirs, files in os.walk(pkg):
        if any(f.endswith(".py") for f in files) and "__init__.py" not in files:
            (Path(folder) / "__init__.py").write_text("")
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")
    return pkg


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--inject", action="append", default=[],
                        help="module path relative to opbox/ and a statement to append, e.g. platform/runs.py:import pickle")
    args = parser.parse_args()
    lint = Path(sys.executable).with_name("lint-imports")
    with tempfile.TemporaryDirectory() as tmp:
        pkg = stage(Path(tmp))
        for item in args.inject:
            rel, _, statement = item.partition(":")
            with open(pkg / rel, "a") as f:
                f.write(f"\n{statement}\n")
        env = {**os.environ, "PYTHONPATH": tmp}
        return subprocess.run([str(lint), "--config", "pyproject.toml", "--no-cache"], cwd=tmp, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
