"""The zero-shot kernel: prompt ensembling, and scoring image vectors against class vectors.

Every zero-shot path of the package goes through here, so each rule is written once:

* **Ensembling** (:func:`ensemble`, :func:`class_vectors`): every prompt vector is
  L2-normalised, the prompts of a class are summed, and the sum is normalised again (CLIP's
  prompt ensembling; a sum and a mean give the same unit vector).
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
from typing import Any, Mapping, Sequence

import numpy as np

from clip_heads.backbones.families import CLIP_LOGIT_SCALE, SIGMOID_FAMILIES, get_family
from clip_heads.errors import BadValueError
from clip_heads.label_maps import norm

__all__ = ["CLIP_LOGIT_SCALE", "SIGMOID_FAMILIES", "SCORINGS", "ScoringRule", "l2_normalize", "ensemble",
           "template_mask", "class_vectors", "template_vectors", "resolve_template_ids",
           "prompt_columns", "cosine", "predict"]

# CLIP_LOGIT_SCALE (100): CLIP's learned temperature, what its training clamps logit_scale at and
# where it ends; the family registry holds it, here it is the default for stores that record none.
# Families trained with the pairwise sigmoid loss (SigLIP, SigLIP 2) score with sigmoid + bias;
# SIGMOID_FAMILIES comes from the family registry (clip_heads.backbones.families).
SCORINGS = ("softmax", "sigmoid")


def _is_torch(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def l2_normalize(x: Any, axis: int = -1) -> Any:
    """Rows scaled to unit length (``x / max(|x|, 1e-12)``); numpy results are float32."""
    if _is_torch(x):
        import torch.nn.functional as F

        return F.normalize(x, dim=axis)
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


# ---------------------------------------------------------------------------------------
# Ensembling: prompt vectors -> one unit vector per class
# ---------------------------------------------------------------------------------------
def ensemble(embeds: Any, class_id: Any, n_classes: int, class_names: Sequence[str] | None = None,
             what: str = "the prompts") -> Any:
    """One unit vector per class: the renormalised sum of its normalised prompt vectors.

    Parameters
    ----------
    embeds : (n_prompts, dim) prompt vectors, numpy or torch.
    class_id : (n_prompts,) class index of each prompt, ``0 <= id < n_classes``.
    class_names, what : name the classes and the prompts in the error for a class without any prompt.

    Returns
    -------
    (n_classes, dim), float32 numpy or a tensor like ``embeds``.
    """
    if _is_torch(embeds):
        import torch

        cid = torch.as_tensor(class_id if _is_torch(class_id) else np.asarray(class_id), device=embeds.device).long()
        present = torch.bincount(cid, minlength=n_classes).cpu().numpy() > 0
        _require(present, class_names, what)
        E = l2_normalize(embeds)
        return l2_normalize(E.new_zeros(n_classes, E.shape[1]).index_add_(0, cid, E))
    cid = np.asarray(class_id, np.int64)
    _require(np.bincount(cid, minlength=n_classes)[:n_classes] > 0, class_names, what)
    E = l2_normalize(embeds)
    out = np.zeros((n_classes, E.shape[1]), np.float32)
    np.add.at(out, cid, E)
    return l2_normalize(out)


def _require(present: np.ndarray, class_names: Sequence[str] | None, what: str) -> None:
    if not present.all():
        missing = [class_names[c] if class_names is not None else c for c in np.flatnonzero(~present).tolist()]
        raise ValueError(f"{what}: no prompt for classes {missing}")


def template_mask(ps: Any, template_ids: Sequence[int] | None = None) -> np.ndarray:
    """Which prompts of prompt set ``ps`` belong to the chosen templates (all by default)."""
    if template_ids is None:
        return np.ones(len(ps.template_id), bool)
    return np.isin(ps.template_id, list(template_ids))


def class_vectors(ps: Any, template_ids: Sequence[int] | None = None, classes: Sequence[str] | None = None) -> np.ndarray:
    """Class vectors ``(C, dim)`` of a prompt set (:class:`clip_heads.store.PromptSet` or alike:
    ``embeds``, ``class_id``, ``template_id``, ``classes``, ``templates``, ``name``) over the
    chosen templates, in the set's class order, or in the order of ``classes`` (matched by name,
    :func:`prompt_columns`). Every class of the set needs a prompt among those templates."""
    keep = template_mask(ps, template_ids)
    V = ensemble(np.asarray(ps.embeds)[keep], np.asarray(ps.class_id)[keep], len(ps.classes), ps.classes,
                 f"prompt set {ps.name!r} (templates {'all' if template_ids is None else list(template_ids)})")
    return V if classes is None else V[prompt_columns(ps, classes)]


def template_vectors(ps: Any, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Every template of ``ps`` on its own: ``(vectors (T, C, dim), complete (T,))`` with the
    classes in the order of ``classes``; ``complete[t]`` is False where template ``t`` lacks a
    prompt for some class (its rows are then not meaningful)."""
    cols = prompt_columns(ps, classes)
    tid, cid = np.asarray(ps.template_id, np.int64), np.asarray(ps.class_id, np.int64)
    T, C = len(ps.templates), len(ps.classes)
    E = l2_normalize(ps.embeds).astype(np.float64)
    sums = np.zeros((T, C, E.shape[1]))
    np.add.at(sums, (tid, cid), E)
    counts = np.bincount(tid * C + cid, minlength=T * C).reshape(T, C)
    return l2_normalize(sums[:, cols]), (counts[:, cols] > 0).all(1)


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


def prompt_columns(ps: Any, classes: Sequence[str]) -> list[int]:
    """Index in ``ps.classes`` of every class, matched by name; names any class without a prompt."""
    idx = {norm(c): i for i, c in enumerate(ps.classes)}
    missing = [c for c in classes if norm(c) not in idx]
    if missing:
        raise ValueError(f"prompt set {ps.name!r} has no prompt for store classes {missing}; its classes are "
                         f"{ps.classes} (add prompts for them, or pass a label map)")
    return [idx[norm(c)] for c in classes]


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
        if _is_torch(z):
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
