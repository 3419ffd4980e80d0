"""Linear probe: multinomial logistic regression, full-batch L-BFGS in torch, C chosen on validation."""
from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from clip_heads.heads.base import DEVICE, Head, l2_normalize, seed_from, validation_split
from clip_heads.heads.params import FRACTION, POSITIVE, POSITIVE_INT, check_grid
from clip_heads.heads.views import ViewsFit, rows_of

logger = logging.getLogger(__name__)

DEFAULT_CS = tuple(float(c) for c in np.logspace(-3, 3, 13))
# The search walks every other C of the grid upwards (a coarse pass), stopping once this many
# coarse points (a factor 10 in C on the default grid) past the best have scored below it - past
# the peak, larger C only overfits more, and those weakly regularised fits are the slowest - then
# fits the best one's two neighbours.
SEARCH_PATIENCE = 1
# Rows per block of the loss and its gradient: a block's logits and their gradient are all the
# activations ever held (n_samples x n_classes of them would be 0.8x a 512-d X at 100 classes).
FIT_BLOCK = 65536


def search_grid(Cs: Sequence[float], score: Callable[[float], float],
                patience: int = SEARCH_PATIENCE) -> tuple[float, dict[float, float]]:
    """The C of best ``score(C)`` over ``Cs``, coarse then fine; returns it and every score taken.

    Coarse: every other C in increasing order (the largest always among them), stopping
    ``patience`` coarse points past the best. Fine: the best one's neighbours in ``Cs``. Ties go
    to the smaller, more regularised C. On a unimodal curve this is the full grid's choice:
    the best coarse point is the peak or next to it. ``score`` is called in the order the C
    values are visited (increasing on the coarse pass), so a caller may warm-start each fit.
    """
    grid = sorted(float(c) for c in Cs)
    coarse = list(range(0, len(grid), 2))
    if coarse[-1] != len(grid) - 1:
        coarse.append(len(grid) - 1)
    scores: dict[float, float] = {}
    best, worse = None, 0
    for i in coarse:
        scores[grid[i]] = score(grid[i])
        if best is None or scores[grid[i]] > scores[grid[best]]:
            best, worse = i, 0
        elif scores[grid[i]] < scores[grid[best]]:
            worse += 1
            if worse == patience:
                break
    for j in (best - 1, best + 1):
        if 0 <= j < len(grid) and grid[j] not in scores:
            scores[grid[j]] = score(grid[j])
    top = max(scores.values())
    return min(c for c, v in scores.items() if v == top), dict(sorted(scores.items()))


def refine_peak(scores: dict[float, float], best: float) -> float:
    """The C where validation accuracy peaks, read from the parabola (in log C) through ``best``
    and its two neighbours in ``scores``; ``best`` itself at the grid's edge or on a flat top.

    On 100 classes of 50-100 held-out images each, accuracy's standard error (0.4-0.6 point) is
    as large as its differences between neighbouring Cs, so the grid's argmax is often a factor
    3 from the optimum. The parabola uses all three points and lands between them: on simulated
    curves with that noise it loses ~25% less accuracy to the choice than the argmax
    (tests/test_linear_selection.py). The middle point is the highest, so the parabola is concave
    and its vertex lies within ``best``'s neighbours. (The validation log-likelihood, smoother,
    was tried as the criterion: it prefers weaker regularisation than accuracy does, C=4.2 on the
    CIFAR-shaped problem against accuracy's optimum near 1.3, -0.4 point.)"""
    cs = sorted(scores)
    i = cs.index(best)
    if i == 0 or i == len(cs) - 1:
        return best
    (x0, x1, x2), (y0, y1, y2) = np.log([cs[i - 1], best, cs[i + 1]]), (scores[cs[i - 1]], scores[best], scores[cs[i + 1]])
    # Vertex of the parabola through three points (x0 < x1 < x2, y1 >= y0, y2).
    den = (x1 - x0) * (y1 - y2) + (x2 - x1) * (y1 - y0)
    if den <= 0:  # flat: no curvature to read
        return best
    vertex = x1 - 0.5 * ((x1 - x0) ** 2 * (y1 - y2) - (x2 - x1) ** 2 * (y1 - y0)) / den
    return float(np.exp(np.clip(vertex, x0, x2)))


