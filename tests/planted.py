"""Planted problems with a known Bayes classifier, shared by the tests and the benchmarks.

A plain module (no fixtures, no pytest), so that a benchmark script can import it: tests/ is on
the path of every test module (pytest puts it there for conftest), and a benchmark adds it, as
``benchmarks/gpu_check.py`` does for the tiny models. It lives with the tests, not in the package
or in ``benchmarks/``: what it builds is the reference the tests assert against (accuracy under the
Bayes rate), the benchmarks only reuse it at full size, and the suite must not depend on scripts.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

__all__ = ["FI_COUNTS", "Planted", "fi_planted"]

FI_COUNTS = np.array([4942, 1266, 3151, 5374, 1658, 2963, 1032, 2922])  # FI's 8 emotions, 23,308 images


class Planted(NamedTuple):
    X: np.ndarray  # (n, dim) float32
    y: np.ndarray  # (n,) class indices
    class_means: np.ndarray  # (n_classes, dim): each class's mean in the space of X (for prompts)
    bayes: Callable[[np.ndarray], np.ndarray]  # X -> the Bayes classifier's labels


def fi_planted(n: int = 23308, dim: int = 512, clusters: int = 2, sep: float = 3.0, seed: int = 0) -> Planted:
    """An FI-shaped problem with a known Bayes classifier.

    8 classes with FI's priors; each class a mixture of ``clusters`` Gaussians (so the boundary
    is not linear), all sharing one anisotropic covariance (a decaying spectrum, as CLIP vectors
    have, which slows plain gradient descent), every cluster mean at Mahalanobis distance
    ``sep`` from the origin.
    """
    rng = np.random.default_rng(seed)
    prior = FI_COUNTS / FI_COUNTS.sum()
    scale = (1 + np.arange(dim) / 8.0) ** -0.5
    rotation = np.linalg.qr(rng.normal(size=(dim, dim)))[0]
    mu = rng.normal(size=(len(prior) * clusters, dim)) * scale
    mu *= sep / np.linalg.norm(mu / scale, axis=1, keepdims=True)
    y = rng.choice(len(prior), size=n, p=prior)
    z = rng.normal(size=(n, dim)) * scale + mu[y * clusters + rng.integers(0, clusters, size=n)]
    X = (z @ rotation.T).astype(np.float32)

    def bayes(X: np.ndarray) -> np.ndarray:
        # log p(x | cluster) up to a constant shared by all clusters; a class's is the mean of its clusters'.
        s = (X.astype(np.float64) @ rotation) @ (mu / scale**2).T - 0.5 * ((mu / scale) ** 2).sum(1)
        s = s.reshape(len(X), len(prior), clusters)
        top = s.max(2)
        return np.argmax(top + np.log(np.exp(s - top[..., None]).mean(2)) + np.log(prior), axis=1)

    class_means = mu.reshape(len(prior), clusters, dim).mean(1) @ rotation.T
    return Planted(X, y, class_means, bayes)
