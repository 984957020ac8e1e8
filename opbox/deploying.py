"""``opbox.deploy("module:name")``: deploy by module, as a notebook does (its cells are not files)."""

from __future__ import annotations

import importlib
import inspect
import sys

from .errors import ValidationError


def deploy(target: str, **options):
    """Deploy the function or class ``name`` of module ``module`` (importable from here: a notebook's folder
    is) and return its remote handle. The module is imported again first, so edits to its file are taken.
    ``options`` go to ``.deploy()`` (``name``, ``resource``, ``client``, ``quiet``, ``root``...; a class's constructor
    arguments too). A plain function (without ``@operator()``) is deployed with the defaults."""
    module_name, _, qualname = target.partition(":")
    if not module_name or not qualname:
        raise ValidationError(f"deploy by module: give 'module:name', e.g. opbox.deploy(\"mymodule:fn\"); got {target!r}")
    module = sys.modules.get(module_name)
    module = importlib.reload(module) if module is not None else importlib.import_module(module_name)
    found = module
    for part in qualname.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            raise ValidationError(f"module {module_name} ({module.__file__}) has no {qualname!r}") from None
    if inspect.isclass(found) and hasattr(found, "deploy"):
        return found.deploy(**options)
    if inspect.isclass(found):
        raise ValidationError(f"{target} is a class without @operator(); decorate it to serve it")
    if not hasattr(found, "deploy"):
        from .decorator import Operator

        found = Operator(found)
    return found.deploy(**options)
