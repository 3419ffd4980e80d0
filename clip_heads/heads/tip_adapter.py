"""Tip-Adapter (Zhang et al., 2022): zero-shot logits plus a key-value cache of the training set.

``logits = zero_shot(x) + alpha * exp(-beta * (1 - x . keys^T)) @ one_hot(labels)``, where the
zero-shot term is the kernel's (:mod:`clip_heads.zeroshot`): ``logit_scale * cos(x, prompts)``
for CLIP, ``+ logit_bias`` for SigLIP's sigmoid rule.

Training-free: the cache is the L2-normalised training vectors; only alpha and beta are chosen,
on a validation split. Tip-Adapter-F (``finetune_keys=True``) also trains the keys.

With augmented views (``use_views=True``, ``fit(X, y, views=V)``, V ``(n_samples, K, dim)`` from
``encode --views K``) each key is, as in the paper (which averages the features of 10 epochs of
random-crop and flip augmentation), the normalised mean of the image's normalised views; the
zero-shot term and the validation queries stay the plain vectors.
"""
from __future__ import annotations

import logging
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clip_heads import zeroshot
from clip_heads.heads.base import (DEVICE, ROUND_STEPS, SCORING_CONSTRAINTS, Head, accuracy, auto_batch_size,
                                   l2_normalize, seed_from, threads_for, validation_split)
from clip_heads.heads.params import FRACTION, NON_NEGATIVE, POSITIVE, POSITIVE_INT, PROMPTS, StrOptions, check_grid
from clip_heads.heads.views import ViewsFit
from clip_heads.heads.zero_shot import PromptEmbeds, class_prompt_vectors
from clip_heads.train import TensorBatches, Trainer

logger = logging.getLogger(__name__)

# 0 keeps pure zero-shot in the running. The cache term is a sum over a class's cached samples,
# so its scale grows with the shots per class: the grid spans few-shot to full-dataset caches.
DEFAULT_ALPHAS = (0.0,) + tuple(float(a) for a in np.logspace(-4, 2, 25))
DEFAULT_BETAS = (0.5, 1.0, 2.0, 3.0, 4.0, 5.5, 7.0, 8.5, 10.0)
# Affinity entries materialised at once by the search; bounds memory whatever the cache size.
BLOCK_ELEMENTS = 2**24
# Prediction scores queries in blocks of exactly QUERY_BLOCK rows (the last one padded with zero
# rows) against the cache in chunks of KEY_BLOCK keys, in float32 at BLAS speed: every matrix
# product then has the same shape whatever the caller passes, so a row's scores are bitwise the
# same alone or among other rows (what the other heads buy with float64), and memory stays at
# one block's affinities (4 MiB) for any cache.
QUERY_BLOCK = 256
KEY_BLOCK = 4096


