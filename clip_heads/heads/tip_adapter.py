"""Tip-Adapter (Zhang et al., 2022): zero-shot logits plus a key-value cache of the training set.

``logits = logit_scale * cos(x, prompts) + alpha * exp(-beta * (1 - x . keys^T)) @ one_hot(labels)``

Training-free: the cache is the L2-normalised training vectors; only alpha and beta are chosen,
on a validation split. Tip-Adapter-F (``finetune_keys=True``) also trains the keys.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clip_heads.heads.base import (Head, accuracy, auto_batch_size, l2_normalize, seed_from, sized_threads,
                                   validation_split)
from clip_heads.heads.zero_shot import PromptEmbeds, class_prompt_vectors
from clip_heads.train import TensorBatches, Trainer

logger = logging.getLogger(__name__)

# 0 keeps pure zero-shot in the running. The cache term is a sum over a class's cached samples,
# so its scale grows with the shots per class: the grid spans few-shot to full-dataset caches.
DEFAULT_ALPHAS = (0.0,) + tuple(float(a) for a in np.logspace(-4, 2, 25))
DEFAULT_BETAS = (0.5, 1.0, 2.0, 3.0, 4.0, 5.5, 7.0, 8.5, 10.0)
# Affinity entries materialised at once; bounds memory whatever the cache size.
BLOCK_ELEMENTS = 2**24


def cache_logits(X: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, betas: torch.Tensor) -> torch.Tensor:
    """``exp(-beta * (1 - X @ keys.T)) @ values`` for every beta, computed in row blocks.

    Parameters
    ----------
    X : (n_samples, dim) unit rows.
    keys : (n_cache, dim); values : (n_cache, n_classes) one-hot.
    betas : (n_betas,)

    Returns
    -------
    (n_betas, n_samples, n_classes)
    """
    rows = max(1, BLOCK_ELEMENTS // max(1, len(keys) * len(betas)))
    out = []
    for i in range(0, len(X), rows):
        distance = 1 - X[i:i + rows] @ keys.T
        out.append(torch.exp(-betas[:, None, None] * distance) @ values)
    return torch.cat(out, dim=1) if out else X.new_zeros(len(betas), 0, values.shape[1])


class TipAdapterHead(Head):
    """Tip-Adapter / Tip-Adapter-F over cached image vectors and class prompt vectors.

    Parameters
    ----------
    prompt_embeds : array or dict
        Class prompt vectors (same space as the image vectors); see
        :func:`~clip_heads.heads.zero_shot.class_prompt_vectors`. Array rows follow sorted labels.
    alpha, beta : float, optional
        Fixed cache weight and sharpness; a None one is searched over ``alphas`` / ``betas``.
    alphas, betas : sequence of float
        Search grids.
    logit_scale : float, default=100.0
        Scale of the zero-shot cosines (CLIP's).
    validation_fraction : float, default=0.2
        Stratified share of the training data held out for the search and for early stopping.
    finetune_keys : bool, default=False
        Tip-Adapter-F: train the keys as a linear layer (AdamW, cosine schedule), leaving each
        training sample's own cache entry out of its logits so it cannot simply match itself.
        Its cost grows with ``n_samples**2``: meant for few-shot caches.
    epochs, lr, batch_size : fine-tuning settings, defaults 20, 1e-3, "auto" (256 or less).
    random_state : int, RandomState or None, default=0
    device : str, default="cpu"

    Attributes
    ----------
    classes_, n_features_in_
    alpha_, beta_ : float
        Values used at prediction.
    search_scores_ : list of lists or None
        Validation accuracy on the ``alphas`` x ``betas`` grid.
    keys_ : torch.Tensor (n_cache, dim); cache_labels_ : torch.Tensor (n_cache,)
    class_embeds_ : torch.Tensor (n_classes, dim)
    best_epoch_ : int or None
        Fine-tuning epochs used for the final keys.
    """

    name = "tip-adapter"
    _tensor_params = ("prompt_embeds",)

    def __init__(self, prompt_embeds: PromptEmbeds | None = None, alpha: float | None = None,
                 beta: float | None = None, alphas: Sequence[float] = DEFAULT_ALPHAS,
                 betas: Sequence[float] = DEFAULT_BETAS, logit_scale: float = 100.0,
                 validation_fraction: float = 0.2, finetune_keys: bool = False, epochs: int = 20,
                 lr: float = 1e-3, batch_size: int | str = "auto", random_state: Any = 0,
                 device: str = "cpu") -> None:
        self.prompt_embeds = prompt_embeds
        self.alpha = alpha
        self.beta = beta
        self.alphas = alphas
        self.betas = betas
        self.logit_scale = logit_scale
        self.validation_fraction = validation_fraction
        self.finetune_keys = finetune_keys
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.random_state = random_state
        self.device = device

    def _zero_shot(self, X: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * X @ self.class_embeds_.to(X.device).T

    @sized_threads
    def fit(self, X: Any, y: Any) -> "TipAdapterHead":
        """Build the cache from ``X`` (n_samples, dim) and ``y``, choose alpha/beta; returns self."""
        if self.prompt_embeds is None:
            raise ValueError("TipAdapterHead needs prompt_embeds (class prompt vectors from the text tower)")
        X_np, y_np = self._validate_fit(X, y)
        self.class_embeds_ = torch.from_numpy(class_prompt_vectors(self.prompt_embeds, self.classes_.tolist()))
        if self.class_embeds_.shape[1] != X_np.shape[1]:
            raise ValueError(f"prompt vectors have dim {self.class_embeds_.shape[1]} but image vectors "
                             f"{X_np.shape[1]}: zero-shot logits need both from the same CLIP")
        seed = seed_from(self.random_state)
        X = l2_normalize(torch.from_numpy(X_np).to(self.device))
        y = torch.from_numpy(y_np).to(self.device)
        zs = self._zero_shot(X)
        values = F.one_hot(y, len(self.classes_)).float()
        search = self.alpha is None or self.beta is None
        alpha, beta = self.alpha, self.beta
        self.search_scores_, self.best_epoch_ = None, None
        scale = 1.0
        if search or self.finetune_keys:
            split = validation_split(y_np, self.validation_fraction, seed)
            tr, va = (torch.from_numpy(i).to(self.device) for i in split)
            val = (X[va], zs[va], y[va])
            if search:
                alpha, beta = self._search(X[tr], values[tr], *val)
                # Cache logits are sums over a class's entries, so an alpha found with the
                # smaller split cache is rescaled to the full cache used from now on.
                scale = len(tr) / len(X)
            if self.finetune_keys:
                keys, self.best_epoch_ = self._finetune(X[tr], zs[tr], y[tr], values[tr], alpha, beta, seed, val)
                if search:  # trained keys shift the best trade-off, so search again (as the paper does)
                    alpha_ft, beta_ft = self._search(keys, values[tr], *val)
        self.keys_, self.cache_labels_ = X, y
        if self.finetune_keys:
            self.keys_, _ = self._finetune(X, zs, y, values, alpha * scale, beta, seed, None, self.best_epoch_)
            if search:
                alpha, beta = alpha_ft, beta_ft
        self.alpha_, self.beta_ = float(alpha * scale), float(beta)
        logger.info("tip-adapter: alpha=%g beta=%g", self.alpha_, self.beta_)
        return self

    def _search(self, keys: torch.Tensor, values: torch.Tensor, X_val: torch.Tensor, zs_val: torch.Tensor,
                y_val: torch.Tensor) -> tuple[float, float]:
        alphas = [float(a) for a in self.alphas] if self.alpha is None else [float(self.alpha)]
        betas = [float(b) for b in self.betas] if self.beta is None else [float(self.beta)]
        with torch.inference_mode():
            cache = cache_logits(X_val, keys, values, torch.tensor(betas, device=X_val.device))
            # A loop over the grid's alphas; each step scores every beta and sample at once.
            scores = torch.stack([((zs_val + a * cache).argmax(-1) == y_val).float().mean(-1) for a in alphas])
        i, j = divmod(int(scores.argmax()), len(betas))  # first best: smallest alpha, then beta
        self.search_scores_ = scores.cpu().tolist()
        logger.debug("tip-adapter search: alpha=%g beta=%g val accuracy %.4f", alphas[i], betas[j], scores[i, j])
        return alphas[i], betas[j]

    def _finetune(self, keys: torch.Tensor, zs: torch.Tensor, y: torch.Tensor, values: torch.Tensor,
                  alpha: float, beta: float, seed: int, val: tuple | None, epochs: int | None = None,
                  ) -> tuple[torch.Tensor, int]:
        """Train the keys (the cache's own samples are the training set); returns keys, best epoch."""
        # skip_init: the weights are the cache keys, and the caller's RNG stays untouched.
        adapter = torch.nn.utils.skip_init(nn.Linear, keys.shape[1], len(keys), bias=False, device=keys.device)
        with torch.no_grad():
            adapter.weight.copy_(keys)

        def logits(x: torch.Tensor, z: torch.Tensor, own: torch.Tensor | None = None) -> torch.Tensor:
            affinity = torch.exp(-beta * (1 - adapter(x)))
            if own is not None:  # leave-one-out: a sample may not vote for itself
                affinity = affinity.scatter(1, own[:, None], 0.0)
            return z + alpha * affinity @ values

        eval_fn = None if val is None else (lambda: accuracy(logits(val[0], val[1]), val[2]))
        own = torch.arange(len(keys), device=keys.device)
        trainer = Trainer(adapter, lambda b: F.cross_entropy(logits(b[0], b[1], b[3]), b[2]),
                          TensorBatches(keys, zs, y, own, seed=seed,
                                        batch_size=auto_batch_size(self.batch_size, len(keys), cap=256)),
                          epochs=epochs or self.epochs, lr=self.lr, eval_fn=eval_fn, device=self.device,
                          seed=seed).fit()
        best = trainer.best_epoch if val is not None else trainer.epoch
        return adapter.weight.detach().clone(), max(best, 1)

    def _logits(self, X: torch.Tensor) -> torch.Tensor:
        X = l2_normalize(X)
        keys, labels = self.keys_.to(X.device), self.cache_labels_.to(X.device)
        values = F.one_hot(labels, len(self.classes_)).to(X.dtype)
        beta = torch.tensor([self.beta_], device=X.device, dtype=X.dtype)
        return self._zero_shot(X) + self.alpha_ * cache_logits(X, keys, values, beta)[0]

    def _extra_config(self) -> dict[str, Any]:
        return {"alpha_": self.alpha_, "beta_": self.beta_, "search_scores_": self.search_scores_,
                "best_epoch_": self.best_epoch_}

    def _get_tensors(self) -> dict[str, torch.Tensor]:
        return {"class_embeds": self.class_embeds_, "keys": self.keys_, "cache_labels": self.cache_labels_}

    def _set_tensors(self, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        self.class_embeds_, self.keys_ = tensors["class_embeds"], tensors["keys"].to(self.device)
        self.cache_labels_ = tensors["cache_labels"].to(self.device)
        self.prompt_embeds = self.class_embeds_.numpy()
        self.alpha_, self.beta_ = extra["alpha_"], extra["beta_"]
        self.search_scores_, self.best_epoch_ = extra["search_scores_"], extra["best_epoch_"]
