"""GDA: training-free Gaussian discriminant analysis blended with zero-shot (Wang et al., ICLR 2024).

Paper: Z. Wang, J. Liang, L. Sheng, R. He, Z. Wang, T. Tan, *A Hard-to-Beat Baseline for
Training-free CLIP-based Adaptation*, ICLR 2024 (arXiv 2402.04087).

Model: every class is a Gaussian with its own mean ``mu_k`` and one covariance shared by all
classes, so Bayes' rule gives a linear classifier computed, not trained::

    W = mu P,   b_k = log pi_k - mu_k P mu_k^T / 2,   logits = s * cos(x, t) + alpha * (x W^T + b)

``P`` is the shared precision matrix, estimated with the paper's shrinkage (the empirical-Bayes
ridge-type estimator of Kubokawa & Srivastava, 2008): ``P = D * ((N - 1) S + tr(S) I_D)^+``, S
the sample covariance of the class-centred training vectors (N of them, dimension D). ``s * cos``
is the zero-shot classifier at the backbone's logit scale, ``pi_k`` the class prior.

Hyper-parameters and where they come from:

* ``priors="uniform"``: the paper's ``pi_k = 1 / C`` (balanced few-shot sets);
  ``"empirical"`` uses the training frequencies.
* ``alphas``: the paper's grid ``1e-4, 1e-3, ..., 100``. The paper picks ``alpha`` on the
  dataset's validation split (on ImageNet its code scores the candidates on the test set). Here
  nothing outside the training data is used: ``alpha`` is chosen by stratified k-fold
  cross-validation over the training samples themselves (``cv=5`` folds, fewer when a class has
  fewer samples; GDA refitted on each fold's training part, accuracy summed over the held-out
  parts, ties to the smaller alpha, i.e. towards zero-shot). When some class has a single sample
  no such split exists and ``fallback_alpha=1.0`` is used; with one sample in *every* class the
  class-centred vectors are all zero, so the covariance and ``P`` are zero and the head is the
  zero-shot classifier whatever alpha is.
* ``normalize=True``: the paper's L2-normalised CLIP features.
* ``use_views``: the paper estimates the means and covariance from augmented views of the
  training images (its ``augment_epoch``); ``fit(X, y, views=...)`` does the same.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from clip_heads import zeroshot
from clip_heads.heads.base import DEVICE, SCORING_CONSTRAINTS, Head, l2_normalize, seed_from
from clip_heads.heads.params import NON_NEGATIVE, POSITIVE_INT, PROMPTS, StrOptions, check_grid
from clip_heads.heads.zero_shot import PromptEmbeds
from clip_heads.heads.views import rows_of
from clip_heads.heads.zs_lp import PromptHead

__all__ = ["GDAHead", "gda_classifier", "DEFAULT_ALPHAS"]

DEFAULT_ALPHAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


def gda_classifier(X: torch.Tensor, y: torch.Tensor, n_classes: int, priors: str = "uniform",
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W (C, D), b (C,))`` of the GDA classifier of rows ``X`` with class indices ``y`` (every
    class present), with the shrinkage precision of the module docstring; float64 in, float64 out."""
    n, d = X.shape
    counts = torch.bincount(y, minlength=n_classes).to(X.dtype)
    mu = torch.zeros(n_classes, d, dtype=X.dtype, device=X.device).index_add_(0, y, X) / counts[:, None]
    centred = X - mu[y]
    S = centred.T @ centred / max(n - 1, 1)
    A = (n - 1) * S + torch.trace(S) * torch.eye(d, dtype=X.dtype, device=X.device)
    P = d * torch.linalg.pinv(A, hermitian=True)
    log_prior = torch.log(counts / n) if priors == "empirical" else torch.full_like(counts, -np.log(n_classes))
    W = mu @ P
    return W, log_prior - 0.5 * (W * mu).sum(1)


