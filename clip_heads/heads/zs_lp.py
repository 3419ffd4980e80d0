"""ZS-LP: the zero-shot-initialised linear probe (Silva-Rodríguez et al., CVPR 2024).

Paper: J. Silva-Rodríguez, S. Hajimiri, I. Ben Ayed, J. Dolz, *A Closer Look at the Few-Shot
Adaptation of Large Vision-Language Models*, CVPR 2024 (arXiv 2312.12730), Sec. 4.1, where it
is the strong, validation-free baseline that CLAP (:mod:`clip_heads.heads.clap`) builds on.

Objective: class prototypes ``w_k`` initialised at the zero-shot class vectors ``t_k`` (the
ensembled prompt vectors of the store's prompt set), logits the cosines of the L2-normalised
image vector to the L2-normalised prototypes at the backbone's own logit scale,
``l_ik = s * cos(f_i, w_k)`` (+ the bias of a sigmoid family), trained with the family's loss
(softmax cross-entropy for CLIP; the per-class sigmoid loss for SigLIP-like stores). At zero
epochs it *is* zero-shot.

Hyper-parameters and where they come from:

* prototypes initialised at the zero-shot vectors, normalised in every forward pass, the
  backbone's temperature: the paper's three changes to the linear probe.
* ``logit_scale``, ``logit_bias``, ``scoring``: the store's own rule
  (:class:`clip_heads.zeroshot.ScoringRule`, read from the store by the commands); CLIP's
  default (:data:`clip_heads.zeroshot.CLIP_LOGIT_SCALE`) when built by hand.
* optimiser: the paper trains 300 epochs of SGD (lr 0.1, batch 256) with no validation; here the
  package's one loop (:class:`clip_heads.train.Trainer`): AdamW at ``lr=1e-3`` (ours, chosen on
  the planted problem of ``benchmarks/bench_few_shot.py``), no weight decay (the paper's probe
  has none), trained to the plateau of the training loss (``patience=3`` rounds without it
  falling by ``tol=1e-3``; ours, from the same problem: longer runs only overfit the shots) -
  the validation-free rule, so the K shots are all used for training and nothing is held out. ``validation_fraction`` carves a validation split from the shots instead.
* ``epochs=200`` is a cap in rounds (of at least 32 optimiser steps, as every trained head of the
  package counts them); 0 returns the zero-shot classifier.
"""
from __future__ import annotations

from numbers import Integral
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clip_heads import zeroshot
from clip_heads.heads.base import (DEVICE, SCORING_CONSTRAINTS, TrainedHead, accuracy, auto_batch_size, l2_normalize,
                                   seed_from, validation_split)
from clip_heads.heads.params import (FRACTION, NON_NEGATIVE, POSITIVE, POSITIVE_INT, PROMPTS, Interval, StrOptions)
from clip_heads.heads.views import ViewsFit, rows_of
from clip_heads.heads.zero_shot import PromptEmbeds, class_prompt_vectors

__all__ = ["ZSLPHead", "Prototypes", "PromptHead", "rule_loss"]

NON_NEGATIVE_INT = Interval(Integral, 0, None, closed="left")


def rule_loss(logits: torch.Tensor, y: torch.Tensor, scoring: str) -> torch.Tensor:
    """The family's training loss on class logits: softmax cross-entropy, or (sigmoid families)
    the binary loss of every (sample, class) pair summed over classes, averaged over samples."""
    if scoring == "softmax":
        return F.cross_entropy(logits, y)
    target = F.one_hot(y, logits.shape[1]).to(logits.dtype)
    return F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / len(y)


