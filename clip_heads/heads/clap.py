"""CLAP: the class-adaptive linear probe (Silva-Rodríguez et al., CVPR 2024).

Paper: J. Silva-Rodríguez, S. Hajimiri, I. Ben Ayed, J. Dolz, *A Closer Look at the Few-Shot
Adaptation of Large Vision-Language Models*, CVPR 2024 (arXiv 2312.12730), Sec. 4.2-4.3.

Objective: ZS-LP (:mod:`clip_heads.heads.zs_lp`) under the constraint that every prototype stay
at its class's zero-shot vector, relaxed into class-wise penalties::

    min_W  CE(W) + (1/C) * sum_k  lambda_k * ||w_k - t_k||^2

where ``t_k`` is the zero-shot (ensembled prompt) vector of class k. The multipliers are set
from the training data, with no validation set, as the paper does: ``lambda_k`` is the mean
zero-shot probability of the true class over the class-k training samples (classes the prompts
already recognise are held close to them; classes they miss may move). ``multipliers="balanced"``
gives every class 1 instead (the paper's ablation).

Augmented-Lagrangian update (``alm=True``, the paper's "adaptive" variant): after every epoch
the multipliers take one outer step of the PHR penalty-Lagrangian, ``lambda <- max(0, lambda +
rho * h)`` with ``h_k = ||w_k - t_k||^2`` the constraint violation, and the penalty parameter
``rho`` becomes ``h`` (it starts at 0, so the first step keeps the initial multipliers). The
paper's main CLAP results use the fixed multipliers (``alm=False``, the default).

Hyper-parameters and where they come from:

* ``multipliers="zero-shot"``, ``alm=False``: the paper's CLAP.
* ``penalty=1.0``: a factor on every multiplier, 1 in the paper; ``inf`` keeps the prototypes at
  the zero-shot vectors (the head is zero-shot), 0 makes it ZS-LP exactly.
* optimiser and stopping rule: those of :class:`~clip_heads.heads.zs_lp.ZSLPHead` (ours; the
  paper trains 300 epochs of SGD, lr 0.1), validation-free.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from clip_heads import zeroshot
from clip_heads.heads.params import Interval, Real, StrOptions
from clip_heads.heads.zero_shot import PromptEmbeds
from clip_heads.heads.zs_lp import ZSLPHead

__all__ = ["CLAPHead", "zero_shot_multipliers"]


def zero_shot_multipliers(X: torch.Tensor, y: torch.Tensor, T: torch.Tensor, rule: zeroshot.ScoringRule,
                          n_classes: int) -> torch.Tensor:
    """``lambda_k``: the mean zero-shot probability of class k over the class-k rows of unit ``X``.

    Probabilities by the store's rule (softmax; or renormalised sigmoids for a sigmoid family).
    """
    P = rule.distribution(X @ T.to(X).T)
    own = P.gather(1, y[:, None])[:, 0]
    total = torch.zeros(n_classes, dtype=own.dtype, device=own.device).index_add_(0, y, own)
    counts = torch.bincount(y, minlength=n_classes).clamp(min=1)
    return (total / counts).float()


class CLAPHead(ZSLPHead):
    """ZS-LP with class-adaptive penalties keeping each prototype near its zero-shot vector.

    Parameters
    ----------
    prompt_embeds, logit_scale, logit_bias, scoring, lr, weight_decay, batch_size, epochs,
    patience, tol, validation_fraction, use_views, random_state, device
        As :class:`~clip_heads.heads.zs_lp.ZSLPHead`.
    penalty : float, default=1.0
        Factor on every multiplier; ``float("inf")``: the zero-shot classifier, 0: ZS-LP.
    multipliers : {"zero-shot", "balanced"}, default="zero-shot"
        How the multipliers start: the training samples' zero-shot confidence in their class
        (the paper), or 1 for every class.
    alm : bool, default=False
        Update the multipliers after every epoch by the augmented-Lagrangian (PHR) step.

    Attributes
    ----------
    multipliers_ : ndarray (n_classes,) or None
        The multipliers at the end of training (times ``penalty``); None for an infinite penalty.
    initial_multipliers_ : ndarray (n_classes,)
        As set from the training data, before ``penalty`` and any ALM step.
    and those of :class:`~clip_heads.heads.zs_lp.ZSLPHead`.
    """

    name = "clap"
    _parameter_constraints = {**ZSLPHead._parameter_constraints,
                              "penalty": [Interval(Real, 0, None, closed="both")],  # inf included
                              "multipliers": [StrOptions({"zero-shot", "balanced"})], "alm": ["boolean"]}
    _extra_types = {**ZSLPHead._extra_types, "initial_multipliers_": (list,), "multipliers_": (list, type(None))}

    def __init__(self, prompt_embeds: PromptEmbeds | None = None, logit_scale: float = zeroshot.CLIP_LOGIT_SCALE,
                 logit_bias: float = 0.0, scoring: str = "softmax", penalty: float = 1.0,
                 multipliers: str = "zero-shot", alm: bool = False, lr: float = 1e-3, weight_decay: float = 0.0,
                 batch_size: int | str = "auto", epochs: int = 200, patience: int | None = 3, tol: float = 1e-3,
                 validation_fraction: float | None = None, use_views: bool = False, random_state: Any = 0,
                 device: str = "cpu") -> None:
        super().__init__(prompt_embeds=prompt_embeds, logit_scale=logit_scale, logit_bias=logit_bias, scoring=scoring,
                         lr=lr, weight_decay=weight_decay, batch_size=batch_size, epochs=epochs, patience=patience,
                         tol=tol, validation_fraction=validation_fraction, use_views=use_views,
                         random_state=random_state, device=device)
        self.penalty = penalty
        self.multipliers = multipliers
        self.alm = alm

    def _frozen(self) -> bool:
        return super()._frozen() or math.isinf(self.penalty)

    def _start(self, X: torch.Tensor, y: torch.Tensor) -> None:
        k = len(self.classes_)
        if self.multipliers == "balanced":
            lam = torch.ones(k)
        else:
            lam = zero_shot_multipliers(X, y, self.class_embeds_.to(X.device), self.scoring_rule(), k).cpu()
        self.initial_multipliers_ = lam.tolist()
        # inf * 0 is nan: an infinite penalty trains nothing, so its multipliers are never used.
        self._lambda = (lam * self.penalty if math.isfinite(self.penalty) else torch.full_like(lam, math.inf)).to(X.device)
        self._rho = torch.zeros_like(self._lambda)

    def _violation(self, model: nn.Module) -> torch.Tensor:
        """``h_k = ||w_k - t_k||^2`` per class."""
        return (model.weight - self.class_embeds_.to(model.weight)).pow(2).sum(1)

    def _penalty(self, model: nn.Module) -> torch.Tensor | float:
        if self.penalty == 0:
            return 0.0  # ZS-LP exactly (not a zero times a gradient that could be inf)
        return (self._lambda.to(model.weight) * self._violation(model)).mean()

    def _on_epoch_end(self, trainer: Any, logs: dict) -> None:
        if not self.alm or self.penalty == 0:
            return
        with torch.no_grad():
            h = self._violation(self.model_).to(self._lambda)
        # One outer step of the PHR penalty-Lagrangian: its derivative in h is max(0, lambda + rho h).
        self._lambda = torch.clamp(self._lambda + self._rho * h, min=0.0)
        self._rho = h

    def _fit_rows(self, X_np: np.ndarray, y_np: np.ndarray, views: np.ndarray | None) -> None:
        super()._fit_rows(X_np, y_np, views)
        lam = self.__dict__.pop("_lambda")
        self.__dict__.pop("_rho")
        self.multipliers_ = None if math.isinf(self.penalty) else lam.cpu().double().numpy()

    # -- save / load ----------------------------------------------------------------------
    def _extra_config(self) -> dict[str, Any]:
        m = None if self.multipliers_ is None else [float(v) for v in self.multipliers_]
        return dict(super()._extra_config(), initial_multipliers_=list(self.initial_multipliers_), multipliers_=m)

    def _set_tensors(self, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        k = len(self.classes_)
        init, final = extra["initial_multipliers_"], extra["multipliers_"]
        for name, v in (("initial_multipliers_", init), ("multipliers_", final)):
            if v is not None and (len(v) != k or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                         for x in v)):
                raise ValueError(f"extra.{name} must list {k} numbers (one per class), got {v!r:.80}")
        self.initial_multipliers_ = [float(v) for v in init]
        self.multipliers_ = None if final is None else np.asarray(final, np.float64)
        super()._set_tensors(tensors, extra)
