"""LP++: a linear probe whose class weights blend visual prototypes and text vectors (Huang et al., CVPR 2024).

Paper: Y. Huang, F. Shakeri, J. Dolz, M. Boudiaf, H. Bahig, I. Ben Ayed, *LP++: A Surprisingly
Strong Linear Probe for Few-Shot CLIP*, CVPR 2024 (arXiv 2404.02285).

Objective: softmax cross-entropy over the training samples (unregularised, full batch) of the
logits ``l_ik = f_i . (w_k + alpha_k t_k)``, with ``f_i`` the L2-normalised image vector,
``t_k`` the zero-shot (ensembled prompt) vector of class k, ``w_k`` a learned visual prototype
and ``alpha_k`` a learned class-wise blending weight. The loss is convex in each block.

Optimisation, as the paper's block majorise-minimise (MM) descent, full batch, no learning rate
to search: each iteration takes one step on the prototypes, then one on the blending weights,
each the exact minimiser of a quadratic majoriser of the loss in that block, i.e. a gradient
step of length ``1 / L`` where ``L`` bounds the block's curvature from the data:

* prototypes: ``L_w = lambda_max(F^T F) / (2N)`` - the largest eigenvalue of the feature Gram
  matrix ``F^T F`` (N support features) times the bound 1/2 on the eigenvalues of the softmax
  Hessian ``diag(p) - p p^T``;
* blending weights, per class: ``L_alpha_k = sum_i (f_i . t_k)^2 / (2N)``.

Both are true bounds, so the objective cannot increase from one iteration to the next
(``objective_curve_`` records it; the released code steps twice as far, taking a per-class
bound of 1/4 that ignores the coupling of the classes).

Initialisation (data-informed, as the paper's): each ``w_k`` is the mean of the class-k training
vectors; each ``alpha_k`` starts at the backbone's logit scale, so that the text term starts as
the zero-shot classifier itself (ours: on the planted problem of ``benchmarks/bench_few_shot.py``
it beat both a zero start and the 1-D minimiser of the loss in a shared alpha at every shot
count).

Hyper-parameters: ``max_iter=300`` (the authors' released configuration trains 300 full-batch
iterations; with unregularised few-shot data the loss keeps falling, so the cap, not ``tol``, is
the validation-free stopping rule there); ``tol=1e-7`` stops earlier once an iteration lowers the
loss by less than that fraction of it (a plateau; on large training sets raise ``max_iter``).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from clip_heads import zeroshot
from clip_heads.heads.base import DEVICE, SCORING_CONSTRAINTS, Head, l2_normalize
from clip_heads.heads.params import NON_NEGATIVE, PROMPTS, Integral, Interval, Real
from clip_heads.heads.views import with_views
from clip_heads.heads.zero_shot import PromptEmbeds
from clip_heads.heads.zs_lp import PromptHead

__all__ = ["LPPHead", "lipschitz_steps"]


def lipschitz_steps(Fm: torch.Tensor, G: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Step sizes ``(1 / L_w, 1 / L_alpha)`` of the two blocks for unit features ``Fm`` (N, D)
    and text cosines ``G = Fm @ T.T`` (N, C); see the module docstring."""
    n = len(Fm)
    L_w = float(torch.linalg.eigvalsh(Fm.T @ Fm).max()) / (2 * n)
    L_a = (G * G).sum(0) / (2 * n)
    return 1.0 / max(L_w, 1e-12), 1.0 / L_a.clamp(min=1e-12)


