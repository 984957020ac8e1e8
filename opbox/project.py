"""What a deploy packs and what the runtime imports: the project root and the entry's dotted module.

A single file (``python main.py``) deploys its own folder, as it always has. A module of a package
(``python -m myproj.jobs.train``, or ``myproj.jobs.train`` imported) deploys its project: the
nearest folder at or above the package's holding one of ``ROOT_MARKERS`` (else the folder the
package is imported from), and the entry names the module the way Python imported it
(``myproj.jobs.train:fn``), so ``import myproj.utils`` works in the runtime as it does here.
``root=`` says which folder to pack.
"""

from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path

from .errors import ValidationError

ROOT_MARKERS = ("pyproject.toml", "setup.cfg", ".git", "requirements.txt")


def find_root(start: Path) -> Path | None:
    """The nearest folder at or above ``start`` holding one of ``ROOT_MARKERS``."""
    for folder in (start, *start.parents):
        if any((folder / marker).exists() for marker in ROOT_MARKERS):
            return folder
    return None


def imported_name(obj) -> str | None:
    """The dotted name Python imported ``obj``'s module under; ``python -m pkg.mod`` gives ``pkg.mod``
    (not ``__main__``); ``None`` for a script run by its path."""
    module = sys.modules.get(getattr(obj, "__module__", None) or "")
    spec = getattr(module, "__spec__", None)
    name = getattr(spec, "name", None) or getattr(module, "__name__", None)
    return None if name in (None, "__main__") else name


def module_path_name(path: Path, root: Path) -> str:
    """``myproj/jobs/train.py`` under ``root`` -> ``myproj.jobs.train``."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    if not parts or not all(part.isidentifier() for part in parts):
        raise ValidationError(f"{path} cannot be imported from {root} as a module: every folder on the way and the "
                              f"file must be Python names (letters, digits, _)")
    return ".".join(parts)


def check_deployable(fn) -> None:
    """Refuse, with what to do instead, what the runtime could never import by name."""
    name = getattr(fn, "__qualname__", getattr(fn, "__name__", repr(fn)))
    if getattr(fn, "__name__", "") == "<lambda>":
        raise ValidationError("a lambda cannot be deployed (the runtime imports a function by its name): use def, "
                              "i.e. write `def my_function(...):` at the top level of a .py file and decorate it "
                              "with @operator()")
    if "<locals>" in name:
        raise ValidationError(f"{name} is defined inside a function; deploy a module-level function")
    main = sys.modules.get("__main__")
    if getattr(fn, "__module__", None) == "__main__" and not getattr(main, "__file__", None):
        raise ValidationError(
            f"{name} is defined in the __main__ of an interactive session (a notebook or the Python prompt), which "
            f"the runtime cannot import: put it in a module beside it (say mymodule.py) and deploy it by module: "
            f"opbox.deploy(\"mymodule:{name}\")")


def source_of(fn, root: str | os.PathLike | None = None) -> tuple[Path, str]:
    """The folder to pack and the entry point (``dotted.module:qualname``) of a function or class."""
    check_deployable(fn)
    try:
        path = inspect.getsourcefile(inspect.unwrap(fn))
    except TypeError:
        path = None
    if not path or not path.endswith(".py") or not os.path.isfile(path):
        raise ValidationError(
            f"{fn.__qualname__} is defined in a notebook cell or at the interactive prompt; opbox deploys code from "
            f".py files: put it in a module beside the notebook (say mymodule.py) and deploy it by module: "
            f"opbox.deploy(\"mymodule:{fn.__qualname__}\")")
    path = Path(path).resolve()
    dotted = imported_name(fn)
    if root is not None:
        root = Path(root).resolve()
        if not root.is_dir():
            raise ValidationError(f"deploy root {root} is not a folder")
        if root != path.parent and root not in path.parents:
            raise ValidationError(f"{path} is not inside the deploy root {root}")
        module = module_path_name(path, root)
        if dotted is not None and dotted != module and "." in dotted:
            raise ValidationError(f"{fn.__qualname__} is imported here as {dotted} but from {root} it would be {module}:"
                                  f" give the folder {dotted.split('.')[0]} is imported from as the root")
        return root, f"{module}:{fn.__qualname__}"
    if dotted is None or "." not in dotted:  # a single file: its folder, as always
        return path.parent, f"{path.stem}:{fn.__qualname__}"
    depth = dotted.count(".") + (1 if path.name == "__init__.py" else 0)
    import_root = path.parents[depth]
    found = find_root(import_root) or import_root
    module = module_path_name(path, found)
    if module != dotted:
        raise ValidationError(
            f"{fn.__qualname__}'s module {dotted} is imported from {import_root}, but its project root {found} "
            f"(it holds {', '.join(m for m in ROOT_MARKERS if (found / m).exists())}) would import it as {module}: "
            f"deploy with root={str(import_root)!r} (and the requirements there), or import it as {module}")
    return found, f"{dotted}:{fn.__qualname__}"
