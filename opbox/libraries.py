"""The libraries a pickle's objects come from, with their versions, so that a payload that cannot be
unpickled names the library whose versions differ between the side that pickled it and this one
("pandas 3.1.1 on the caller, 2.2.3 in the job")."""

from __future__ import annotations

import importlib.metadata
import io
import pickle
import sys
import types

_SKIP = frozenset(sys.stdlib_module_names) | {"builtins", "__main__", "cloudpickle", "opbox"}
_versions: dict[str, str | None] = {}
_pickler = None


def _recording_pickler():
    """cloudpickle's Pickler, noting the module of each object's class (and of classes and functions pickled
    themselves). The C pickler calls ``reducer_override`` for objects other than plain ints, floats, strings,
    bytes and containers, as cloudpickle's own override already is: so the bulk of a payload costs nothing more."""
    global _pickler
    if _pickler is None:
        import cloudpickle

        class Recording(cloudpickle.Pickler):
            def __init__(self, file, buffer_callback=None):
                super().__init__(file, protocol=5, buffer_callback=buffer_callback)
                self.modules: set[str] = set()

            def reducer_override(self, obj):
                named = isinstance(obj, (type, types.FunctionType, types.BuiltinFunctionType))
                self.modules.add(getattr(obj, "__module__", None) or "" if named else type(obj).__module__)
                return super().reducer_override(obj)

        _pickler = Recording
    return _pickler


def dumps(value) -> tuple[bytes, dict[str, str]]:
    """``value`` pickled, and the versions of the libraries (top-level packages) its objects' classes are from."""
    with io.BytesIO() as file:
        pickler = _recording_pickler()(file)
        pickler.dump(value)
        return file.getvalue(), versions(pickler.modules)


OUT_OF_BAND_MIN = 64 * 1024  # smaller buffers stay in the pickle stream: a piece of their own is not worth it


class _Pieces(list):
    """A file the pickler writes to that keeps the ``bytes`` objects it is handed as they are: its frames (which it
    gives away) and, written in one call as the object itself, a large ``bytes`` value, which so joins the stream
    uncopied. Anything else is copied (a view's memory may go before the upload)."""

    def write(self, data) -> int:
        self.append(data if type(data) is bytes else bytes(data))
        return len(data)


def dumps_out_of_band(value) -> tuple[list, list[memoryview], dict[str, str]]:
    """``dumps`` as the pickle stream's pieces (large ``bytes`` values among them, uncopied), with the data of
    buffers of at least ``OUT_OF_BAND_MIN`` bytes (numpy arrays, pandas blocks; pickle protocol 5) left out of
    the stream and returned as views of the objects' own memory, uncopied."""
    buffers: list[memoryview] = []

    def keep(buffer: pickle.PickleBuffer):
        try:
            raw = buffer.raw()
        except BufferError:  # not contiguous: pickled in the stream
            return True
        if raw.nbytes < OUT_OF_BAND_MIN:
            return True  # in the stream
        buffers.append(raw)
        return False

    file = _Pieces()
    pickler = _recording_pickler()(file, buffer_callback=keep)
    pickler.dump(value)
    return file, buffers, versions(pickler.modules)


def versions(modules) -> dict[str, str]:
    found = {}
    for top in {(m or "").partition(".")[0] for m in modules}:
        if top and top not in _SKIP and not top.startswith("_"):
            version = _version(top)
            if version is not None:
                found[top] = version
    return found


def _version(top: str) -> str | None:
    if top not in _versions:
        version = getattr(sys.modules.get(top), "__version__", None)
        if not isinstance(version, str):
            try:
                version = importlib.metadata.version(top)
            except (importlib.metadata.PackageNotFoundError, ValueError):
                version = None
        _versions[top] = version
    return _versions[top]


def differences(recorded: dict | None, pickled_by_caller: bool) -> str:
    """The libraries whose version here differs from the one the payload was pickled with, in words ('' if none)."""
    there, here = ("on the caller", "in the job") if pickled_by_caller else ("in the job", "on the caller")
    out = []
    for top, theirs in sorted((recorded or {}).items()):
        ours = _version(top) if top in sys.modules else _installed(top)
        if ours != theirs:
            out.append(f"{top} {theirs} {there}, {ours or 'not installed'} {here}")
    return "; ".join(out)


def _installed(top: str) -> str | None:
    try:
        return importlib.metadata.version(top)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None
