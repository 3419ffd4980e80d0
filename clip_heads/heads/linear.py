"""Linear probe: multinomial logistic regression, full-batch L-BFGS in torch, C chosen on validation."""
from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from clip_heads.heads.base import DEVICE, Head, l2_normalize, seed_from, validation_split
from clip_heads.heads.params import FRACTION, POSITIVE, POSITIVE_INT, check_grid
from clip_heads.heads.views import ViewsFit, rows_of

logger = logging.getLogger(__name__)

DEFAULT_CS = tuple(float(c) for c in np.logspace(-3, 3, 13))
# The search walks C upwards and stops once this many grid points past the best score below it:
# past the peak, larger C only overfits more, and those weakly regularised fits are the slowest.
SEARCH_PATIENCE = 3


def fit_logistic(X: torch.Tensor, y: torch.Tensor, n_classes: int, C: float, init: tuple | None = None,
                 max_iter: int = 500, tol: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
    """Minimise ``sum_i logloss_i + ||W||^2 / (2C)`` (bias unpenalised), sklearn's objective.

    The loss is divided by ``n_samples`` before optimising, which leaves the minimiser unchanged
    and keeps gradients O(1) so that one tolerance works for any data size.

    Returns
    -------
    W : (n_classes, dim), b : (n_classes,), number of L-BFGS iterations, and whether it
    converged (False: ``max_iter`` iterations or their function-evaluation budget ran out first).
    """
    n, d = X.shape
    if init is None:
        W = torch.zeros(n_classes, d, dtype=X.dtype, device=X.device)
        b = torch.zeros(n_classes, dtype=X.dtype, device=X.device)
    else:
        W, b = (t.detach().clone() for t in init)
    W.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=max_iter, tolerance_grad=tol, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")
    l2 = 0.5 / (C * n)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        # F.linear keeps W as (n_classes, dim): its backward is grad.T @ X, several times
        # faster on CPU than the X.T @ grad a (dim, n_classes) layout would need.
        loss = F.cross_entropy(F.linear(X, W, b), y) + l2 * (W * W).sum()
        loss.backward()
        return loss

    with torch.enable_grad():  # also when called under a caller's no_grad()
        opt.step(closure)
    state = opt.state[W]
    # L-BFGS stops on its gradient tolerance, on a step that no longer changes the loss (both a
    # plateau), or on its iteration / evaluation budget (the cap, not convergence).
    capped = state["n_iter"] >= max_iter or state["func_evals"] >= opt.param_groups[0]["max_eval"]
    return W.detach(), b.detach(), state["n_iter"], not capped


class LinearHead(ViewsFit, Head):
    """Multinomial logistic regression on (L2-normalised) image vectors.

    Without a fixed ``C``, the values of ``Cs`` are fitted in increasing order on a stratified
    split of the training data (each warm-started from the previous one) and scored on the
    held-out part, stopping once three Cs past the best have scored below it; the best C is
    then refitted on all of the training data.

    Parameters
    ----------
    C : float, optional
        Inverse L2 strength, as in ``sklearn.linear_model.LogisticRegression``. Skips the search.
    Cs : sequence of float, default=13 values from 1e-3 to 1e3
        Grid searched when ``C`` is None.
    normalize : bool, default=True
        L2-normalise the vectors first (CLIP's geometry is cosine).
    validation_fraction : float, default=0.2
        Share of the training data held out to choose C.
    max_iter : int, default=500
        Cap on L-BFGS iterations per fit; a fit ends at convergence (``tol``), and a warning
        says when the final fit hit the cap instead.
    tol : float, default=1e-5
        Stop when every gradient entry of the per-sample objective is below this.
    random_state : int, RandomState or None, default=0
        Seeds the validation split.
    device : str, default="cpu"
    use_views : bool, default=False
        Train on the images' augmented views too (``fit(X, y, views=V)``, V of shape
        ``(n_samples, K, dim)``); the validation split holds plain vectors of held-out images only.

    Attributes
    ----------
    classes_, n_features_in_
    coef_ : ndarray (n_classes, dim), intercept_ : ndarray (n_classes,)
    C_ : float
        The C used for the final fit.
    val_scores_ : dict {C: validation accuracy} of the Cs tried; empty when ``C`` was fixed.
    n_iter_ : int
        L-BFGS iterations of the final fit.
    converged_ : bool
        Whether the final fit converged before ``max_iter``.
    """

    name = "linear"
    _parameter_constraints = {"C": [POSITIVE, None], "Cs": ["array-like"], "normalize": ["boolean"],
                              "validation_fraction": [FRACTION], "max_iter": [POSITIVE_INT], "tol": [POSITIVE],
                              "random_state": ["random_state"], "device": DEVICE, "use_views": ["boolean"]}
    _extra_types = {"C_": (float, int), "n_iter_": (int,), "converged_": (bool,), "val_scores_": (dict,)}

    def __init__(self, C: float | None = None, Cs: Sequence[float] = DEFAULT_CS, normalize: bool = True,
                 validation_fraction: float = 0.2, max_iter: int = 500, tol: float = 1e-5,
                 random_state: Any = 0, device: str = "cpu", use_views: bool = False) -> None:
        self.use_views = use_views
        self.C = C
        self.Cs = Cs
        self.normalize = normalize
        self.validation_fraction = validation_fraction
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state
        self.device = device

    def _prepare(self, X: torch.Tensor) -> torch.Tensor:
        X = X.to(self.device, torch.float32)
        return l2_normalize(X) if self.normalize else X

    def _check_params(self) -> None:
        super()._check_params()
        check_grid(type(self).__name__, "Cs", self.Cs)

    def _fit_rows(self, X_np: np.ndarray, y_np: np.ndarray, views: np.ndarray | None) -> None:
        self._fit(X_np, y_np, views)

    def _fit(self, X_np: np.ndarray, y_np: np.ndarray, views: np.ndarray | None = None) -> None:
        X, y = self._prepare(torch.from_numpy(X_np)), torch.from_numpy(y_np).to(self.device)
        # Augmented views (use_views) train beside their image; the C search's validation split is
        # carved by image and scored on plain vectors only.
        V = None if views is None else self._prepare(torch.from_numpy(views))
        k = len(self.classes_)
        self.val_scores_: dict[float, float] = {}
        init = None
        if self.C is not None:
            self.C_ = float(self.C)
        else:
            Cs = sorted(float(c) for c in self.Cs)
            tr, va = validation_split(y_np, self.validation_fraction, seed_from(self.random_state))
            tr, va = torch.from_numpy(tr).to(self.device), torch.from_numpy(va).to(self.device)
            best, path, worse = -1.0, None, 0
            for C in Cs:
                path = fit_logistic(*rows_of(X, y, V, tr), k, C, path[:2] if path else None, self.max_iter, self.tol)
                acc = (F.linear(X[va], *path[:2]).argmax(1) == y[va]).double().mean().item()
                self.val_scores_[C] = acc
                logger.debug("C=%g: val accuracy %.4f (%d iterations%s)", C, acc, path[2],
                             "" if path[3] else f", stopped at max_iter={self.max_iter}")
                if acc > best:  # strict: ties keep the smaller, more regularised C
                    best, self.C_, init, worse = acc, C, path[:2], 0
                elif acc < best:
                    worse += 1
                    if worse == SEARCH_PATIENCE:
                        break
            logger.info("linear head: C=%g chosen, val accuracy %.4f", self.C_, best)
        W, b, self.n_iter_, self.converged_ = fit_logistic(*rows_of(X, y, V), k, self.C_, init, self.max_iter,
                                                           self.tol)
        if not self.converged_:
            logger.warning("linear head: L-BFGS stopped at its iteration cap (max_iter=%d) before converging "
                           "(tol=%g) at C=%g: raise max_iter", self.max_iter, self.tol, self.C_)
        self.coef_, self.intercept_ = W.float().cpu().numpy(), b.float().cpu().numpy()

    def _logits(self, X: torch.Tensor) -> torch.Tensor:
        X = l2_normalize(X) if self.normalize else X  # in the caller's dtype (float64 at predict)
        return F.linear(X, torch.from_numpy(self.coef_).to(X), torch.from_numpy(self.intercept_).to(X))

    def _extra_config(self) -> dict[str, Any]:
        return {"C_": self.C_, "n_iter_": self.n_iter_, "converged_": self.converged_,
                "val_scores_": {str(c): s for c, s in self.val_scores_.items()}}

    def _expected_tensors(self, found: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        return {"coef": (len(self.classes_), self.n_features_in_), "intercept": (len(self.classes_),)}

    def _get_tensors(self) -> dict[str, torch.Tensor]:
        return {"coef": torch.from_numpy(self.coef_), "intercept": torch.from_numpy(self.intercept_)}

    def _set_tensors(self, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        self.coef_, self.intercept_ = tensors["coef"].numpy(), tensors["intercept"].numpy()
        self.C_, self.n_iter_, self.converged_ = float(extra["C_"]), extra["n_iter_"], extra["converged_"]
        try:
            self.val_scores_ = {float(c): float(s) for c, s in extra["val_scores_"].items()}
        except (TypeError, ValueError):
            raise ValueError(f"extra.val_scores_ must map C values to scores, got {extra['val_scores_']!r:.80}") from None
