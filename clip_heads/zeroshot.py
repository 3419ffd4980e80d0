"""The zero-shot kernel: prompt ensembling, and scoring image vectors against class vectors.

Every zero-shot path of the package goes through here, so each rule is written once:

* **Ensembling** (:func:`ensemble`, :func:`class_vectors`): every prompt vector is
  L2-normalised, the prompts of a class are summed, and the sum is normalised again (CLIP's
  prompt ensembling; a sum and a mean give the same unit vector). It needs numpy alone and
  lives below the store, in :mod:`clip_heads.ensembling` (so that the store's
  ``PromptSet.class_vectors`` is it too); its names are re-exported here.
* **Similarity** (:func:`cosine`): L2-normalised image vectors against the unit class vectors.
* **Scoring** (:class:`ScoringRule`): CLIP's softmax over ``logit_scale * cos``, or SigLIP's
  independent ``sigmoid(logit_scale * cos + logit_bias)``. The scale and bias are the model's
  own, read from the store's attributes (:meth:`ScoringRule.from_attrs`) or from a loaded model
  (:meth:`ScoringRule.from_model`); a store that records none (schema 1) is scored as CLIP at
  :data:`CLIP_LOGIT_SCALE` (written once, in the family registry :mod:`clip_heads.backbones.families`).

Arrays in, arrays out: numpy inputs give float32 numpy results, torch tensors give tensors on
their own device and dtype. This module imports neither torch nor scikit-learn itself.

Users: ``clip-heads zero-shot`` (:mod:`clip_heads.evaluate`), the prompt ablation, top-k
retrieval, ``reproduce``, the fine-tune's zero-shot evaluation, and the prompt-based heads.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import numpy as np

from clip_heads.backbones.families import CLIP_LOGIT_SCALE, SIGMOID_FAMILIES, get_family
from clip_heads.ensembling import (class_vectors, ensemble, is_torch, l2_normalize, prompt_columns, template_mask,
                                   template_vectors)
from clip_heads.errors import BadValueError

__all__ = ["CLIP_LOGIT_SCALE", "SIGMOID_FAMILIES", "SCORINGS", "ScoringRule", "l2_normalize", "ensemble",
           "template_mask", "class_vectors", "template_vectors", "resolve_template_ids",
           "prompt_columns", "cosine", "predict"]

# CLIP_LOGIT_SCALE (100): CLIP's learned temperature, what its training clamps logit_scale at and
# where it ends; the family registry holds it, here it is the default for stores that record none.
# Families trained with the pairwise sigmoid loss (SigLIP, SigLIP 2) score with sigmoid + bias;
# SIGMOID_FAMILIES comes from the family registry (clip_heads.backbones.families).
SCORINGS = ("softmax", "sigmoid")


# ---------------------------------------------------------------------------------------
# Choosing templates (the ensembling itself: clip_heads.ensembling, re-exported above)
# ---------------------------------------------------------------------------------------
def resolve_template_ids(ps: Any, spec: Any) -> list[int] | None:
    """Template ids of ``ps`` from ids, an id string (``"0,3"``) or exact template texts; None = all."""
    if spec is None or (isinstance(spec, (list, tuple)) and not spec):
        return None
    items = [spec] if isinstance(spec, (str, int)) else list(spec)
    if len(items) == 1 and isinstance(items[0], str) and items[0] not in ps.templates \
            and all(p.strip().isdigit() for p in items[0].split(",")):
        items = items[0].split(",")
    ids = []
    for t in items:
        i = ps.templates.index(t) if t in ps.templates else int(t) if str(t).strip().isdigit() else -1
        if not 0 <= i < len(ps.templates):
            listing = "; ".join(f"{j}: {tpl}" for j, tpl in enumerate(ps.templates))
            raise BadValueError(f"prompt set {ps.name!r} has no template {t!r}; its templates are {listing}")
        ids.append(i)
    return ids


# ---------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------
def cosine(X: Any, V: Any) -> Any:
    """Cosine of each image with each class: ``l2_normalize(X) @ V.T``, ``(n, C)``; ``V`` unit rows."""
    return l2_normalize(X) @ V.T


def predict(X: Any, V: Any) -> Any:
    """The class of highest cosine per image (every rule below ranks classes by cosine)."""
    return cosine(X, V).argmax(1)


@dataclass(frozen=True)
class ScoringRule:
    """How a family turns cosines into class scores.

    ``softmax``: ``softmax(logit_scale * cos)`` over the classes (CLIP); ``sigmoid``:
    ``sigmoid(logit_scale * cos + logit_bias)`` per class (SigLIP). ``logit_scale`` is the
    temperature itself (CLIP's 100), not its logarithm.
    """

    scoring: str = "softmax"
    logit_scale: float = CLIP_LOGIT_SCALE
    logit_bias: float = 0.0

    def __post_init__(self) -> None:
        if self.scoring not in SCORINGS:
            raise ValueError(f"unknown zero-shot scoring {self.scoring!r}; valid: {', '.join(SCORINGS)}")
        for name in ("logit_scale", "logit_bias"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number; got {v!r}")
        if self.logit_scale <= 0:
            raise ValueError(f"logit_scale must be > 0 (it ranks classes by cosine); got {self.logit_scale!r}")

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> "ScoringRule":
        """The rule a store records: attrs ``scoring`` (or else the ``family``'s, from the
        family registry), ``logit_scale`` and ``logit_bias``, as the encode read them from the
        model; CLIP's softmax at :data:`CLIP_LOGIT_SCALE` for what a store does not record
        (schema 1). An unknown family is refused."""
        family = get_family(attrs.get("family") or None)
        scoring = str(attrs.get("scoring") or family.scoring)
        scale = attrs.get("logit_scale")
        bias = attrs.get("logit_bias")
        return cls(scoring, CLIP_LOGIT_SCALE if scale is None else float(scale), 0.0 if bias is None else float(bias))

    @classmethod
    def from_model(cls, model: Any) -> "ScoringRule":
        """The rule of a loaded Hugging Face model: its learned ``logit_scale`` (a log, as
        transformers stores it) and ``logit_bias`` if it has one; sigmoid for a model_type of
        the sigmoid families (SigLIP's "siglip", "siglip2"), softmax otherwise."""
        model_type = str(getattr(getattr(model, "config", None), "model_type", "clip"))
        sigmoid = any(model_type in get_family(f).model_classes for f in SIGMOID_FAMILIES)
        scale = float(model.logit_scale.detach().exp().reshape(-1)[0].item())
        bias = getattr(model, "logit_bias", None)
        return cls("sigmoid" if sigmoid else "softmax", scale,
                   0.0 if bias is None or not sigmoid else float(bias.detach().reshape(-1)[0].item()))

    def logits(self, cos: Any) -> Any:
        """``logit_scale * cos`` (+ ``logit_bias`` for sigmoid; a softmax ignores a constant)."""
        out = self.logit_scale * cos
        return out + self.logit_bias if self.scoring == "sigmoid" else out

    def scores(self, cos: Any) -> Any:
        """The family's own class scores: softmax rows (sum 1), or per-class sigmoids."""
        z = self.logits(cos)
        if is_torch(z):
            import torch

            return torch.softmax(z, dim=-1) if self.scoring == "softmax" else torch.sigmoid(z)
        if self.scoring == "softmax":
            e = np.exp(z - z.max(-1, keepdims=True))
            return e / e.sum(-1, keepdims=True)
        return 1 / (1 + np.exp(-z))

    def distribution(self, cos: Any) -> Any:
        """A class distribution per image, for metrics that need one (top-k, merged classes,
        soft labels): the softmax itself, or the sigmoids renormalised to sum to 1. Its argmax
        is always the class of highest cosine."""
        s = self.scores(cos)
        return s if self.scoring == "softmax" else s / s.sum(-1, keepdims=True)

    def describe(self) -> str:
        if self.scoring == "softmax":
            return f"softmax over {self.logit_scale:g} * cos"
        return f"sigmoid({self.logit_scale:g} * cos {self.logit_bias:+g})"

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), text=self.describe())
