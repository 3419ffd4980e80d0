"""The one-line answer to Ctrl-C, from the first moment of a `clip-heads` process.

The CLI's commands turn KeyboardInterrupt into :data:`INTERRUPTED` and exit 130 (see
``cli.friendly``). Before a command runs, Python is still importing the package (torch alone
takes seconds); :func:`install_cli_excepthook` covers that window. ``clip_heads/__init__`` calls
it first thing, and only when this process is the `clip-heads` command: a library import never
changes how a user's own program reports its exceptions.
"""
from __future__ import annotations

import os
import sys

INTERRUPTED = "interrupted: rerun the same command to resume where it stopped"


def running_as_cli() -> bool:
    """Whether this process is the `clip-heads` console script or ``python -m clip_heads.cli``."""
    if os.path.basename(sys.argv[0] if sys.argv else "") in ("clip-heads", "clip-heads.exe", "clip-heads-script.py"):
        return True
    argv = list(getattr(sys, "orig_argv", []))
    return any(a == "-m" and argv[i + 1:i + 2] in (["clip_heads.cli"], ["clip_heads"]) for i, a in enumerate(argv))


def install_cli_excepthook() -> None:
    """Print :data:`INTERRUPTED` instead of a traceback when Ctrl-C ends the process outside a
    command (while importing), and exit 130 as the commands do."""
    previous = sys.excepthook

    def hook(kind, value, tb):
        if issubclass(kind, KeyboardInterrupt):
            try:
                sys.stderr.write(f"\n{INTERRUPTED}\n")
                sys.stderr.flush()
            finally:
                os._exit(130)
        previous(kind, value, tb)

    sys.excepthook = hook
