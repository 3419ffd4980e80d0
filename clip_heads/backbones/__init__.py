"""The backbone layer: every vision-language family clip-heads loads, through one factory.

* :mod:`~clip_heads.backbones.families`: the family registry as data (``FAMILIES``) and which
  family a checkpoint is (from ``config.json``'s ``model_type``). No torch.
* :mod:`~clip_heads.backbones.preprocess`: the worker-side image recipes, equal to each
  family's own image processor.
* :mod:`~clip_heads.backbones.towers`: how a family's model embeds images and prompts.
* :mod:`~clip_heads.backbones.model`: :func:`load_backbone` / :class:`Backbone`, the one factory.
* :mod:`~clip_heads.backbones.losses`: SigLIP's pairwise sigmoid loss, for fine-tuning.

Names load from their modules on first use, so importing the package (or its registry) does
not import torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "families": ("CLIP_LOGIT_SCALE", "FamilySpec", "FAMILIES", "SIGMOID_FAMILIES", "DEFAULT_FAMILY", "list_families", "get_family",
                 "detect_family", "family_of_folder", "family_of_model", "supported_text"),
    "preprocess": ("Preprocess", "ProcessorPreprocess", "ImageRecipe", "image_recipe", "resample_code", "stack_batch"),
    "towers": ("as_embeddings", "image_inputs", "image_embeds", "image_features", "prepare_texts", "tokenize",
               "text_embeds", "text_max_length", "embed_dim", "pre_dim", "projection_matrix", "logit_values"),
    "model": ("FEATURES", "resolve_device", "resolve_precision", "autocast_for", "Backbone", "load_backbone",
              "load_clip", "encode_array"),
    "losses": ("sigmoid_loss",),
}
_MODULE_OF = {name: module for module, names in _WHERE.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