class Prototypes(nn.Module):
    """Cosines of unit rows to the L2-normalised rows of ``weight`` (one prototype per class)."""

    def __init__(self, init: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(init.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ F.normalize(self.weight, dim=-1).T


class PromptHead(ViewsFit):
    """Mixin of the few-shot heads that start from prompt vectors: refuse a fit without them, and
    save the zero-shot class vectors they fitted from (``class_embeds_``, ``(n_classes, dim)``,
    the tensor ``class_embeds``) beside what each head adds through ``super()``."""

    def _check_inputs(self) -> None:
        if self.prompt_embeds is None:
            raise ValueError(f"{type(self).__name__} needs prompt_embeds (class prompt vectors from the text tower)")

    def _fit_class_embeds(self, dim: int) -> torch.Tensor:
        """Set and return ``class_embeds_``: the unit class vectors ``(n_classes, dim)`` of the
        prompts, rows in ``classes_`` order; ``ValueError`` if they do not have the dimension
        ``dim`` of the vectors they are compared with."""
        T = torch.from_numpy(class_prompt_vectors(self.prompt_embeds, self.classes_.tolist()))
        if T.shape[1] != dim:
            raise ValueError(f"{type(self).__name__}: prompt vectors have dim {T.shape[1]} but the vectors it scores have "
                             f"{dim}: image and text vectors must come from the same model")
        self.class_embeds_ = T
        return T

    def _get_tensors(self) -> dict[str, torch.Tensor]:
        return {"class_embeds": self.class_embeds_, **super()._get_tensors()}

    def _expected_tensors(self, found: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        return {"class_embeds": (len(self.classes_), self.n_features_in_), **super()._expected_tensors(found)}

    def _set_tensors(self, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        # First: a head's own state may be built from the class vectors (ZS-LP's prototypes).
        self.class_embeds_ = tensors["class_embeds"]
        self.prompt_embeds = self.class_embeds_.numpy()  # so that clone() + fit() of a loaded head works
        super()._set_tensors(tensors, extra)


class ZSLPHead(PromptHead, TrainedHead):
    """Zero-shot-initialised linear probe: prototypes start at the class prompt vectors.

    Parameters
    ----------
    prompt_embeds : array or dict
        Class prompt vectors, see :func:`~clip_heads.heads.zero_shot.class_prompt_vectors`.
    logit_scale, logit_bias, scoring : the store's scoring rule (CLIP: 100, 0, "softmax").
    lr : float, default=1e-3
    weight_decay : float, default=0.0
    batch_size : int or "auto", default="auto"
    epochs : int, default=200
        Cap in rounds of >= 32 steps; 0 = the zero-shot classifier itself.
    patience : int or None, default=3
        Rounds without the monitored score improving by ``tol`` that make a plateau.
    tol : float, default=1e-3
        Improvement of the training loss (or validation accuracy) that counts.
    validation_fraction : float or None, default=None
        None: the validation-free rule (plateau of the training loss on all the shots).
    use_views : bool, default=False
        Train on the augmented views too (``fit(X, y, views=...)``).
    random_state, device

    Attributes
    ----------
    classes_, n_features_in_, model_ (prototypes), class_embeds_ (the zero-shot vectors),
    loss_curve_, val_scores_, best_epoch_, n_epochs_, stop_reason_
    """

    name = "zs-lp"
    uses_prompts = True
    zero_shot_scoring = True
    _tensor_params = ("prompt_embeds",)

    def __init__(self, prompt_embeds: PromptEmbeds | None = None, logit_scale: float = zeroshot.CLIP_LOGIT_SCALE,
                 logit_bias: float = 0.0, scoring: str = "softmax", lr: float = 1e-3, weight_decay: float = 0.0,
                 batch_size: int | str = "auto", epochs: int = 200, patience: int | None = 3, tol: float = 1e-3,
                 validation_fraction: float | None = None, use_views: bool = False, random_state: Any = 0,
                 device: str = "cpu") -> None:
        self.prompt_embeds = prompt_embeds
        self.logit_scale = logit_scale
        self.logit_bias = logit_bias
        self.scoring = scoring
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.epochs = epochs
        self.patience = patience
        self.tol = tol
        self.validation_fraction = validation_fraction
        self.use_views = use_views
        self.random_state = random_state
        self.device = device

    _parameter_constraints = {"prompt_embeds": PROMPTS, **SCORING_CONSTRAINTS, "lr": [POSITIVE],
                              "weight_decay": [NON_NEGATIVE], "batch_size": [POSITIVE_INT, StrOptions({"auto"})],
                              "epochs": [NON_NEGATIVE_INT], "patience": [POSITIVE_INT, None], "tol": [NON_NEGATIVE],
                              "validation_fraction": [FRACTION, None], "use_views": ["boolean"],
                              "random_state": ["random_state"], "device": DEVICE}

    # -- fitting ------------------------------------------------------------------------
    def _prepare(self, X: torch.Tensor) -> torch.Tensor:
        return l2_normalize(X.to(self.device))

    def _fit_rows(self, X_np: np.ndarray, y_np: np.ndarray, views: np.ndarray | None) -> None:
        self._fit_class_embeds(self._text_dim(X_np))
        self._shots = len(X_np) / len(self.classes_)  # images (not views) per class, on average
        X, y = self._prepare(torch.from_numpy(X_np)), torch.from_numpy(y_np).to(self.device)
        V = None if views is None else self._prepare(torch.from_numpy(views))
        self._start(*rows_of(X, y, V))
        rule = self.scoring_rule()
        self._train_plateau(X, y, V, seed_from(self.random_state),
                            lambda m, xb, yb: rule_loss(rule.logits(self._cosines(m, xb)), yb, self.scoring)
                            + self._penalty(m))
        del self._shots

    def _text_dim(self, X: np.ndarray) -> int:
        """Dimension of the vectors the prompts are compared with."""
        return X.shape[1]

    def _cosines(self, model: nn.Module, X: torch.Tensor) -> torch.Tensor:
        """Cosines ``(n, n_classes)`` of prepared rows to the classes, by ``model``."""
        return model(X)

    def _start(self, X: torch.Tensor, y: torch.Tensor) -> None:
        """Set what the loss needs before training (CLAP: its multipliers)."""

    def _penalty(self, model: nn.Module) -> torch.Tensor | float:
        return 0.0

    def _frozen(self) -> bool:
        """Whether the prototypes stay at the zero-shot vectors (no training)."""
        return self.epochs == 0

    def _on_epoch_end(self, trainer: Any, logs: dict) -> None:
        """Called after every epoch of training (CLAP's multiplier update)."""

    def _build(self) -> nn.Module:
        return Prototypes(self.class_embeds_.to(torch.float32))

    def _train_plateau(self, X: torch.Tensor, y: torch.Tensor, V: torch.Tensor | None, seed: int,
                       loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        """The package's loop, to the plateau of the training loss (or of a validation split carved
        by image: the views of a validation image never train, and it is scored on its plain vector)."""
        from clip_heads.train import TensorBatches  # train.py knows nothing of heads

        self.model_ = model = self._build().to(self.device)
        self.loss_curve_, self.val_scores_ = [], []
        self.best_epoch_ = self.n_epochs_ = 0
        self.stop_reason_ = None
        if self._frozen():
            model.eval()
            return
        eval_fn = None
        if self.validation_fraction:
            tr, va = (torch.from_numpy(i).to(X.device)
                      for i in validation_split(y.cpu().numpy(), self.validation_fraction, seed))
            X_val, y_val = X[va], y[va]
            X, y = rows_of(X, y, V, tr)
            eval_fn = lambda: accuracy(self._cosines(model, X_val), y_val)  # noqa: E731  (cosines rank as the logits)
        else:
            X, y = rows_of(X, y, V)
        batches = TensorBatches(X, y, batch_size=auto_batch_size(self.batch_size, len(X)), seed=seed)
        self._run_loop(model, lambda b: loss_fn(model, b[0], b[1]), batches, seed, eval_fn, min_delta=self.tol,
                       on_epoch_end=self._on_epoch_end)

    # -- scoring ------------------------------------------------------------------------
    def _module_logits(self, X: torch.Tensor) -> torch.Tensor:
        return self.scoring_rule().logits(self._cosines(self.model_, X))

    def _exact_cosines(self, X: torch.Tensor) -> torch.Tensor:
        """Cosines in float64 for predictions (see :meth:`Head._all_logits`)."""
        return self._forward_exact(X)

    def _logits(self, X: torch.Tensor) -> torch.Tensor:
        return self.scoring_rule().logits(self._exact_cosines(self._prepare(X)))

    @property
    def prototypes_(self) -> np.ndarray:
        """The trained class prototypes ``(n_classes, dim)`` (not normalised)."""
        return self.model_.weight.detach().cpu().numpy()

    # -- save / load (class_embeds: PromptHead; model.*: TrainedHead) ------------------------
    def _expected_tensors(self, found: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        return {**super()._expected_tensors(found), "model.weight": (len(self.classes_), self.n_features_in_)}

