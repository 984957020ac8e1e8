"""A notebook, run by nbclient on a kernel from this venv against a real gateway: ``opbox.configure`` at any
time (environment variables set after the first call count at the next ``configure()``), deploy by module,
the error for a function defined in a cell, and ``tqdm.auto`` progress (widgets) for a deploy and a map."""

from __future__ import annotations

import json
import textwrap

import nbformat
from nbclient import NotebookClient

MODULE = """
from opbox import operator

@operator()
def triple(x):
    return 3 * x
"""

CELLS = [
    # the first configuration, before the environment has the settings
    """
    import os, opbox
    from opbox.client import default_client
    opbox.configure(url="http://127.0.0.1:9", token="nobody")
    print("FIRST:", default_client().config.url, default_client().config.token)
    """,
    # settings exported afterwards, honoured by the next configure() from the environment
    """
    os.environ.update(OPBOX_URL={url!r}, OPBOX_TOKEN={token!r}, OPBOX_WORKSPACE={workspace!r})
    print("CONFIGURED:", opbox.configure().config.url)
    """,
    """
    triple = opbox.deploy("nbmod:triple")
    print("CALL:", triple(4))
    """,
    """
    print("MAP:", triple.map(range(5)))
    """,
    """
    def in_a_cell(x):
        return x
    try:
        opbox.operator()(in_a_cell).deploy()
    except opbox.ValidationError as exc:
        print("CELL ERROR:", exc)
    """,
]


def _text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.get("output_type") == "stream" and o.get("name") == "stdout")


def _widgets(cell) -> int:
    return sum("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in cell.outputs)


def test_notebook_configure_deploy_by_module_and_progress(plat, tmp_path):
    (tmp_path / "nbmod.py").write_text(MODULE)
    nb = nbformat.v4.new_notebook()
    values = {"url": plat.url, "token": plat.token, "workspace": plat.workspace}
    nb.cells = [nbformat.v4.new_code_cell(textwrap.dedent(c).strip().format(**values)) for c in CELLS]
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    first, configured, deployed, mapped, cell_error = nb.cells

    assert "FIRST: http://127.0.0.1:9 nobody" in _text(first)
    assert f"CONFIGURED: {plat.url}" in _text(configured)
    assert "CALL: 12" in _text(deployed)
    assert "MAP: [0, 3, 6, 9, 12]" in _text(mapped)
    assert 'opbox.deploy("mymodule:in_a_cell")' in _text(cell_error)
    # progress is a widget in Jupyter: the build's bar and the map's
    assert _widgets(deployed) >= 1 and _widgets(mapped) >= 1, json.dumps([c.outputs for c in nb.cells[2:4]])[:2000]
