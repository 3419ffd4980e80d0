"""CLIP-E Contrastive: project image vectors onto frozen class prompt vectors with a CLIP-style loss.

Because prediction is a cosine to prompt vectors, a trained head can classify over a label set
it never saw: give it new prompts with :meth:`ContrastiveHead.with_prompts`.
"""
from __future__ import annotations

import copy
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.utils.validation import check_is_fitted
from torch import nn

from clip_heads.heads.base import TrainedHead, l2_normalize, seed_from, trained_head_constraints
from clip_heads.heads.params import POSITIVE, POSITIVE_INT, PROMPTS
from clip_heads.heads.zero_shot import PromptEmbeds, class_prompt_vectors, sorted_class_vectors


def multi_positive_clip_loss(image: torch.Tensor, text: torch.Tensor, labels: torch.Tensor,
                             temperature: float) -> torch.Tensor:
    """Symmetric CLIP loss where every same-class pair in the batch is a positive.

    A batch holds several samples of a class, so column j is as right an answer for row i as
    the diagonal whenever they share a label: the target of row i is uniform over those columns.
    With exactly one frozen vector per class (this head's default) duplicate rows make this equal
    to the diagonal loss; it differs, and the diagonal one is wrong, as soon as a class's texts
    differ (several templates or captions), where the diagonal target would ask an image to
    prefer one phrasing of its own class over another.

    Parameters
    ----------
    image, text : (batch, dim) tensors, L2-normalised inside.
    labels : (batch,) class indices.
    """
    logits = l2_normalize(text) @ l2_normalize(image).T / temperature
    same = (labels[:, None] == labels[None, :]).float()
    # `same` is symmetric, so these soft targets serve both directions.
    targets = same / same.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


def class_clip_loss(image: torch.Tensor, class_text: torch.Tensor, labels: torch.Tensor,
                    temperature: float) -> torch.Tensor:
    """:func:`multi_positive_clip_loss` of ``(image, class_text[labels], labels)``, from the
    ``(n_classes, batch)`` cosines instead of the ``(batch, batch)`` ones.

    When a sample's text is its class's one vector, the batch's text rows repeat a handful of
    vectors, and both directions of the loss reduce to per-class terms: a text row of class c is
    ``logsumexp_j s[c, j] - mean over c's images j of s[c, j]``, an image column j is
    ``log sum_c n_c exp(s[c, j]) - s[c_j, j]`` (n_c the class's count in the batch). Equal to the
    pairwise loss (to float rounding) at a fraction of its cost: its matrix product is as large
    as the image tower's layers, this one is n_classes / batch of it.

    Parameters
    ----------
    image : (batch, dim); class_text : (n_classes, dim), both L2-normalised inside.
    labels : (batch,) class indices into ``class_text``.
    """
    s = l2_normalize(class_text) @ l2_normalize(image).T / temperature  # (n_classes, batch)
    counts = torch.bincount(labels, minlength=len(class_text)).to(s.dtype)
    own = s.gather(0, labels[None, :])[0]  # s[c_j, j]
    texts = (counts * torch.logsumexp(s, dim=1)).sum() - own.sum()  # rows of absent classes weigh 0
    images = torch.logsumexp(s + counts.log()[:, None], dim=0) - own  # log 0 = -inf: absent classes drop out
    return 0.5 * (texts / len(labels) + images.mean())


