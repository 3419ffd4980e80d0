"""CLIP-E CrossEntropy: a one-hidden-layer MLP on frozen image vectors, trained with cross-entropy."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clip_heads.heads.base import Head, auto_batch_size, sized_threads, l2_normalize, seed_from, seeded, validation_split
from clip_heads.train import TensorBatches, Trainer


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(1) == y).float().mean().item()


class MLPHead(Head):
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
        Upper bound; early stopping usually ends sooner.
    patience : int, default=2
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
    loss_curve_ : list of float
        Mean training loss per epoch.
    val_scores_ : list of float
        Validation accuracy per epoch (empty without a validation split).
    best_epoch_ : int
        Epochs trained by the kept weights.
    """

    name = "mlp"

    def __init__(self, hidden: int = 512, dropout: float = 0.2, lr: float = 2e-3, weight_decay: float = 1e-2,
                 batch_size: int | str = "auto", epochs: int = 8, patience: int = 2, validation_fraction: float | None = 0.1,
                 normalize: bool = True, random_state: Any = 0, device: str = "cpu") -> None:
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

    def _build(self, dim: int, n_classes: int) -> nn.Module:
        return nn.Sequential(nn.Linear(dim, self.hidden), nn.ReLU(), nn.Dropout(self.dropout),
                             nn.Linear(self.hidden, n_classes)).to(self.device)

    def _prepare(self, X: torch.Tensor) -> torch.Tensor:
        X = X.to(self.device)
        return l2_normalize(X) if self.normalize else X

    @sized_threads
    def fit(self, X: Any, y: Any) -> "MLPHead":
        """Fit on ``X`` of shape (n_samples, dim) and labels ``y``; returns self."""
        X_np, y_np = self._validate_fit(X, y)
        seed = seed_from(self.random_state)
        X, y = self._prepare(torch.from_numpy(X_np)), torch.from_numpy(y_np).to(self.device)
        eval_fn = None
        if self.validation_fraction:
            tr, va = (torch.from_numpy(i).to(self.device) for i in validation_split(y_np, self.validation_fraction, seed))
            X, y, X_val, y_val = X[tr], y[tr], X[va], y[va]
            eval_fn = lambda: accuracy(self.model_(X_val), y_val)  # noqa: E731
        with seeded(seed, self.device):
            self.model_ = self._build(X.shape[1], len(self.classes_))
        model = self.model_
        trainer = Trainer(
            model, lambda b: F.cross_entropy(model(b[0]), b[1]),
            TensorBatches(X, y, batch_size=auto_batch_size(self.batch_size, len(X)), seed=seed), epochs=self.epochs, lr=self.lr,
            weight_decay=self.weight_decay, eval_fn=eval_fn, patience=self.patience, device=self.device,
            seed=seed).fit()
        model.eval()
        self.loss_curve_, self.val_scores_ = trainer.loss_curve, trainer.val_scores
        self.best_epoch_ = trainer.best_epoch if eval_fn is not None else trainer.epoch
        return self

    def _logits(self, X: torch.Tensor) -> torch.Tensor:
        return self.model_(self._prepare(X))

    def _extra_config(self) -> dict[str, Any]:
        return {"loss_curve_": self.loss_curve_, "val_scores_": self.val_scores_, "best_epoch_": self.best_epoch_}

    def _get_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.model_.state_dict())

    def _set_tensors(self, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        with seeded(0, self.device):  # the init is overwritten; just leave the caller's RNG alone
            self.model_ = self._build(self.n_features_in_, len(self.classes_))
        self.model_.load_state_dict(tensors)
        self.model_.eval()
        self.loss_curve_, self.val_scores_, self.best_epoch_ = extra["loss_curve_"], extra["val_scores_"], extra["best_epoch_"]
