"""The SDK's public surface: ``opbox.__all__`` is exact, every name resolves, type checkers see each one."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import opbox
from opbox.config import ClientConfig

INIT = Path(opbox.__file__)


def _type_checking_names() -> set[str]:
    tree = ast.parse(INIT.read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING")
    return {alias.asname or alias.name for node in block.body for alias in node.names}


def test_all_is_exact():
    lazy = set(opbox._EXPORTS)
    assert set(opbox.__all__) == lazy | {"__version__"}
    assert len(opbox.__all__) == len(set(opbox.__all__))
    assert _type_checking_names() == lazy, "the TYPE_CHECKING imports and _EXPORTS must list the same names"
    public = {n for n in dir(opbox) if not n.startswith("_")}
    assert public == lazy


def test_every_public_name_resolves_to_its_module():
    for name, module in opbox._EXPORTS.items():
        value = getattr(opbox, name)
        assert getattr(sys.modules[f"opbox.{module}"], name) is value, name
    assert opbox.Job is opbox.Jobs  # the seed's plural name stays, the singular one is offered
    client = opbox.Client(ClientConfig(url="http://127.0.0.1:9", token="t", workspace="w"))
    assert repr(opbox.Jobs("train", client)) == "Job('train')"


def test_unknown_names_raise_attribute_error():
    try:
        opbox.no_such_name  # noqa: B018
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:
        raise AssertionError("opbox.no_such_name resolved")


def test_import_stays_lazy():
    code = "import sys, opbox; print(sorted(m for m in sys.modules if m.startswith(('httpx', 'opbox.'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == "[]"


def test_the_package_is_marked_typed():
    assert (INIT.parent / "py.typed").is_file()
