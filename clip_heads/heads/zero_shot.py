"""Zero-shot: cosine of image vectors to class prompt vectors, scored with the model's own rule, no training.

The ensembling and the scoring are the zero-shot kernel's (:mod:`clip_heads.zeroshot`), so this
head's probabilities are those of ``clip-heads zero-shot`` on the same store.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence, Union

import numpy as np
import torch
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_array, column_or_1d

from clip_heads import zeroshot
from clip_heads.heads.base import DEVICE, SCORING_CONSTRAINTS, Head
from clip_heads.heads.params import PROMPTS

# One (n_classes, dim) array with rows in class order, an (n_classes, n_templates, dim) array,
# or {class_name: (n_templates, dim) or (dim,) array}.
PromptEmbeds = Union[np.ndarray, Mapping[Any, Any]]


def class_prompt_vectors(prompt_embeds: PromptEmbeds, classes: Sequence[Any]) -> np.ndarray:
    """One unit vector per class from its prompt embeddings: the zero-shot kernel's template
    ensemble (:func:`clip_heads.zeroshot.ensemble`: each prompt vector L2-normalised, the
    prompts of a class summed, the sum normalised again, as in CLIP's prompt ensembling).

    Parameters
    ----------
    prompt_embeds : array or dict
        ``(n_classes, dim)`` or ``(n_classes, n_templates, dim)`` with rows in the order of
        ``classes``; or a dict ``{class_name: (n_templates, dim) array}`` (a ``(dim,)`` vector
        counts as one template). Dict keys may be the labels or their ``str()``.
    classes : sequence
        Class labels, in the order the returned rows should follow.

    Returns
    -------
    np.ndarray of shape (n_classes, dim), float32, unit rows.
    """
    if isinstance(prompt_embeds, Mapping):
        missing = [c for c in classes if c not in prompt_embeds and str(c) not in prompt_embeds]
        if missing:
            raise ValueError(f"prompt_embeds has no prompts for classes {missing}; "
                             f"it has {sorted(map(str, prompt_embeds))}")
        per_class = [np.asarray(prompt_embeds[c if c in prompt_embeds else str(c)], dtype=np.float32)
                     for c in classes]
        per_class = [p.reshape(-1, p.shape[-1]) for p in per_class]
        dims = {p.shape[-1] for p in per_class}
        if len(dims) != 1:
            raise ValueError(f"prompt vectors of different classes have different dimensions {sorted(dims)}")
    else:
        arr = np.asarray(prompt_embeds, dtype=np.float32)
        if arr.ndim not in (2, 3) or len(arr) != len(classes):
            raise ValueError(f"prompt_embeds must be (n_classes={len(classes)}, dim) or "
                             f"(n_classes, n_templates, dim) "
                             f"with rows in class order, got shape {arr.shape}")
        per_class = list(arr.reshape(len(arr), -1, arr.shape[-1]))
    for p in per_class:  # a loop over classes, not samples
        check_array(p, dtype=np.float32)  # rejects NaN/inf prompt vectors with a clear message
    embeds = np.concatenate(per_class)
    class_id = np.repeat(np.arange(len(per_class)), [len(p) for p in per_class])
    return zeroshot.ensemble(embeds, class_id, len(per_class), [str(c) for c in classes], "prompt_embeds")


def sorted_class_vectors(prompt_embeds: PromptEmbeds, classes: Sequence[Any] | None = None,
                         ) -> tuple[np.ndarray, np.ndarray]:
    """``(classes_, vectors)``: labels sorted as scikit-learn orders ``classes_``, and their unit
    prompt vectors in that order. Array rows follow ``classes``; without it, ``prompt_embeds``
    must be a dict and its keys are the classes.
    """
    if classes is None:
        if not isinstance(prompt_embeds, Mapping):
            raise ValueError("prompt_embeds given as an array needs the list of classes its rows stand for")
        classes = sorted(prompt_embeds)
    order = list(classes)
    classes_ = np.unique(np.asarray(order))
    if len(classes_) != len(order):
        raise ValueError(f"classes has duplicates: {order}")
    vectors = class_prompt_vectors(prompt_embeds, order)
    return classes_, vectors[[order.index(c) for c in classes_.tolist()]]


class ZeroShotHead(Head):
    """Zero-shot classifier: the cosine of each image to each class's prompt vector, scored with
    the model's rule (:class:`clip_heads.zeroshot.ScoringRule`): CLIP's
    ``softmax(logit_scale * cos)``, or SigLIP's ``sigmoid(logit_scale * cos + logit_bias)``
    (``predict_proba`` renormalises those to a distribution). The prediction is the class of
    highest cosine under either rule.

    Parameters
    ----------
    prompt_embeds : array or dict
        Class prompt vectors, see :func:`class_prompt_vectors`. Array rows follow ``classes``
        when given, otherwise the sorted labels seen in ``fit``.
    classes : sequence, optional
        Class labels; lets ``fit()`` run without any data.
    logit_scale : float, default=:data:`clip_heads.zeroshot.CLIP_LOGIT_SCALE` (100)
        The model's learned temperature; changes probabilities, never the predicted class. An
        evaluation passes the store's own (``train-head`` on a store of any family).
    random_state : any, default=0
        Unused (nothing is random here); kept so that every head takes the same arguments.
    device : str, default="cpu"
        Where predictions are computed.
    scoring : {"softmax", "sigmoid"}, default="softmax"
        The model family's rule; a head saved before this parameter existed loads as softmax.
    logit_bias : float, default=0.0
        The sigmoid rule's learned bias (SigLIP); a softmax ignores it.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
    class_embeds_ : torch.Tensor of shape (n_classes, dim)
        Unit prompt vectors, rows in ``classes_`` order.
    n_features_in_ : int
    """

    name = "zero-shot"
    uses_prompts = True
    can_requery = True
    zero_shot_scoring = True
    _tensor_params = ("prompt_embeds",)
    _parameter_constraints = {"prompt_embeds": PROMPTS, "classes": ["array-like", None],
                              "random_state": ["random_state"], "device": DEVICE, **SCORING_CONSTRAINTS}

    def __init__(self, prompt_embeds: PromptEmbeds | None = None, classes: Sequence[Any] | None = None,
                 logit_scale: float = zeroshot.CLIP_LOGIT_SCALE, random_state: Any = 0, device: str = "cpu", *,
                 scoring: str = "softmax", logit_bias: float = 0.0) -> None:
        self.prompt_embeds = prompt_embeds
        self.classes = classes
        self.logit_scale = logit_scale
        self.random_state = random_state
        self.device = device
        self.scoring = scoring
        self.logit_bias = logit_bias

    def fit(self, X: Any = None, y: Any = None) -> "ZeroShotHead":
        """Fix ``classes_`` (from ``y``, the ``classes`` parameter or the prompt dict's keys).

        No weights are learned; ``X``, when given, only has its dimension checked.
        """
        self._check_params()
        if self.prompt_embeds is None:
            raise ValueError("ZeroShotHead needs prompt_embeds (class prompt vectors from the text tower)")
        if y is not None:
            y = column_or_1d(y, warn=True)
            check_classification_targets(y)
        if self.classes is not None:
            order = list(self.classes)
        elif y is not None:
            order = np.unique(y).tolist()
        else:
            order = None  # the keys of a prompt dict
        self.classes_, vectors = sorted_class_vectors(self.prompt_embeds, order)
        if y is not None and not np.isin(y, self.classes_).all():
            raise ValueError(f"y has labels outside classes {self.classes_.tolist()}: "
                             f"{np.setdiff1d(y, self.classes_).tolist()}")
        if X is not None:
            X = check_array(X, dtype=np.float32)
            if y is not None and len(y) != len(X):
                raise ValueError(f"X has {len(X)} samples but y has {len(y)}")
            if X.shape[1] != vectors.shape[1]:
                raise ValueError(f"X has {X.shape[1]} features, but the prompt vectors of {type(self).__name__} "
                                 f"have {vectors.shape[1]}: image and text vectors must come from the same CLIP")
        self.n_features_in_ = vectors.shape[1]
        self.class_embeds_ = torch.from_numpy(vectors)
        return self

    def with_prompts(self, prompt_embeds: PromptEmbeds, classes: Sequence[Any] | None = None) -> "ZeroShotHead":
        """A fitted copy that classifies over a new label set given by its prompt vectors."""
        params = dict(self.get_params(deep=False), prompt_embeds=prompt_embeds, classes=classes)
        return type(self)(**params).fit()

    def _logits(self, X: torch.Tensor) -> torch.Tensor:
        return self.scoring_rule().logits(zeroshot.cosine(X, self.class_embeds_.to(X)))

    def _get_tensors(self) -> dict[str, torch.Tensor]:
        return {"class_embeds": self.class_embeds_}

    def _expected_tensors(self, found: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        return {"class_embeds": (len(self.classes_), self.n_features_in_)}

    def _set_tensors(self, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        self.class_embeds_ = tensors["class_embeds"]
        # The saved vectors become the parameter, so clone() + fit() of a loaded head still works.
        self.prompt_embeds = self.class_embeds_.numpy()
        self.classes = self.classes_.tolist()