class ContrastiveHead(TrainedHead):
    """``Linear(dim, hidden) -> ReLU -> Linear(hidden, text_dim)`` aligned to class prompt vectors.

    Parameters
    ----------
    prompt_embeds : array or dict
        Class prompt vectors from the text tower; see
        :func:`~clip_heads.heads.zero_shot.class_prompt_vectors`. Array rows follow the sorted
        labels of ``y``.
    hidden : int, default=512
    temperature : float, default=0.075
        Divides the cosines in the loss and in ``predict_proba``.
    lr : float, default=3e-3
        AdamW rate, constant after one epoch of warm-up (on the FI-sized planted problem of
        benchmarks/bench_heads.py, 3e-3 reached a better plateau in fewer epochs than 1e-3:
        accuracy 0.788 vs 0.758, 63 vs 93 epochs).
    weight_decay : float, default=1e-2
    batch_size : int or "auto", default="auto"
        "auto" is 512, or fewer on small data so that an epoch still has ~32 steps; larger
        batches hold more negatives per step.
    epochs : int, default=200
        A safety cap; training stops at the validation plateau, as
        :class:`~clip_heads.heads.mlp.MLPHead`'s does.
    patience : int or None, default=10
        Epochs without a better validation accuracy that make a plateau; None trains exactly
        ``epochs`` epochs.
    validation_fraction : float or None, default=0.1
        Stratified share held out to find the plateau; None uses the training loss's.
    normalize : bool, default=True
        L2-normalise the image vectors first.
    random_state : int, RandomState or None, default=0
    device : str, default="cpu"

    Attributes
    ----------
    classes_, n_features_in_, model_, loss_curve_, val_scores_, best_epoch_
    class_embeds_ : torch.Tensor (n_classes, text_dim)
        Unit prompt vectors predicted against, rows in ``classes_`` order.
    """

    name = "contrastive"
    uses_prompts = True
    can_requery = True
    _tensor_params = ("prompt_embeds",)
    _parameter_constraints = {"prompt_embeds": PROMPTS, "hidden": [POSITIVE_INT],
                              "temperature": [POSITIVE], **trained_head_constraints()}

    def __init__(self, prompt_embeds: PromptEmbeds | None = None, hidden: int = 512, temperature: float = 0.075,
                 lr: float = 3e-3, weight_decay: float = 1e-2, batch_size: int | str = "auto", epochs: int = 200,
                 patience: int | None = 10, validation_fraction: float | None = 0.1, normalize: bool = True,
                 random_state: Any = 0, device: str = "cpu") -> None:
        self.prompt_embeds = prompt_embeds
        self.hidden = hidden
        self.temperature = temperature
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
        text_dim = self.class_embeds_.shape[1]
        return nn.Sequential(nn.Linear(self.n_features_in_, self.hidden), nn.ReLU(),
                             nn.Linear(self.hidden, text_dim))

    def _prepare(self, X: torch.Tensor) -> torch.Tensor:
        X = X.to(self.device)
        return l2_normalize(X) if self.normalize else X

    def fit(self, X: Any, y: Any) -> "ContrastiveHead":
        """Fit on ``X`` of shape (n_samples, dim) and labels ``y``; returns self."""
        self._check_params()
        if self.prompt_embeds is None:
            raise ValueError("ContrastiveHead needs prompt_embeds (class prompt vectors from the text tower)")
        return super().fit(X, y)

    def _fit(self, X_np: np.ndarray, y_np: np.ndarray) -> None:
        self.class_embeds_ = torch.from_numpy(class_prompt_vectors(self.prompt_embeds, self.classes_.tolist()))
        text = self.class_embeds_.to(self.device)
        # Normalised a batch at a time (prepare=): no normalised copy of the training data.
        X, y = torch.from_numpy(X_np).to(self.device), torch.from_numpy(y_np).to(self.device)
        # The text of a sample is its class's prompt vector, frozen: multi_positive_clip_loss of
        # text[labels], computed per class.
        self._train(X, y, seed_from(self.random_state),
                    lambda image, labels: class_clip_loss(image, text, labels, self.temperature),
                    prepare=l2_normalize if self.normalize else None)

    def with_prompts(self, prompt_embeds: PromptEmbeds, classes: Sequence[Any] | None = None) -> "ContrastiveHead":
        """A copy of this fitted head that predicts over a new label set.

        Parameters
        ----------
        prompt_embeds : array or dict
            Prompt vectors of the new classes (same text tower as in training).
        classes : sequence, optional
            Labels of the array rows; not needed for a dict.
        """
        check_is_fitted(self)
        classes_, vectors = sorted_class_vectors(prompt_embeds, classes)
        if vectors.shape[1] != self.class_embeds_.shape[1]:
            raise ValueError(f"new prompt vectors have dim {vectors.shape[1]}, the head projects to "
                             f"{self.class_embeds_.shape[1]} (a different text tower?)")
        head = copy.deepcopy(self)
        head.prompt_embeds, head.classes_, head.class_embeds_ = vectors, classes_, torch.from_numpy(vectors)
        return head

    def _module_logits(self, X: torch.Tensor) -> torch.Tensor:
        image = l2_normalize(self.model_(X))
        return image @ self.class_embeds_.to(image.device).T / self.temperature

    def _logits(self, X: torch.Tensor) -> torch.Tensor:
        image = l2_normalize(self._forward_exact(self._prepare(X)))
        return image @ self.class_embeds_.to(image).T / self.temperature

    def _get_tensors(self) -> dict[str, torch.Tensor]:
        return {"class_embeds": self.class_embeds_, **super()._get_tensors()}

    def _expected_tensors(self, found: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        d, h, k = self.n_features_in_, self.hidden, len(self.classes_)
        shape = found.get("class_embeds", ())
        t = shape[1] if len(shape) == 2 and shape[1] > 0 else -1  # the text dim is what the file says
        return {"class_embeds": (k, t), "model.0.weight": (h, d), "model.0.bias": (h,), "model.2.weight": (t, h),
                "model.2.bias": (t,)}

    def _set_tensors(self, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        self.class_embeds_ = tensors["class_embeds"]
        self.prompt_embeds = self.class_embeds_.numpy()  # so that clone() + fit() of a loaded head works
        super()._set_tensors(tensors, extra)
