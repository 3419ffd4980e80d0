"""The heads by name: the one registry, :data:`clip_heads.catalog.HEAD_CLASSES` ("module:class"),
resolved to the classes here.

The head modules import :mod:`clip_heads.heads.base`, which loads and saves through
:mod:`clip_heads.heads.files`; a saved folder names its head, so loading needs the registry
without importing the package that imports them all. Both go through :func:`head_class`.
"""
from __future__ import annotations

import importlib

from clip_heads.catalog import HEAD_CLASSES, list_heads
from clip_heads.errors import BadValueError

__all__ = ["UnknownHeadError", "head_class"]


class UnknownHeadError(BadValueError):
    """A head name that is not registered (a bad value: exit 2)."""


def head_class(name: str) -> type:
    """The head class registered under ``name``; :class:`UnknownHeadError` lists the valid names."""
    where = HEAD_CLASSES.get(name) if isinstance(name, str) else None
    if where is None:
        raise UnknownHeadError(f"unknown head {name!r}; choose one of {list_heads()}")
    module, cls = where.split(":")
    return getattr(importlib.import_module(module), cls)
