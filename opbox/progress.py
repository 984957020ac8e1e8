"""Progress where someone watches: a ``tqdm.auto`` bar (a widget in Jupyter, text on a terminal), and
nothing but plain lines in logs and CI."""

from __future__ import annotations

import sys


def interactive() -> bool:
    """Whether someone watches: this runs in a Jupyter kernel, or stderr is a terminal."""
    if "ipykernel" in sys.modules:
        try:
            if get_ipython().__class__.__name__ == "ZMQInteractiveShell":  # noqa: F821 (IPython's builtin)
                return True
        except NameError:
            pass
    return sys.stderr.isatty()


def progress_bar(progress: bool | None, total: int | None, unit: str, desc: str = "map"):
    """A ``tqdm.auto`` bar when ``progress`` (``None``: when ``interactive()``), else None."""
    if progress is None:
        progress = interactive()
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit=unit, desc=desc, file=sys.stderr)


class BuildOutput:
    """A deploy's build log: a bar showing its latest line where someone watches, else ``[build]`` lines on
    stderr (the whole log also comes with a ``BuildError``); nothing when ``quiet``."""

    def __init__(self, name: str, quiet: bool):
        self.quiet = quiet
        self.bar = None if quiet else progress_bar(None, None, "line", f"build {name}")

    def __enter__(self) -> "BuildOutput":
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()

    def line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text.strip()[-100:], refresh=False)
            self.bar.update(1)
        elif not self.quiet:
            print(f"[build] {text}", file=sys.stderr, flush=True)