def fit_logistic(X: torch.Tensor, y: torch.Tensor, n_classes: int, C: float, init: tuple | None = None,
                 max_iter: int = 500, tol: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
    """Minimise ``sum_i logloss_i + ||W||^2 / (2C)`` (bias unpenalised), sklearn's objective.

    The loss is divided by ``n_samples`` before optimising, which leaves the minimiser unchanged
    and keeps gradients O(1) so that one tolerance works for any data size. Rows are taken
    :data:`FIT_BLOCK` at a time (contiguous slices: no copy).

    Returns
    -------
    W : (n_classes, dim), b : (n_classes,), number of L-BFGS iterations, and whether it
    converged (False: ``max_iter`` iterations or their function-evaluation budget ran out first).
    """
    n, d = X.shape
    blocks = [slice(i, i + FIT_BLOCK) for i in range(0, n, FIT_BLOCK)]
    W, b = (t.detach().clone() for t in init) if init is not None else _first_order_start(X, y, n_classes, C, blocks)
    W.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=max_iter, tolerance_grad=tol, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")
    l2 = 0.5 / (C * n)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        # F.linear keeps W as (n_classes, dim): its backward is grad.T @ X, several times
        # faster on CPU than the X.T @ grad a (dim, n_classes) layout would need.
        if len(blocks) == 1:
            loss = F.cross_entropy(F.linear(X, W, b), y) + l2 * (W * W).sum()
            loss.backward()
            return loss
        total = l2 * (W * W).sum()
        total.backward()
        total = total.detach()
        for blk in blocks:  # one backward per block: only a block's activations are ever held
            loss = F.cross_entropy(F.linear(X[blk], W, b), y[blk], reduction="sum") / n
            loss.backward()
            total += loss.detach()
        return total

    with torch.enable_grad():  # also when called under a caller's no_grad()
        opt.step(closure)
    state = opt.state[W]
    # L-BFGS stops on its gradient tolerance, on a step that no longer changes the loss (both a
    # plateau), or on its iteration / evaluation budget (the cap, not convergence).
    capped = state["n_iter"] >= max_iter or state["func_evals"] >= opt.param_groups[0]["max_eval"]
    return W.detach(), b.detach(), state["n_iter"], not capped


def _first_order_start(X: torch.Tensor, y: torch.Tensor, n_classes: int, C: float,
                       blocks: list[slice]) -> tuple[torch.Tensor, torch.Tensor]:
    """A start near the solution instead of zeros, which cost L-BFGS ~25 evaluations of line
    search before its first useful step: the biases at the log class priors, and W one
    gradient step from 0 scaled by ``C * n`` (the exact solution when the penalty dominates),
    shrunk by ``1 + C * n / dim`` (the curvature of unit rows, ~1/dim a direction)."""
    n, d = X.shape
    counts = torch.bincount(y, minlength=n_classes).to(X.dtype)
    b = counts.clamp_min(1).log()
    b -= b.mean()
    prior = torch.softmax(b, 0)
    # Gradient of the mean cross-entropy at W = 0: mean_i (p - onehot(y_i)) x_i^T.
    total = torch.zeros(d, dtype=X.dtype, device=X.device)
    per_class = torch.zeros(n_classes, d, dtype=X.dtype, device=X.device)
    for blk in blocks:
        total += X[blk].sum(0)
        per_class.index_add_(0, y[blk], X[blk])  # (an alpha= here would scale a copy of the block)
    g = (prior[:, None] * total[None, :] - per_class) / n
    return -g * (C * n / (1 + C * n / d)), b


def working_copy(X: torch.Tensor, order: torch.Tensor | None, normalize: bool, block: int = 2048) -> torch.Tensor:
    """``X[order]`` with unit rows if ``normalize``, built a block at a time: the one copy of the
    features a fit makes (none without ``order`` and ``normalize``: then it is ``X``)."""
    if order is None and not normalize:
        return X
    n = len(X) if order is None else len(order)
    out = torch.empty(n, X.shape[1], dtype=X.dtype, device=X.device)
    for i in range(0, n, block):
        rows = X[i:i + block] if order is None else X.index_select(0, order[i:i + block])
        out[i:i + block] = l2_normalize(rows) if normalize else rows
    return out


def _accuracy(X: torch.Tensor, y: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> float:
    hits = sum(int((F.linear(X[i:i + FIT_BLOCK], W, b).argmax(1) == y[i:i + FIT_BLOCK]).sum())
               for i in range(0, len(X), FIT_BLOCK))
    return hits / len(X)


class LinearHead(ViewsFit, Head):
    """Multinomial logistic regression on (L2-normalised) image vectors.

    Without a fixed ``C``, every other value of ``Cs`` is fitted in increasing order on a
    stratified split of the training data (each warm-started from the previous one) and scored
    on the held-out part, stopping at the first one past the best that scores below it; then the
    best one's two neighbours in ``Cs`` are fitted too (:func:`search_grid`), the peak is read
    from the parabola through the three (:func:`refine_peak`), and that C is refitted on all of
    the training data. Fits are full-batch L-BFGS in float32 on one working
    copy of ``X`` (unit rows, the split's training rows first), the loss taken a block at a time.

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

    def _check_params(self) -> None:
        super()._check_params()
        check_grid(type(self).__name__, "Cs", self.Cs)

    def _fit_rows(self, X_np: np.ndarray, y_np: np.ndarray, views: np.ndarray | None) -> None:
        self._fit(X_np, y_np, views)

    def _fit(self, X_np: np.ndarray, y_np: np.ndarray, views: np.ndarray | None = None) -> None:
        X, y = torch.from_numpy(X_np).to(self.device, torch.float32), torch.from_numpy(y_np).to(self.device)
        # Augmented views (use_views) train beside their image; the C search's validation split is
        # carved by image and scored on plain vectors only.
        V = None if views is None else torch.from_numpy(views).to(self.device, torch.float32)
        V = l2_normalize(V) if V is not None and self.normalize else V
        k = len(self.classes_)
        self.val_scores_: dict[float, float] = {}
        init = None
        if self.C is not None:
            self.C_ = float(self.C)
            X = working_copy(X, None, self.normalize)
        else:
            tr, va = validation_split(y_np, self.validation_fraction, seed_from(self.random_state))
            # One working copy, training rows first: the split's two parts are slices of it.
            order = torch.from_numpy(np.concatenate([tr, va])).to(self.device)
            X, y = working_copy(X, order, self.normalize), y[order]
            V = None if V is None else V[order]
            fit_part, val_part = slice(0, len(tr)), slice(len(tr), None)
            fit_rows = rows_of(X[fit_part], y[fit_part], None if V is None else V[fit_part])
            fits: dict[float, tuple] = {}

            def score(C: float) -> float:
                # Warm start from the fit of the nearest C below; refining between two fitted
                # Cs, from the mean of their solutions (the path moves little over a factor 10).
                below, above = [c for c in fits if c < C], [c for c in fits if c > C]
                if below and above:
                    lo, hi = fits[max(below)], fits[min(above)]
                    start = ((lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2)
                else:
                    start = fits[max(below)][:2] if below else None
                fits[C] = fit = fit_logistic(*fit_rows, k, C, start, self.max_iter, self.tol)
                acc = _accuracy(X[val_part], y[val_part], fit[0], fit[1])
                logger.debug("C=%g: val accuracy %.4f (%d iterations%s)", C, acc, fit[2],
                             "" if fit[3] else f", stopped at max_iter={self.max_iter}")
                return acc

            best, self.val_scores_ = search_grid(self.Cs, score)
            self.C_ = refine_peak(self.val_scores_, best)
            # Warm start: the fitted C nearest the chosen one (in log C).
            init = fits[min(fits, key=lambda c: abs(np.log(c / self.C_)))][:2]
            logger.info("linear head: C=%g chosen (grid best %g, val accuracy %.4f)", self.C_, best,
                        self.val_scores_[best])
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
