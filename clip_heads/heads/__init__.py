"""Heads trained on cached CLIP vectors, looked up by name: ``HEADS["mlp"]``, ``make_head("mlp", {...})``."""
from __future__ import annotations

from typing import Any, Mapping

from clip_heads.catalog import HEAD_CLASSES, list_heads
from clip_heads.heads.base import Head
from clip_heads.heads.clap import CLAPHead
from clip_heads.heads.contrastive import ContrastiveHead
from clip_heads.heads.files import HeadFileError
from clip_heads.heads.gda import GDAHead
from clip_heads.heads.linear import LinearHead
from clip_heads.heads.lpp import LPPHead
from clip_heads.heads.mlp import MLPHead
from clip_heads.heads.params import ParameterError, check_names
from clip_heads.heads.prolip import ProLIPHead
from clip_heads.heads.registry import UnknownHeadError, head_class
from clip_heads.heads.tip_adapter import TipAdapterHead
from clip_heads.heads.zero_shot import ZeroShotHead, class_prompt_vectors
from clip_heads.heads.zs_lp import ZSLPHead

# Built from the one registry, catalog.HEAD_CLASSES: a new head is registered there alone.
HEADS: dict[str, type[Head]] = {name: head_class(name) for name in HEAD_CLASSES}


def get_head(name: str) -> type[Head]:
    """The head class registered under ``name``; :class:`UnknownHeadError` (a ``ValueError``)
    lists the valid names."""
    return head_class(name)


def make_head(name: str, params: Mapping[str, Any] | None = None) -> Head:
    """The head ``name`` built with ``params``, every parameter checked now rather than at ``fit``.

    Raises :class:`ParameterError` (one line: the parameter, what is valid, what was given)
    for an unknown parameter name - listing the head's parameters and a near miss - or a value
    of the wrong type or range; ``ValueError`` for an unknown head name.
    """
    cls = get_head(name)
    params = dict(params or {})
    check_names(f"the {name!r} head", params, cls._get_param_names())
    head = cls(**params)
    head._check_params()
    return head


__all__ = ["HEADS", "Head", "list_heads", "get_head", "make_head", "ParameterError", "HeadFileError", "UnknownHeadError",
           "class_prompt_vectors", "ZeroShotHead", "LinearHead", "MLPHead", "ContrastiveHead", "TipAdapterHead",
           "ZSLPHead", "CLAPHead", "LPPHead", "GDAHead", "ProLIPHead"]
