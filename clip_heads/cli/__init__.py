"""The `clip-heads` command line: parses options and calls the library, nothing more.

One module per group of commands, each registering its commands on the group in `app`:
`store_commands` (encode, merge, predict, prompts, info, verify), `head_commands` (zero-shot,
train-head, few-shot, evaluate, ablate-prompts, compare), `finetune_commands` (finetune, wise-ft,
generalisation), `report_commands` (demo, reproduce). What several commands share (path types,
option decorators, value parsing) is in `options`. A new command goes in its group's module; a new
group is a module here, imported below.
"""
from __future__ import annotations

from . import finetune_commands, head_commands, report_commands, store_commands  # noqa: F401 (they register the commands)
from .app import friendly, main

__all__ = ["friendly", "main"]
