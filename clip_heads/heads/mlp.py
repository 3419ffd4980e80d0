"""CLIP-E CrossEntropy: a one-hidden-layer MLP on frozen image vectors, trained with cross-entropy."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clip_heads.heads.base import TrainedHead, l2_normalize, seed_from, sized_threads


class MLPHead(TrainedHead):
    """``Linear(dim, hidden) -> ReLU -> Dropout -> Linear(hidden, n_classes)``, AdamW, early stopping.

    Parameters
    ----------
    hidden : int, default=512
    dropout : float, default=0.2
    lr : float, default=2e-3
        AdamW peak learning rate (cosine decay over ``epochs``).
    weight_decay : float, default=1e-2
    batch_size : int or "auto", default="auto"
        "auto" is 512, or fewer on small data so that an epoch still has ~32 steps.
    epochs : int, default=8
        Upper bound; early stopping usually ends sooner. A training set too small for 200
        optimiser steps in ``epochs`` gets proportionally more epochs (and patience).
    patience : int or None, default=2
        Epochs without a better validation accuracy before stopping; the best weights are kept.
    validation_fraction : float or None, default=0.1
        Stratified share of the training data used for early stopping; None trains all epochs
        on everything.
    normalize : bool, default=True
        L2-normalise the vectors first.
    random_state : int, RandomState or None, default=0
    device : str, default="cpu"

    Attributes
    ----------
    classes_, n_features_in_
    model_ : torch.nn.Module
    loss_curve_ : list of float
        Mean training loss per epoch.
    val_scores_ : list of float
        Validation accuracy per epoch (empty without a validation split).
    best_epoch_ : int
        Epochs trained by the kept weights.
    """

    name = "mlp"

    def __init__(self, hidden: int = 512, dropout: float = 0.2, lr: float = 2e-3, weight_decay: float = 1e-2,
                 batch_size: int | str = "auto", epochs: int = 8, patience: int | None = 2,
                 validation_fraction: float | None = 0.1, normalize: bool = True, random_state: Any = 0,
                 device: str = "cpu") -> None:
        self.hidden = hidden
        self.dropout = dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.epochs = epochs
        self.patience = patience
        self.validation_fraction = validation_fraction
        self.normalize = normalize
        self.random_state = random_state
        self.device = device

    def _build(self) -> nn.Module:
        return nn.Sequential(nn.Linear(self.n_features_in_, self.hidden), nn.ReLU(), nn.Dropout(self.dropout),
                             nn.Linear(self.hidden, len(self.classes_)))

    def _prepare(self, X: torch.Tensor) -> torch.Tensor:
        X = X.to(self.device)
        return l2_normalize(X) if self.normalize else X

    @sized_threads
    def fit(self, X: Any, y: Any) -> "MLPHead":
        """Fit on ``X`` of shape (n_samples, dim) and labels ``y``; returns self."""
        X_np, y_np = self._validate_fit(X, y)
        X, y = self._prepare(torch.from_numpy(X_np)), torch.from_numpy(y_np).to(self.device)
        self._train(X, y, seed_from(self.random_state), F.cross_entropy)
        return self

    def _module_logits(self, X: torch.Tensor) -> torch.Tensor:
        return self.model_(X)

    def _logits(self, X: torch.Tensor) -> torch.Tensor:
        return self.model_(self._prepare(X))
