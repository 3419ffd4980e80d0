"""CLIP-E CrossEntropy: a one-hidden-layer MLP on frozen image vectors, trained with cross-entropy."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clip_heads.heads.base import TrainedHead, l2_normalize, seed_from, trained_head_constraints
from clip_heads.heads.params import POSITIVE_INT, Interval, Real
from clip_heads.heads.views import ViewsFit


# Dropout's mask from 16-bit random integers, four to a 64-bit draw: on CPU, nn.Dropout's
# per-element Bernoulli draws cost more than the layer's matrix product.
_LEVELS = 1 << 16


class Dropout(nn.Dropout):
    """``nn.Dropout`` whose CPU mask is drawn 16 bits an element (the rate in steps of 1/65536,
    the kept units scaled by the exact inverse of that rate, so the layer stays unbiased);
    on other devices, and in eval mode, it is ``nn.Dropout``. No parameters: saved heads are unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dropped = round(self.p * _LEVELS)
        if not self.training or x.device.type != "cpu" or dropped in (0, _LEVELS) or self.inplace:
            return super().forward(x)
        # The whole int64 range (random_()'s default stops at 2**63 - 1, leaving the top bit 0).
        bits = torch.empty(-(-x.numel() // 4), dtype=torch.int64, device=x.device).random_(-2**63, 2**63 - 1)
        bits = bits.view(torch.int16)[:x.numel()].view(x.shape)
        keep = (bits >= dropped - _LEVELS // 2).to(x.dtype).mul_(_LEVELS / (_LEVELS - dropped))
        return x * keep


class MLPHead(ViewsFit, TrainedHead):
    """``Linear(dim, hidden) -> ReLU -> Dropout -> Linear(hidden, n_classes)``, AdamW, trained to a plateau.

    Parameters
    ----------
    hidden : int, default=512
    dropout : float, default=0.2
    lr : float, default=2e-3
        AdamW learning rate, constant after one epoch of warm-up.
    weight_decay : float, default=1e-2
    batch_size : int or "auto", default="auto"
        "auto" is 512, or fewer on small data so that an epoch still has ~32 steps.
    epochs : int, default=200
        A safety cap: training stops at the validation plateau (see ``patience``), and a
        warning says when the cap stopped it instead. Counted, like ``patience``, in rounds
        of at least 32 optimiser steps on small data.
    patience : int or None, default=10
        Epochs without a better validation accuracy that make a plateau; the best weights
        are kept. None trains exactly ``epochs`` epochs.
    validation_fraction : float or None, default=0.1
        Stratified share of the training data held out to find the plateau; None uses the
        training loss's plateau (and all the data for training).
    normalize : bool, default=True
        L2-normalise the vectors first.
    random_state : int, RandomState or None, default=0
    device : str, default="cpu"
    use_views : bool, default=False
        Train on the images' augmented views too (``fit(X, y, views=V)``); the validation split
        holds plain vectors of held-out images only.

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
    n_epochs_ : int
        Epochs run; ``stop_reason_`` says why they ended ("plateau" or "epochs").
    """

    name = "mlp"
    _parameter_constraints = {"hidden": [POSITIVE_INT], "dropout": [Interval(Real, 0, 1, closed="left")],
                              **trained_head_constraints(), "use_views": ["boolean"]}

    def __init__(self, hidden: int = 512, dropout: float = 0.2, lr: float = 2e-3, weight_decay: float = 1e-2,
                 batch_size: int | str = "auto", epochs: int = 200, patience: int | None = 10,
                 validation_fraction: float | None = 0.1, normalize: bool = True, random_state: Any = 0,
                 device: str = "cpu", use_views: bool = False) -> None:
        self.use_views = use_views
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
        return nn.Sequential(nn.Linear(self.n_features_in_, self.hidden), nn.ReLU(), Dropout(self.dropout),
                             nn.Linear(self.hidden, len(self.classes_)))

    def _prepare(self, X: torch.Tensor) -> torch.Tensor:
        X = X.to(self.device)
        return l2_normalize(X) if self.normalize else X

    def _fit_rows(self, X: np.ndarray, y: np.ndarray, views: np.ndarray | None) -> None:
        self._fit(X, y, views)

    def _fit(self, X: np.ndarray, y: np.ndarray, views: np.ndarray | None = None) -> None:
        # Normalised a batch at a time (prepare=): no normalised copy of the training data.
        X, y = torch.from_numpy(X).to(self.device), torch.from_numpy(y).to(self.device)
        V = None if views is None else torch.from_numpy(views).to(self.device)
        self._train(X, y, seed_from(self.random_state), F.cross_entropy,
                    prepare=l2_normalize if self.normalize else None, views=V)

    def _expected_tensors(self, found: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        d, h, k = self.n_features_in_, self.hidden, len(self.classes_)
        return {"model.0.weight": (h, d), "model.0.bias": (h,), "model.3.weight": (k, h), "model.3.bias": (k,)}

    def _module_logits(self, X: torch.Tensor) -> torch.Tensor:
        return self.model_(X)

    def _logits(self, X: torch.Tensor) -> torch.Tensor:
        return self._forward_exact(self._prepare(X))
