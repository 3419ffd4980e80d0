"""Older home of the backbone: the names it had, re-exported from :mod:`clip_heads.backbones`.

Loading any family, preprocessing and embedding now live in the :mod:`clip_heads.backbones`
package (one factory, :func:`~clip_heads.backbones.model.load_backbone`; the family registry
as data); which files a model is, in :mod:`clip_heads.identity`. Import from those; this module
keeps earlier imports working.
"""
from __future__ import annotations

from .backbones.model import Backbone, autocast_for, load_backbone, load_clip, resolve_device, resolve_precision
from .backbones.preprocess import Preprocess, ProcessorPreprocess, image_recipe
from .backbones.towers import as_embeddings
from .catalog import DEFAULT_MODEL, PRECISIONS
from .identity import ModelFiles, check_identity, model_identity, resolve_model, weights_hash

__all__ = ["DEFAULT_MODEL", "PRECISIONS", "Preprocess", "ProcessorPreprocess", "image_recipe", "resolve_device",
           "resolve_precision", "autocast_for", "LoadedClip", "load_clip", "load_backbone", "Backbone", "as_embeddings",
           # the model's identity, defined in clip_heads.identity
           "ModelFiles", "check_identity", "model_identity", "resolve_model", "weights_hash"]

LoadedClip = Backbone  # what load_clip returned before: model, tokenizer, processor, files, identity
