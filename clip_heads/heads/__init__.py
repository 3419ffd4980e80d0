"""Heads trained on cached CLIP vectors, looked up by name: ``HEADS["mlp"]``, ``get_head("mlp")``."""
from __future__ import annotations

from clip_heads.heads.base import Head
from clip_heads.heads.contrastive import ContrastiveHead
from clip_heads.heads.linear import LinearHead
from clip_heads.heads.mlp import MLPHead
from clip_heads.heads.tip_adapter import TipAdapterHead
from clip_heads.heads.zero_shot import ZeroShotHead, class_prompt_vectors

HEADS: dict[str, type[Head]] = {
    "zero-shot": ZeroShotHead,
    "linear": LinearHead,
    "mlp": MLPHead,
    "contrastive": ContrastiveHead,
    "tip-adapter": TipAdapterHead,
}


def list_heads() -> list[str]:
    """Names of the registered heads, e.g. for ``click.Choice``."""
    return list(HEADS)


def get_head(name: str) -> type[Head]:
    """The head class registered under ``name``; ``ValueError`` lists the valid names."""
    try:
        return HEADS[name]
    except KeyError:
        raise ValueError(f"unknown head {name!r}; choose one of {list_heads()}") from None


__all__ = ["HEADS", "Head", "list_heads", "get_head", "class_prompt_vectors", "ZeroShotHead", "LinearHead",
           "MLPHead", "ContrastiveHead", "TipAdapterHead"]