class LPPHead(PromptHead, Head):
    """LP++ on cached image vectors and class prompt vectors.

    Parameters
    ----------
    prompt_embeds : array or dict
        Class prompt vectors, see :func:`~clip_heads.heads.zero_shot.class_prompt_vectors`.
    logit_scale : float, default=CLIP's 100
        The backbone's temperature: where every ``alpha_k`` starts (the store's, through the commands).
    scoring, logit_bias : the store's rule; LP++ is a softmax model whatever the family, and a
        bias shared by all classes cancels in it, so they are recorded, not used.
    alpha_init : float or None, default=None
        Start of the blending weights instead of ``logit_scale``.
    max_iter : int, default=300
    tol : float, default=1e-7
        Stop once an iteration lowers the loss by less than this fraction of it.
    use_views : bool, default=False
        The augmented views are training samples too (``fit(X, y, views=...)``).
    random_state : unused (the method is deterministic); kept so every head takes one.
    device : str, default="cpu"

    Attributes
    ----------
    classes_, n_features_in_, class_embeds_ (n_classes, dim)
    coef_ : ndarray (n_classes, dim), the prototypes ``w_k``; alpha_ : ndarray (n_classes,)
    objective_curve_ : list of float, the loss before each iteration and at the end
    n_iter_ : int; step_w_ : float; steps_alpha_ : list of float
    """

    name = "lpp"
    uses_prompts = True
    zero_shot_scoring = True  # takes the store's rule: alpha starts at its scale
    _tensor_params = ("prompt_embeds",)
    _parameter_constraints = {"prompt_embeds": PROMPTS, **SCORING_CONSTRAINTS,
                              "alpha_init": [Interval(Real, None, None, closed="neither"), None],
                              "max_iter": [Interval(Integral, 0, None, closed="left")], "tol": [NON_NEGATIVE],
                              "use_views": ["boolean"], "random_state": ["random_state"], "device": DEVICE}
    _extra_types = {"objective_curve_": (list,), "n_iter_": (int,), "step_w_": (float, int),
                    "steps_alpha_": (list,)}

    def __init__(self, prompt_embeds: PromptEmbeds | None = None, logit_scale: float = zeroshot.CLIP_LOGIT_SCALE,
                 alpha_init: float | None = None, max_iter: int = 300, tol: float = 1e-7, use_views: bool = False,
                 random_state: Any = 0, device: str = "cpu", *, scoring: str = "softmax",
                 logit_bias: float = 0.0) -> None:
        self.prompt_embeds = prompt_embeds
        self.logit_scale = logit_scale
        self.scoring = scoring
        self.logit_bias = logit_bias
        self.alpha_init = alpha_init
        self.max_iter = max_iter
        self.tol = tol
        self.use_views = use_views
        self.random_state = random_state
        self.device = device

    def predict_proba(self, X: Any) -> np.ndarray:
        """Softmax of the LP++ logits (a softmax model whatever the backbone's family)."""
        return torch.softmax(torch.from_numpy(self._all_logits(X)).double(), dim=1).numpy()

    def _fit_rows(self, X_np: np.ndarray, y_np: np.ndarray, views: np.ndarray | None) -> None:
        T = self._fit_class_embeds(X_np.shape[1])
        X_np, y_np = with_views(X_np, y_np, views)
        # Full batch in float64: the MM steps are exact minimisers only in exact arithmetic.
        Fm = l2_normalize(torch.from_numpy(X_np).to(self.device, torch.float64))
        y = torch.from_numpy(y_np).to(self.device)
        k = len(self.classes_)
        Y = F.one_hot(y, k).to(Fm.dtype)
        Tt = T.to(Fm)
        G = Fm @ Tt.T
        W = (Y.T @ Fm) / Y.sum(0)[:, None]  # class means: every class has a sample (classes_ come from y)
        alpha = torch.full((k,), float(self.logit_scale if self.alpha_init is None else self.alpha_init),
                           dtype=Fm.dtype, device=Fm.device)
        step_w, step_a = lipschitz_steps(Fm, G)
        n = len(Fm)

        def loss(W: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = Fm @ W.T + G * alpha
            return F.cross_entropy(logits, y), torch.softmax(logits, 1) - Y

        curve = []
        value, R = loss(W, alpha)
        it = 0
        while it < self.max_iter:
            curve.append(float(value))
            W = W - step_w * (R.T @ Fm) / n          # prototype block
            _, R = loss(W, alpha)
            alpha = alpha - step_a * (R * G).sum(0) / n  # blending block
            new, R = loss(W, alpha)
            it += 1
            done = float(value - new) <= self.tol * abs(float(value))
            value = new
            if done:
                break
        curve.append(float(value))
        self.coef_, self.alpha_ = W.float().cpu().numpy(), alpha.float().cpu().numpy()
        self.objective_curve_, self.n_iter_ = curve, it
        self.step_w_, self.steps_alpha_ = float(step_w), [float(s) for s in step_a]

    def _logits(self, X: torch.Tensor) -> torch.Tensor:
        X = l2_normalize(X)
        W, a, T = (torch.from_numpy(np.asarray(v)).to(X) for v in (self.coef_, self.alpha_, self.class_embeds_))
        return X @ W.T + (X @ T.T) * a

    # -- save / load ----------------------------------------------------------------------
    def _extra_config(self) -> dict[str, Any]:
        return {"objective_curve_": self.objective_curve_, "n_iter_": self.n_iter_, "step_w_": self.step_w_,
                "steps_alpha_": self.steps_alpha_}

    def _get_tensors(self) -> dict[str, torch.Tensor]:
        return {**super()._get_tensors(), "coef": torch.from_numpy(self.coef_), "alpha": torch.from_numpy(self.alpha_)}

    def _expected_tensors(self, found: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        k, d = len(self.classes_), self.n_features_in_
        return {**super()._expected_tensors(found), "coef": (k, d), "alpha": (k,)}

    def _set_tensors(self, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        super()._set_tensors(tensors, extra)  # class_embeds (PromptHead)
        self.coef_, self.alpha_ = tensors["coef"].numpy(), tensors["alpha"].numpy()
        for k in self._extra_types:
            setattr(self, k, extra[k])

