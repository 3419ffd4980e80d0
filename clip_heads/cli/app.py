"""The `clip-heads` group: logging and progress for -q/-v, and `friendly`, which turns library
errors into one line with the exit code clip_heads.errors chooses."""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import sys

import click

__all__ = ["friendly", "main"]


logger = logging.getLogger("clip_heads")


# Everything the library raises for bad input or a bad file becomes one line; clip_heads.errors
# chooses its exit code (2 for a bad value, 1 for failed work).
_USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, KeyError, NotADirectoryError, PermissionError)


class _LibraryError(click.ClickException):
    """A library error as click prints it (``Error: ...``), with the exit code chosen for it."""

    def __init__(self, error: BaseException, message: str) -> None:
        from ..errors import exit_code

        super().__init__(message)
        self.exit_code = exit_code(error)


def friendly(fn):
    """Turn library errors into one clear line and a non-zero exit, no traceback: bad values
    (exit 2), bad input or a damaged file, a full disk, a store another process is writing
    (exit 1), and Ctrl-C (exit 130)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from ..fsutil import LockedError, is_disk_full
        from ..interrupts import INTERRUPTED

        if hasattr(signal, "SIGXFSZ"):
            # Past the file-size limit a write fails with EFBIG (a clean "disk full" line)
            # instead of the kernel killing the process.
            with contextlib.suppress(ValueError):
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except KeyboardInterrupt:
            click.echo(INTERRUPTED, err=True)
            # Not sys.exit: a Ctrl-C that landed inside C-level code (an extension running
            # Python source while torch imports, say) leaves CPython's "unhandled interrupt"
            # flag set, and the interpreter would then end itself by SIGINT instead of 130.
            # Everything of ours was closed by the finally blocks the interrupt went through.
            from ..interrupts import running_as_cli

            if not running_as_cli():  # click's test runner, or a program calling main() itself
                sys.exit(130)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
        except LockedError as e:
            raise _LibraryError(e, str(e)) from None
        except _USER_ERRORS as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            raise _LibraryError(e, str(msg)) from None
        except OSError as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            if is_disk_full(e) and "disk full" not in msg:
                msg = f"disk full: {msg}; free space and rerun the same command"
            raise click.ClickException(msg if "disk full" in msg or e.errno is None else f"{type(e).__name__}: {msg}") from None

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="clip-heads")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars and no INFO lines; warnings and errors still shown.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.pass_context
def main(ctx: click.Context, quiet: bool, verbose: bool) -> None:
    """Encode a dataset once with a frozen vision-language model, then train and evaluate light heads in seconds."""
    # -q silences progress, never warnings: a user must still see "k is larger than a class".
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("clip_heads").setLevel(level)
    for noisy in ("transformers", "httpx", "httpx2", "huggingface_hub", "urllib3", "h5py"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.ERROR)
    _library_progress_bars(ctx, not quiet)
    ctx.obj = {"progress": not quiet}


def _library_progress_bars(ctx: click.Context, on: bool) -> None:
    """transformers' and huggingface_hub's own bars ("Loading weights", downloads) follow -q as ours do.

    Neither library is imported for this (``clip-heads -q info`` stays light): the environment
    variable both read at import is set for this command, and libraries already imported (a
    second command in one process) are switched directly.
    """
    import os

    if not on:
        key, before = "HF_HUB_DISABLE_PROGRESS_BARS", os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")
        os.environ[key] = "1"
        ctx.call_on_close(lambda: os.environ.__setitem__(key, before) if before is not None else os.environ.pop(key, None))
    elif os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS"):
        return  # the user turned them off
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

        (enable_progress_bars if on else disable_progress_bars)()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        (hf_logging.enable_progress_bar if on else hf_logging.disable_progress_bar)()

