"""The two kinds of failure the library reports on purpose, and the exit code of each, chosen here.

* :class:`BadValueError` - a value the caller chose is not one of the valid ones: an option's
  value, a head parameter, a name to look up (a prompt set, a head). Fixing the command fixes
  it. Exit 2, as for click's own usage errors.
* Everything else the library raises for a reason it names - a missing or unreadable file, a
  damaged, incomplete or locked store, data that do not fit together, a full disk - is failed
  work. Exit 1.

Error classes elsewhere that are bad values derive from :class:`BadValueError` (a head's
:class:`~clip_heads.heads.params.ParameterError`, an unknown prompt set, runs on different data
given to ``compare`` without ``--allow-mixed-data``); ``clip_heads.cli.friendly`` asks
:func:`exit_code` and prints the message as one line.
"""
from __future__ import annotations

__all__ = ["BadValueError", "USAGE_EXIT", "FAILURE_EXIT", "exit_code"]

USAGE_EXIT = 2  # bad usage and bad values
FAILURE_EXIT = 1  # failed work


class BadValueError(ValueError):
    """A value given by the caller is not valid; the message names it and what is valid."""


def exit_code(error: BaseException) -> int:
    """The CLI's exit code for a library error: :data:`USAGE_EXIT` for a bad value,
    :data:`FAILURE_EXIT` for failed work."""
    return USAGE_EXIT if isinstance(error, BadValueError) else FAILURE_EXIT
