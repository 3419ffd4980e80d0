"""Prompt ensembling: prompt vectors -> one unit vector per class (CLIP's prompt ensembling).

Every prompt vector is L2-normalised, the prompts of a class are summed, and the sum is
normalised again (a sum and a mean give the same unit vector). This is the half of the
zero-shot kernel (:mod:`clip_heads.zeroshot`, which re-exports every name here) that needs numpy
alone, so it sits below the store: :meth:`clip_heads.schema.PromptSet.class_vectors` is this
module's :func:`class_vectors`, and the scoring half (which reads the family registry) stays in
the kernel.

Arrays in, arrays out: numpy inputs give float32 numpy results, torch tensors give tensors on
their own device and dtype. This module imports neither torch nor scikit-learn itself.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from clip_heads.label_maps import norm

__all__ = ["is_torch", "l2_normalize", "ensemble", "template_mask", "class_vectors", "template_vectors",
           "prompt_columns"]


def is_torch(x: Any) -> bool:
    """Whether ``x`` is a torch object, without importing torch."""
    return type(x).__module__.split(".")[0] == "torch"


def l2_normalize(x: Any, axis: int = -1) -> Any:
    """Rows scaled to unit length (``x / max(|x|, 1e-12)``); numpy results are float32."""
    if is_torch(x):
        import torch.nn.functional as F

        return F.normalize(x, dim=axis)
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


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
    if is_torch(embeds):
        import torch

        cid = torch.as_tensor(class_id if is_torch(class_id) else np.asarray(class_id), device=embeds.device).long()
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
    """Class vectors ``(C, dim)`` of a prompt set (:class:`clip_heads.schema.PromptSet` or alike:
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


def prompt_columns(ps: Any, classes: Sequence[str]) -> list[int]:
    """Index in ``ps.classes`` of every class, matched by name; names any class without a prompt."""
    idx = {norm(c): i for i, c in enumerate(ps.classes)}
    missing = [c for c in classes if norm(c) not in idx]
    if missing:
        raise ValueError(f"prompt set {ps.name!r} has no prompt for store classes {missing}; its classes are "
                         f"{ps.classes} (add prompts for them, or pass a label map)")
    return [idx[norm(c)] for c in classes]
