"""Augmented views as training samples: what a head's ``use_views=True`` does with them.

A store encoded with ``encode --views K`` holds, besides each image's plain vector, K vectors of
augmented copies of the image (``/images/views``, shape ``(n_samples, K, dim)``). A head that
trains on features takes them through ``fit(X, y, views=V)``; evaluation always uses the plain
vectors. :func:`check_views` is the one check of such an array, :func:`with_views` the one way
they become training rows.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from clip_heads.heads.base import rows_of, threads_for

__all__ = ["check_views", "with_views", "rows_of", "NO_VIEWS", "ViewsFit"]

NO_VIEWS = ("use_views=true needs the augmented views of the training images, and none were given "
            "(encode the store with --views K)")


def check_views(owner: str, views: Any, X: np.ndarray) -> np.ndarray:
    """``views`` as float32 ``(n_samples, K, dim)`` matching ``X`` row for row, or a one-line ``ValueError``."""
    if views is None:
        raise ValueError(f"{owner}: {NO_VIEWS}")
    V = np.asarray(views, dtype=np.float32)
    if V.ndim != 3 or V.shape[0] != X.shape[0] or V.shape[2] != X.shape[1] or V.shape[1] < 1:
        raise ValueError(f"{owner}: views must have shape (n_samples={X.shape[0]}, K >= 1, dim={X.shape[1]}) to match X; "
                         f"got {V.shape}")
    if not np.isfinite(V).all():
        raise ValueError(f"{owner}: views hold NaN or infinite values")
    return V


def with_views(X: np.ndarray, y: np.ndarray, views: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Training rows: the plain vectors followed by every view, each view with its image's label.

    ``X`` (n, dim), ``y`` (n,), ``views`` (n, K, dim) or None -> ``(n * (K + 1), dim)`` rows and
    labels (:func:`clip_heads.heads.base.rows_of` of every image).
    """
    return rows_of(X, y, views)


class ViewsFit:
    """Mixin of a :class:`~clip_heads.heads.base.Head` whose ``fit`` takes the views: it checks
    the parameters and ``X, y`` as every head does, the views when ``use_views`` is set, then
    calls ``self._fit_rows(X, y_idx, views_or_None)``."""

    def fit(self, X: Any, y: Any, views: Any = None) -> Any:
        """Fit on ``X`` (n_samples, dim) and ``y``; ``views`` (n_samples, K, dim) when ``use_views``."""
        self._check_params()
        self._check_inputs()
        X, y_idx = self._validate_fit(X, y)
        V = check_views(type(self).__name__, views, X) if self.use_views else None
        with threads_for(X.size * (1 + (V.shape[1] if V is not None else 0))):
            self._fit_rows(X, y_idx, V)
        return self

    def _check_inputs(self) -> None:
        """What a head needs besides X and y (prompt vectors, a projection), checked before them."""

    def _fit_rows(self, X: np.ndarray, y: np.ndarray, views: np.ndarray | None) -> None:
        raise NotImplementedError