def _key_chunks(keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor | None,
                size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The cache (rows ``index`` of it, gathered a chunk at a time, or all of it) in chunks."""
    n = len(keys) if index is None else len(index)
    for j in range(0, n, size):
        if index is None:
            yield keys[j:j + size], values[j:j + size]
        else:
            part = index[j:j + size]
            yield keys.index_select(0, part), values.index_select(0, part)


def cache_logits(X: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, betas: torch.Tensor,
                 key_index: torch.Tensor | None = None) -> torch.Tensor:
    """``exp(-beta * (1 - X @ keys.T)) @ values`` for every beta, in blocks of rows and keys.

    Parameters
    ----------
    X : (n_samples, dim) unit rows.
    keys : (n_cache, dim); values : (n_cache, n_classes) one-hot.
    betas : (n_betas,)
    key_index : optional (m,) indices: the cache is those rows of ``keys`` / ``values``, gathered
        a chunk at a time (no copy of the whole cache).

    Returns
    -------
    (n_betas, n_samples, n_classes)
    """
    n_keys = len(keys) if key_index is None else len(key_index)
    chunk = max(1, min(n_keys, KEY_BLOCK))
    rows = max(1, BLOCK_ELEMENTS // max(1, chunk * len(betas)))
    out = X.new_zeros(len(betas), len(X), values.shape[1])
    for i in range(0, len(X), rows):
        block = out[:, i:i + rows]
        for k, v in _key_chunks(keys, values, key_index, chunk):
            distance = 1 - X[i:i + rows] @ k.T
            block += torch.exp(-betas[:, None, None] * distance) @ v
    return out


def _block_cache_logits(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, beta: float) -> torch.Tensor:
    """One query block's ``exp(-beta * (1 - q @ keys.T)) @ values``, a key chunk at a time.

    ``beta * s - beta`` comes out of the matrix product itself (addmm), and the exponential is
    taken in place: the affinities are written once and read twice, while still in cache.
    """
    acc = q.new_zeros(len(q), values.shape[1])
    shift = q.new_full((), -beta)
    for j in range(0, len(keys), KEY_BLOCK):
        affinity = torch.addmm(shift, q, keys[j:j + KEY_BLOCK].T, alpha=beta).exp_()
        acc.addmm_(affinity, values[j:j + KEY_BLOCK])
    return acc


class TipAdapterHead(ViewsFit, Head):
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
    logit_scale : float, default=:data:`clip_heads.zeroshot.CLIP_LOGIT_SCALE` (100)
        Scale of the zero-shot cosines: the model's own (an evaluation passes the store's).
    validation_fraction : float, default=0.2
        Stratified share of the training data held out for the search and for early stopping.
    finetune_keys : bool, default=False
        Tip-Adapter-F: train the keys as a linear layer (AdamW at a constant rate), leaving each
        training sample's own cache entry out of its logits so it cannot simply match itself.
        Training runs on the search split to the plateau of its validation accuracy
        (``patience`` epochs without a better one), then the full cache is trained for as many
        epochs. Its cost grows with ``n_samples**2``: meant for few-shot caches.
    epochs : int, default=200
        Safety cap of the fine-tuning (a warning says when it, not the plateau, stopped it).
    patience : int, default=10
    lr, batch_size : fine-tuning settings, defaults 1e-3, "auto" (256 or less).
    random_state : int, RandomState or None, default=0
    device : str, default="cpu"
    scoring : {"softmax", "sigmoid"}, default="softmax"
        The zero-shot rule of the model family (:class:`clip_heads.zeroshot.ScoringRule`);
        ``predict_proba`` is its class distribution over the combined logits. A head saved
        before this parameter existed loads as softmax.
    logit_bias : float, default=0.0
        The sigmoid rule's learned bias (SigLIP); a softmax ignores it.
    use_views : bool, default=False
        Keys from the augmented views (``fit(X, y, views=V)``): see the module docstring.

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
        Fine-tuning epochs used for the final keys; ``stop_reason_`` says why the validated
        fine-tuning ended ("plateau" or "epochs"), None without fine-tuning.
    """

    name = "tip-adapter"
    uses_prompts = True
    zero_shot_scoring = True
    _tensor_params = ("prompt_embeds",)
    _int_tensors = ("cache_labels",)
    _parameter_constraints = {"prompt_embeds": PROMPTS, "alpha": [NON_NEGATIVE, None],
                              "beta": [NON_NEGATIVE, None], "alphas": ["array-like"], "betas": ["array-like"],
                              **SCORING_CONSTRAINTS, "validation_fraction": [FRACTION],
                              "finetune_keys": ["boolean"], "epochs": [POSITIVE_INT], "patience": [POSITIVE_INT],
                              "lr": [POSITIVE], "batch_size": [POSITIVE_INT, StrOptions({"auto"})],
                              "random_state": ["random_state"], "device": DEVICE, "use_views": ["boolean"]}
    _extra_types = {"alpha_": (float, int), "beta_": (float, int), "search_scores_": (list, type(None)),
                    "best_epoch_": (int, type(None)), "stop_reason_": (str, type(None))}

    def __init__(self, prompt_embeds: PromptEmbeds | None = None, alpha: float | None = None,
                 beta: float | None = None, alphas: Sequence[float] = DEFAULT_ALPHAS,
                 betas: Sequence[float] = DEFAULT_BETAS, logit_scale: float = zeroshot.CLIP_LOGIT_SCALE,
                 validation_fraction: float = 0.2, finetune_keys: bool = False, epochs: int = 200,
                 patience: int = 10, lr: float = 1e-3, batch_size: int | str = "auto", random_state: Any = 0,
                 device: str = "cpu", *, scoring: str = "softmax", logit_bias: float = 0.0,
                 use_views: bool = False) -> None:
        self.prompt_embeds = prompt_embeds
        self.use_views = use_views
        self.alpha = alpha
        self.beta = beta
        self.alphas = alphas
        self.betas = betas
        self.logit_scale = logit_scale
        self.validation_fraction = validation_fraction
        self.finetune_keys = finetune_keys
        self.epochs = epochs
        self.patience = patience
        self.lr = lr
        self.batch_size = batch_size
        self.random_state = random_state
        self.device = device
        self.scoring = scoring
        self.logit_bias = logit_bias

    def _zero_shot(self, X: torch.Tensor) -> torch.Tensor:
        return self.scoring_rule().logits(zeroshot.cosine(X, self.class_embeds_.to(X)))

    def _check_params(self) -> None:
        super()._check_params()
        check_grid(type(self).__name__, "alphas", self.alphas, positive=False)
        check_grid(type(self).__name__, "betas", self.betas, positive=False)

    def fit(self, X: Any, y: Any, views: Any = None) -> "TipAdapterHead":
        """Build the cache from ``X`` (n_samples, dim) and ``y`` (keys from ``views`` with
        ``use_views``), choose alpha/beta; returns self."""
        return super().fit(X, y, views)

    def _check_inputs(self) -> None:
        if self.prompt_embeds is None:
            raise ValueError("TipAdapterHead needs prompt_embeds (class prompt vectors from the text tower)")

    def _fit_rows(self, X_np: np.ndarray, y_np: np.ndarray, views: np.ndarray | None) -> None:
        self._fit(X_np, y_np, views)

    def _fit(self, X_np: np.ndarray, y_np: np.ndarray, views: np.ndarray | None = None) -> None:
        self.class_embeds_ = torch.from_numpy(class_prompt_vectors(self.prompt_embeds, self.classes_.tolist()))
        if self.class_embeds_.shape[1] != X_np.shape[1]:
            raise ValueError(f"prompt vectors have dim {self.class_embeds_.shape[1]} but image vectors "
                             f"{X_np.shape[1]}: zero-shot logits need both from the same CLIP")
        seed = seed_from(self.random_state)
        # The cache (the one copy of X it keeps), normalised a block at a time: no temporaries of X's size.
        X_in, X = torch.from_numpy(X_np).to(self.device), torch.empty(X_np.shape, device=self.device)
        for i in range(0, len(X), QUERY_BLOCK * 8):
            X[i:i + QUERY_BLOCK * 8] = l2_normalize(X_in[i:i + QUERY_BLOCK * 8])
        y = torch.from_numpy(y_np).to(self.device)
        # A block at a time: the zero-shot kernel normalises its input, a copy of the whole X at once.
        zs = torch.cat([self._zero_shot(X[i:i + QUERY_BLOCK * 8]) for i in range(0, len(X), QUERY_BLOCK * 8)])
        # The cache's keys: the plain vectors, or the normalised mean of each image's normalised views.
        K = X if views is None else l2_normalize(l2_normalize(torch.from_numpy(views).to(self.device)).mean(1))
        values = F.one_hot(y, len(self.classes_)).float()
        search = self.alpha is None or self.beta is None
        alpha, beta = self.alpha, self.beta
        self.search_scores_, self.best_epoch_, self.stop_reason_ = None, None, None
        scale = 1.0
        if search or self.finetune_keys:
            split = validation_split(y_np, self.validation_fraction, seed)
            tr, va = (torch.from_numpy(i).to(self.device) for i in split)
            val = (X[va], zs[va], y[va])
            if search:
                alpha, beta = self._search(K, values, *val, key_index=tr)  # the split's cache, not a copy
                # Cache logits are sums over a class's entries, so an alpha found with the
                # smaller split cache is rescaled to the full cache used from now on.
                scale = len(tr) / len(X)
            if self.finetune_keys:
                keys, self.best_epoch_, self.stop_reason_ = self._finetune(K[tr], zs[tr], y[tr], values[tr], alpha,
                                                                           beta, seed, val)
                if search:  # trained keys shift the best trade-off, so search again (as the paper does)
                    alpha_ft, beta_ft = self._search(keys, values[tr], *val)
        self.keys_, self.cache_labels_ = K, y
        if self.finetune_keys:
            self.keys_, _, _ = self._finetune(K, zs, y, values, alpha * scale, beta, seed, None, self.best_epoch_)
            if search:
                alpha, beta = alpha_ft, beta_ft
        self.alpha_, self.beta_ = float(alpha * scale), float(beta)
        logger.info("tip-adapter: alpha=%g beta=%g", self.alpha_, self.beta_)

    def _search(self, keys: torch.Tensor, values: torch.Tensor, X_val: torch.Tensor, zs_val: torch.Tensor,
                y_val: torch.Tensor, key_index: torch.Tensor | None = None) -> tuple[float, float]:
        alphas = [float(a) for a in self.alphas] if self.alpha is None else [float(self.alpha)]
        betas = [float(b) for b in self.betas] if self.beta is None else [float(self.beta)]
        with torch.inference_mode():
            cache = cache_logits(X_val, keys, values, torch.tensor(betas, device=X_val.device), key_index)
            # A loop over the grid's alphas; each step scores every beta and sample at once.
            scores = torch.stack([((zs_val + a * cache).argmax(-1) == y_val).float().mean(-1) for a in alphas])
        i, j = divmod(int(scores.argmax()), len(betas))  # first best: smallest alpha, then beta
        self.search_scores_ = scores.cpu().tolist()
        logger.debug("tip-adapter search: alpha=%g beta=%g val accuracy %.4f", alphas[i], betas[j], scores[i, j])
        return alphas[i], betas[j]

    def _finetune(self, keys: torch.Tensor, zs: torch.Tensor, y: torch.Tensor, values: torch.Tensor,
                  alpha: float, beta: float, seed: int, val: tuple | None, epochs: int | None = None,
                  ) -> tuple[torch.Tensor, int, str]:
        """Train the keys (the cache's own samples are the training set).

        With ``val``: to the plateau of the validation accuracy. Without: exactly ``epochs``
        epochs at the same rate (the refit on the whole cache). Returns keys, the best (or
        last) epoch and why training stopped.
        """
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
        batches = TensorBatches(keys, zs, y, own, seed=seed,
                                batch_size=auto_batch_size(self.batch_size, len(keys), cap=256))
        stretch = max(1, -(-ROUND_STEPS // len(batches)))  # patience and cap in rounds, as TrainedHead's
        monitored = val is not None
        trainer = Trainer(adapter, lambda b: F.cross_entropy(logits(b[0], b[1], b[3]), b[2]), batches,
                          epochs=self.epochs * stretch if monitored else epochs, lr=self.lr, eval_fn=eval_fn,
                          schedule="plateau" if monitored else "constant",
                          patience=self.patience * stretch if monitored else None,
                          warmup_steps=min(len(batches), ROUND_STEPS), device=self.device, seed=seed).fit()
        best = trainer.best_epoch if monitored else trainer.epoch
        return adapter.weight.detach().clone(), max(best, 1), trainer.stop_reason

    def _all_logits(self, X: Any) -> np.ndarray:
        # Not the base class's float64 blocks: fixed-shape float32 blocks (see QUERY_BLOCK) give
        # the same row independence at BLAS speed, which a cache of 100k+ keys needs.
        X = self._validate_X(X)
        out = torch.empty(len(X), len(self.classes_))
        with torch.inference_mode(), threads_for(QUERY_BLOCK * self.keys_.numel()):
            keys = self.keys_.to(self.device, torch.float32)
            values = F.one_hot(self.cache_labels_.to(self.device), len(self.classes_)).float()
            q = torch.zeros(QUERY_BLOCK, X.shape[1], device=self.device)
            for i in range(0, len(X), QUERY_BLOCK):
                rows = X[i:i + QUERY_BLOCK]
                q.zero_()
                q[:len(rows)] = rows
                out[i:i + len(rows)] = self._cached_logits(q, keys, values)[:len(rows)].cpu()
        return out.numpy()

    def _cached_logits(self, X: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        X = l2_normalize(X)
        return self._zero_shot(X) + self.alpha_ * _block_cache_logits(X, keys, values, float(self.beta_))

    def _logits(self, X: torch.Tensor) -> torch.Tensor:
        values = F.one_hot(self.cache_labels_.to(X.device), len(self.classes_)).to(X.dtype)
        return self._cached_logits(X, self.keys_.to(X), values)

    def _extra_config(self) -> dict[str, Any]:
        return {"alpha_": self.alpha_, "beta_": self.beta_, "search_scores_": self.search_scores_,
                "best_epoch_": self.best_epoch_, "stop_reason_": self.stop_reason_}

    def _get_tensors(self) -> dict[str, torch.Tensor]:
        return {"class_embeds": self.class_embeds_, "keys": self.keys_, "cache_labels": self.cache_labels_}

    def _expected_tensors(self, found: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        d, k = self.n_features_in_, len(self.classes_)
        shape = found.get("keys", ())
        n = shape[0] if len(shape) == 2 and shape[0] > 0 else -1  # the cache holds what the file says
        return {"class_embeds": (k, d), "keys": (n, d), "cache_labels": (n,)}

    def _set_tensors(self, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        labels = tensors["cache_labels"]
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(self.classes_)):
            raise ValueError(f"cache_labels must be class indices in [0, {len(self.classes_)}), "
                             f"got values from {int(labels.min())} to {int(labels.max())}")
        self.class_embeds_, self.keys_ = tensors["class_embeds"], tensors["keys"].to(self.device)
        self.cache_labels_ = labels.to(self.device)
        self.prompt_embeds = self.class_embeds_.numpy()
        self.alpha_, self.beta_ = float(extra["alpha_"]), float(extra["beta_"])
        self.search_scores_, self.best_epoch_ = extra["search_scores_"], extra["best_epoch_"]
        self.stop_reason_ = extra["stop_reason_"]
