"""``python -m opbox.runtime check``: import a version's entry once, at build time.

The builders run it in the version's own environment (the local virtualenv, the job image), so an
entry that cannot be imported (``No module named 'myproj'``, a syntax error, a missing requirement)
fails the deploy with its traceback instead of failing every call later. Importing runs the user's
module: that is the runtime's work, never the gateway's.
"""

from __future__ import annotations

import sys

from .execute import _user_tb, load_target


def main(entry: str, code_dir: str | None) -> int:
    try:
        target = load_target(entry, code_dir)
    except BaseException as exc:  # SystemExit and KeyboardInterrupt at import time are failures too
        print(f"opbox: importing the entry {entry} failed:\n{_user_tb(exc)}", file=sys.stderr, flush=True)
        return 1
    print(f"opbox: entry {entry} imports ({type(target).__name__})", flush=True)
    return 0