class GDAHead(PromptHead, Head):
    """Training-free GDA on cached image vectors, ensembled with zero-shot.

    Parameters
    ----------
    prompt_embeds : array or dict
        Class prompt vectors, see :func:`~clip_heads.heads.zero_shot.class_prompt_vectors`.
    logit_scale, scoring, logit_bias : the store's rule (CLIP: 100, "softmax", 0), which makes the
        zero-shot term; the blend is a softmax model.
    alpha : float, optional
        Weight of the GDA logits; skips the search.
    alphas : sequence of float, default=(1e-4, ..., 100)
    cv : int, default=5
        Folds of the search (at most the smallest class's sample count).
    fallback_alpha : float, default=1.0
        Used when a class has one sample (no fold can hold it out).
    priors : {"uniform", "empirical"}, default="uniform"
    normalize : bool, default=True
    use_views : bool, default=False
    random_state : int, RandomState or None, default=0
        Seeds the folds.
    device : str, default="cpu"

    Attributes
    ----------
    classes_, n_features_in_, class_embeds_, coef_ (n_classes, dim), intercept_ (n_classes,)
    alpha_ : float
    alpha_scores_ : dict {alpha: cross-validated accuracy}; empty when not searched
    """

    name = "gda"
    uses_prompts = True
    zero_shot_scoring = True  # its zero-shot term is the store's rule
    _tensor_params = ("prompt_embeds",)
    _parameter_constraints = {"prompt_embeds": PROMPTS, **SCORING_CONSTRAINTS, "alpha": [NON_NEGATIVE, None],
                              "alphas": ["array-like"], "cv": [POSITIVE_INT], "fallback_alpha": [NON_NEGATIVE],
                              "priors": [StrOptions({"uniform", "empirical"})], "normalize": ["boolean"],
                              "use_views": ["boolean"], "random_state": ["random_state"], "device": DEVICE}
    _extra_types = {"alpha_": (float, int), "alpha_scores_": (dict,)}

    def __init__(self, prompt_embeds: PromptEmbeds | None = None, logit_scale: float = zeroshot.CLIP_LOGIT_SCALE,
                 alpha: float | None = None, alphas: Sequence[float] = DEFAULT_ALPHAS, cv: int = 5,
                 fallback_alpha: float = 1.0, priors: str = "uniform", normalize: bool = True, use_views: bool = False,
                 random_state: Any = 0, device: str = "cpu", *, scoring: str = "softmax",
                 logit_bias: float = 0.0) -> None:
        self.prompt_embeds = prompt_embeds
        self.logit_scale = logit_scale
        self.scoring = scoring
        self.logit_bias = logit_bias
        self.alpha = alpha
        self.alphas = alphas
        self.cv = cv
        self.fallback_alpha = fallback_alpha
        self.priors = priors
        self.normalize = normalize
        self.use_views = use_views
        self.random_state = random_state
        self.device = device

    def _check_params(self) -> None:
        super()._check_params()
        check_grid(type(self).__name__, "alphas", self.alphas, positive=False)

    def predict_proba(self, X: Any) -> np.ndarray:
        """Softmax of the blended logits."""
        return torch.softmax(torch.from_numpy(self._all_logits(X)).double(), dim=1).numpy()

    def _prepare(self, X: torch.Tensor) -> torch.Tensor:
        return l2_normalize(X) if self.normalize else X

    def _zero_shot(self, X: torch.Tensor) -> torch.Tensor:
        return self.scoring_rule().logits(zeroshot.cosine(X, self.class_embeds_.to(X)))

    def _fit_rows(self, X_np: np.ndarray, y_np: np.ndarray, views: np.ndarray | None) -> None:
        self._fit_class_embeds(X_np.shape[1])
        k = len(self.classes_)
        X = torch.from_numpy(X_np).to(self.device, torch.float64)
        y = torch.from_numpy(y_np).to(self.device)
        V = None if views is None else torch.from_numpy(views).to(self.device, torch.float64)
        self.alpha_scores_: dict[float, float] = {}
        if self.alpha is not None:
            self.alpha_ = float(self.alpha)
        else:
            self.alpha_ = self._search(X, y, V, k)
        W, b = gda_classifier(*self._rows(X, y, V), k, self.priors)
        self.coef_, self.intercept_ = W.float().cpu().numpy(), b.float().cpu().numpy()

    def _rows(self, X: torch.Tensor, y: torch.Tensor, V: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Prepared training rows: the plain vectors, then the views (:func:`~clip_heads.heads.views.rows_of`)."""
        X, y = rows_of(X, y, V)
        return self._prepare(X), y

    def _search(self, X: torch.Tensor, y: torch.Tensor, V: torch.Tensor | None, k: int) -> float:
        from sklearn.model_selection import StratifiedKFold

        counts = np.bincount(y.cpu().numpy(), minlength=k)
        if counts.min() < 2:
            return float(self.fallback_alpha)
        alphas = [float(a) for a in self.alphas]
        correct = np.zeros(len(alphas))
        folds = StratifiedKFold(n_splits=int(min(self.cv, counts.min())), shuffle=True,
                                random_state=seed_from(self.random_state) % 2**31)
        y_np = y.cpu().numpy()
        for tr, va in folds.split(np.zeros(len(y_np)), y_np):
            tr, va = torch.from_numpy(tr).to(X.device), torch.from_numpy(va).to(X.device)
            W, b = gda_classifier(*self._rows(X[tr], y[tr], None if V is None else V[tr]), k, self.priors)
            zs, g = self._zero_shot(X[va]), self._prepare(X[va]) @ W.T + b
            correct += [int(((zs + a * g).argmax(1) == y[va]).sum()) for a in alphas]
        scores = correct / len(y_np)
        self.alpha_scores_ = dict(zip(alphas, scores.tolist(), strict=True))
        return alphas[int(np.argmax(scores))]  # first best: the smallest alpha

    def _logits(self, X: torch.Tensor) -> torch.Tensor:
        W, b = torch.from_numpy(self.coef_).to(X), torch.from_numpy(self.intercept_).to(X)
        return self._zero_shot(X) + self.alpha_ * (self._prepare(X) @ W.T + b)

    # -- save / load ----------------------------------------------------------------------
    def _extra_config(self) -> dict[str, Any]:
        return {"alpha_": self.alpha_, "alpha_scores_": {str(a): s for a, s in self.alpha_scores_.items()}}

    def _get_tensors(self) -> dict[str, torch.Tensor]:
        return {**super()._get_tensors(), "coef": torch.from_numpy(self.coef_),
                "intercept": torch.from_numpy(self.intercept_)}

    def _expected_tensors(self, found: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        k, d = len(self.classes_), self.n_features_in_
        return {**super()._expected_tensors(found), "coef": (k, d), "intercept": (k,)}

    def _set_tensors(self, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        super()._set_tensors(tensors, extra)  # class_embeds (PromptHead)
        self.coef_, self.intercept_ = tensors["coef"].numpy(), tensors["intercept"].numpy()
        self.alpha_ = float(extra["alpha_"])
        try:
            self.alpha_scores_ = {float(a): float(s) for a, s in extra["alpha_scores_"].items()}
        except (TypeError, ValueError):
            raise ValueError(f"extra.alpha_scores_ must map alphas to scores, got {extra['alpha_scores_']!r:.80}") from None
