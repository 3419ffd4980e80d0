"""What every head shares: the scikit-learn estimator contract, capability flags, backbone checks.

Saving and loading (the folder format and its validation) live in :mod:`clip_heads.heads.files`;
parameter checking in :mod:`clip_heads.heads.params`.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, ClassVar, Iterator

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.model_selection import train_test_split
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from clip_heads.heads.params import (FRACTION, NON_NEGATIVE, POSITIVE, POSITIVE_INT, ParameterError, Real, StrOptions,
                                     check_device, check_params)
from clip_heads.zeroshot import SCORINGS, ScoringRule
from clip_heads.zeroshot import l2_normalize  # noqa: F401  (the heads' unit rows are the kernel's)

logger = logging.getLogger(__name__)

# Rows of X scored at once at predict time: bounds memory for big inputs, costs nothing small.
PREDICT_BLOCK = 8192
# Below this many input numbers a fit or predict runs on one CPU thread: thread hand-offs cost
# more than they save, and on a busy machine two spinning threads slow each other down 10x.
SINGLE_THREAD_BELOW = 2**20
# The trained heads' stopping rule counts patience and the epoch cap in rounds of at least this
# many optimiser steps, so that both mean the same on 300 samples (one step an epoch) and on 300k.
ROUND_STEPS = 32
# The constraint of every head's ``device`` parameter (its form is checked by check_device).
DEVICE = [str, torch.device]
# The constraints of the zero-shot rule's parameters of the heads that score with it; the rule
# itself (clip_heads.zeroshot.ScoringRule) checks that the numbers are finite.
SCORING_CONSTRAINTS = {"scoring": [StrOptions(set(SCORINGS))], "logit_scale": [POSITIVE], "logit_bias": [Real]}


@contextlib.contextmanager
def threads_for(n_elements: int) -> Iterator[None]:
    """Run the block on one torch CPU thread when the input is small, then restore the setting."""
    before = torch.get_num_threads()
    if n_elements < SINGLE_THREAD_BELOW and before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def auto_batch_size(batch_size: int | str, n_samples: int, cap: int = 512) -> int:
    """``"auto"``: ``cap`` rows, but at least ~32 steps per epoch, which small datasets need."""
    if batch_size == "auto":
        return int(min(cap, max(32, n_samples // 32)))
    return int(batch_size)  # validated by the head's parameter constraints


class Head(ClassifierMixin, BaseEstimator):
    """Base class of the heads: a classifier over cached CLIP image vectors.

    Subclasses set ``name`` (their registry key), ``_parameter_constraints`` (scikit-learn's
    form), implement ``_fit(X, y)`` on validated float32 rows and class indices, ``_logits(X)``
    on a float tensor on ``self.device``, and ``_get_tensors`` / ``_set_tensors`` /
    ``_expected_tensors`` for what they learned. The defaults here save nothing, so a head that
    builds on another (a mixin such as :class:`~clip_heads.heads.zs_lp.PromptHead`, or
    :class:`TrainedHead`) adds its own tensors to ``super()``'s.

    Capabilities are declared, never guessed from a signature:

    uses_prompts : the head takes class prompt vectors from the text tower (``prompt_embeds``).
    can_requery : a fitted head answers over a new label set through ``with_prompts``.
    zero_shot_scoring : the head scores cosines to the prompt vectors with the zero-shot rule
        of the model that made them (parameters ``scoring``, ``logit_scale``, ``logit_bias``,
        which an evaluation sets from the store: :class:`clip_heads.zeroshot.ScoringRule`).
    """

    name: ClassVar[str] = ""
    uses_prompts: ClassVar[bool] = False
    can_requery: ClassVar[bool] = False
    zero_shot_scoring: ClassVar[bool] = False
    # Constructor parameters that hold arrays: saved among the tensors, not in config.json.
    _tensor_params: ClassVar[tuple[str, ...]] = ()
    _parameter_constraints: ClassVar[dict] = {}
    # Learned scalars saved in config.json's "extra": name -> accepted JSON types.
    _extra_types: ClassVar[dict[str, tuple[type, ...]]] = {}
    # Saved tensors holding integers (class indices); every other tensor must be floating point.
    _int_tensors: ClassVar[tuple[str, ...]] = ()

    # -- estimator plumbing -------------------------------------------------------------
    def __sklearn_is_fitted__(self) -> bool:
        # Not "any attribute ending in _": set_backbone() may run before fit.
        return hasattr(self, "classes_")

    def _check_params(self) -> None:
        """Raise :class:`~clip_heads.heads.params.ParameterError` naming a bad parameter."""
        check_params(self)
        check_device(type(self).__name__, self.device)
        if self.zero_shot_scoring:
            self.scoring_rule()

    def scoring_rule(self) -> ScoringRule:
        """The zero-shot rule of a :attr:`zero_shot_scoring` head's ``scoring``, ``logit_scale``
        and ``logit_bias``; :class:`~clip_heads.heads.params.ParameterError` if they make none."""
        try:
            return ScoringRule(self.scoring, float(self.logit_scale), float(self.logit_bias))
        except (TypeError, ValueError) as e:  # a non-finite scale or bias: the constraints cannot say so
            raise ParameterError(f"{type(self).__name__}: {e}") from None

    def fit(self, X: Any, y: Any) -> "Head":
        """Fit on ``X`` of shape (n_samples, dim) and labels ``y``; returns self."""
        self._check_params()
        X, y_idx = self._validate_fit(X, y)
        with threads_for(X.size):
            self._fit(X, y_idx)
        return self

    def _fit(self, X: np.ndarray, y: np.ndarray) -> None:
        raise NotImplementedError

    def _validate_fit(self, X: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
        """Check X, y; set ``classes_`` and ``n_features_in_``; return X (float32) and y as indices."""
        X, y = validate_data(self, X, y, dtype=np.float32)
        check_classification_targets(y)  # a continuous target is not a set of classes
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"{type(self).__name__} needs at least 2 classes to fit a classifier, got 1 class: "
                             f"{self.classes_.tolist()}")
        return X, y_idx

    def _validate_X(self, X: Any) -> torch.Tensor:
        check_is_fitted(self)
        return torch.from_numpy(validate_data(self, X, reset=False, dtype=np.float32))

    def _logits(self, X: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _all_logits(self, X: Any) -> np.ndarray:
        X = self._validate_X(X)
        # Scored in float64: a float32 matrix product rounds differently with the number of rows it
        # is given, so a row's scores would depend on which rows share its block.
        with torch.inference_mode(), threads_for(X.numel()):
            out = [self._logits(X[i:i + PREDICT_BLOCK].to(self.device, torch.float64)).float().cpu()
                   for i in range(0, len(X), PREDICT_BLOCK)]
        return torch.cat(out).numpy() if out else np.zeros((0, len(self.classes_)), np.float32)

    def decision_function(self, X: Any) -> np.ndarray:
        """Class logits, shape ``(n_samples, n_classes)``, columns in ``classes_`` order.

        With two classes, scikit-learn's convention: shape ``(n_samples,)``, the logit of
        ``classes_[1]`` minus that of ``classes_[0]``.
        """
        logits = self._all_logits(X)
        return logits[:, 1] - logits[:, 0] if logits.shape[1] == 2 else logits

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities, shape ``(n_samples, n_classes)``: the softmax of the logits, or
        for a :attr:`zero_shot_scoring` head the class distribution of its rule
        (:meth:`clip_heads.zeroshot.ScoringRule.distribution`: the softmax, or the sigmoids
        renormalised)."""
        logits = torch.from_numpy(self._all_logits(X)).double()
        if self.zero_shot_scoring:
            # The logits already carry the rule's scale and bias: its distribution at unit scale.
            return ScoringRule(self.scoring, 1.0, 0.0).distribution(logits).numpy()
        return torch.softmax(logits, dim=1).numpy()

    def predict(self, X: Any) -> np.ndarray:
        """Predicted labels, shape ``(n_samples,)``, drawn from ``classes_``."""
        scores = self._all_logits(X)  # first: it raises NotFittedError before classes_ is read
        return self.classes_[np.argmax(scores, axis=1)]

    # -- provenance -----------------------------------------------------------------------
    def set_backbone(self, model_id: str, model_hash: str | None = None, dim: int | None = None,
                     model_revision: str | None = None) -> "Head":
        """Record which CLIP produced the training vectors; saved with the head.

        ``model_hash`` (the content hash of the weights) is required: without it no later
        check could tell one revision of ``model_id`` from another.
        """
        if not isinstance(model_id, str) or not model_id:
            raise ValueError(f"cannot record the backbone: model_id must be a non-empty string, got {model_id!r}")
        if not isinstance(model_hash, str) or not model_hash:
            raise ValueError(f"cannot record the backbone: the vectors of model {model_id} have no model hash, so no "
                             f"store could later be matched to this head; re-encode with this clip-heads")
        if dim is None and hasattr(self, "n_features_in_"):
            dim = int(self.n_features_in_)
        self.backbone_ = {"model_id": model_id, "model_hash": model_hash, "dim": dim}
        if model_revision is not None:
            self.backbone_["model_revision"] = model_revision
        return self

    def set_training_data(self, store: str, fingerprint: str) -> "Head":
        """Record which store the head was trained on (saved with it), so that scoring it on
        the same data can be labelled resubstitution."""
        self.training_data_ = {"store": str(store), "fingerprint": str(fingerprint)}
        return self

    def check_backbone(self, model_id: str, model_hash: str | None = None, dim: int | None = None,
                       model_revision: str | None = None) -> None:
        """Raise ``ValueError`` unless vectors of this backbone are those the head was trained on.

        Compares the model id, its weights' hash and the vector dimension, and says which of
        them disagree. Refuses when either side has no hash: then nothing can be verified.
        ``model_revision`` is informational (the hash is the identity).
        """
        ours = getattr(self, "backbone_", None)
        if not isinstance(ours, dict) or not ours.get("model_id"):
            raise ValueError("cannot verify: the head records no backbone (the model its training vectors came "
                             "from); retrain it with this clip-heads")
        if not ours.get("model_hash"):
            raise ValueError(f"cannot verify: the head (trained on model {ours['model_id']}) has no model hash; "
                             f"retrain it on a store encoded with this clip-heads")
        if not model_hash:
            raise ValueError(f"cannot verify: the store (model {model_id}) has no model hash; re-encode with this "
                             f"clip-heads")
        our_dim = ours.get("dim") if ours.get("dim") is not None else getattr(self, "n_features_in_", None)
        bad = [k for k, mine, theirs in (("model_id", ours["model_id"], model_id),
                                         ("model_hash", ours["model_hash"], model_hash), ("dim", our_dim, dim))
               if theirs is not None and mine != theirs]
        if bad:
            raise ValueError(
                f"{', '.join(bad)} disagree: head was trained on model {ours['model_id']} "
                f"(hash {ours['model_hash']}, dim {our_dim}) but the store has model {model_id} "
                f"(hash {model_hash}, dim {dim})")

    # -- save / load ------------------------------------------------------------------------
    def _get_tensors(self) -> dict[str, torch.Tensor]:
        """The learned tensors to save, by name (none here: each head adds its own)."""
        return {}

    def _expected_tensors(self, found: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """Names and shapes the saved tensors must have, given ``classes_``, ``n_features_in_``
        and the parameters; ``found`` (the shapes in the file) supplies free sizes such as a
        cache's length. None here: a file holding any tensor the head does not add is refused."""
        return {}

    def _set_tensors(self, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        """Restore the learned state from checked tensors and config extras (``ValueError`` if inconsistent)."""

    def _extra_config(self) -> dict[str, Any]:
        """Learned scalars (e.g. a chosen C) that belong in config.json rather than the tensors."""
        return {}

    def save_pretrained(self, save_directory: Any) -> Any:
        """Write ``config.json`` + ``model.safetensors`` to a folder, replacing it whole.

        See :func:`clip_heads.heads.files.save_head`.
        """
        from clip_heads.heads.files import save_head

        return save_head(self, save_directory)

    @classmethod
    def from_pretrained(cls, directory: Any, device: str | None = None) -> "Head":
        """Load and check a head written by :meth:`save_pretrained`; ``device`` overrides the saved one.

        Called on ``Head`` it dispatches by the saved head name; called on a subclass it
        refuses a folder holding another kind of head. See :func:`clip_heads.heads.files.load_head`.
        """
        from clip_heads.heads.files import load_head

        return load_head(directory, device=device, expect=None if cls is Head else cls)


def validation_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded (train, validation) indices carved from class indices ``y``.

    With tiny classes (a sample of a 100-class set, a CV fold of one) a split stratified over
    every class is impossible; then singleton classes stay in training and each other class
    gives ``round(fraction * n)`` samples, at least 1 and at most ``n - 1``. Raises
    ``ValueError`` when no class has two samples.
    """
    y = np.asarray(y)
    counts = np.bincount(y)
    if not 0 < fraction < 1:
        raise ValueError(f"validation_fraction must be in (0, 1), got {fraction}")
    present = counts[counts > 0]
    n_val = max(len(present), int(round(fraction * len(y))))
    idx = np.arange(len(y))
    if present.min() >= 2 and n_val < len(y) - len(present) + 1:
        tr, va = train_test_split(idx, test_size=n_val, stratify=y, random_state=seed)
        return np.sort(tr), np.sort(va)
    if present.max() < 2:
        raise ValueError(f"cannot carve a validation split ({fraction:.0%}) from {len(y)} samples with one sample "
                         f"a class; pass fixed hyper-parameters or disable the validation split instead")
    rng = np.random.default_rng(seed)
    va = []
    for c in np.flatnonzero(counts >= 2):
        members = rng.permutation(np.flatnonzero(y == c))
        va.append(members[: int(np.clip(round(fraction * len(members)), 1, len(members) - 1))])
    va = np.sort(np.concatenate(va))
    return np.setdiff1d(idx, va), va


def rows_of(X: Any, y: Any, views: Any, idx: Any = None) -> tuple[Any, Any]:
    """Training rows of the images ``idx`` (all by default): their plain vectors, then their
    views, each with its image's label. Torch tensors or arrays; a validation split is carved by
    image first, so no view of a validation image ever trains (``views`` None: just the rows)."""
    if idx is not None:
        X, y = X[idx], y[idx]
        views = None if views is None else views[idx]
    if views is None:
        return X, y
    n, k, d = views.shape
    if isinstance(X, torch.Tensor):
        return torch.cat([X, views.reshape(n * k, d).to(X)]), torch.cat([y, y.repeat_interleave(k)])
    return np.concatenate([X, views.reshape(n * k, d)]), np.concatenate([y, np.repeat(y, k)])


def seed_from(random_state: Any) -> int:
    """One int seed per fit from sklearn's ``random_state`` (int, RandomState or None)."""
    return int(check_random_state(random_state).randint(np.iinfo(np.int32).max))


@contextlib.contextmanager
def seeded(seed: int, device: str | torch.device = "cpu") -> Iterator[None]:
    """Seed torch inside a fork of its random state, so the caller's stream is left untouched."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(1) == y).float().mean().item()


class TrainedHead(Head):
    """A head whose ``model_`` is a torch module trained with the package's :class:`Trainer`.

    Subclasses have the parameters ``epochs, lr, weight_decay, batch_size, patience,
    validation_fraction, device`` and build, train and score their module through
    :meth:`_train`, :meth:`_build` and :meth:`_module_logits`.

    Training runs to a plateau: AdamW at a constant rate (after one epoch of warm-up) until the
    validation accuracy has not improved for ``patience`` epochs, keeping the weights of its
    best epoch; without a validation split, until the training loss stops falling. ``epochs``
    is a safety cap, and a warning says when it, not the plateau, ended a fit. ``patience=None``
    trains exactly ``epochs`` epochs instead.
    """

    _extra_types = {"loss_curve_": (list,), "val_scores_": (list,), "best_epoch_": (int,), "n_epochs_": (int,),
                    "stop_reason_": (str, type(None))}

    def _build(self) -> torch.nn.Module:
        raise NotImplementedError

    def _train(self, X: torch.Tensor, y: torch.Tensor, seed: int,
               loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
               prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
               views: torch.Tensor | None = None) -> None:
        """Seeded init, an optional stratified validation split, then the training loop.

        ``loss_fn(model(prepare(X_batch)), y_batch)``; the validation score is the accuracy of
        :meth:`_module_logits` on the prepared validation rows. ``prepare`` (e.g. the L2
        normalisation) runs a batch at a time, and batches are gathered from ``X`` by index, so
        a fit holds no copy of the training rows (unless ``views`` (n, K, dim) are given: an
        image's views then train beside it, never a validation image's). Sets ``model_``, ``loss_curve_``,
        ``val_scores_``, ``best_epoch_``, ``n_epochs_`` and ``stop_reason_`` ("plateau", or
        "epochs" when the cap ended it).
        """
        from clip_heads.train import TensorBatches  # train.py knows nothing of heads

        prepare = prepare if prepare is not None else (lambda t: t)
        eval_fn, train_rows = None, None
        if self.validation_fraction:
            split = validation_split(y.cpu().numpy(), self.validation_fraction, seed)
            train_rows, va = (torch.from_numpy(i).to(X.device) for i in split)
            X_val, y_val = prepare(X[va]), y[va]
            eval_fn = lambda: accuracy(self._module_logits(X_val), y_val)  # noqa: E731
        if views is None:
            rows = train_rows if train_rows is not None else torch.arange(len(X), device=X.device)
        else:  # the training images' rows, then their views (a copy: views are few-shot sized)
            X, y = rows_of(X, y, views, train_rows)
            rows = torch.arange(len(X), device=X.device)
        with seeded(seed, self.device):
            self.model_ = model = self._build().to(self.device)
        batches = TensorBatches(rows, batch_size=auto_batch_size(self.batch_size, len(rows)), seed=seed)

        def batch_loss(b: tuple[torch.Tensor]) -> torch.Tensor:
            return loss_fn(model(prepare(X.index_select(0, b[0]))), y.index_select(0, b[0]))

        self._run_loop(model, batch_loss, batches, seed, eval_fn)

    def _run_loop(self, model: torch.nn.Module, batch_loss: Callable[[Any], torch.Tensor], batches: Any, seed: int,
                  eval_fn: Callable[[], float] | None, **trainer_kw: Any) -> None:
        """The trained heads' stopping rule on the package's loop, then the record of the run.

        AdamW at ``lr`` after a warm-up of one epoch (at most ROUND_STEPS steps), to the plateau
        of ``eval_fn`` (or of the training loss without one) or ``epochs`` exactly when
        ``patience`` is None; ``trainer_kw`` goes to :class:`~clip_heads.train.Trainer` as it is
        (``min_delta``, ``on_epoch_end``). Sets ``loss_curve_``, ``val_scores_``, ``best_epoch_``,
        ``n_epochs_``, ``stop_reason_`` and leaves ``model`` in eval mode.
        """
        from clip_heads.train import Trainer  # train.py knows nothing of heads

        # On a small training set an epoch is a step or two: count patience and the cap in rounds
        # of at least ROUND_STEPS optimiser steps, so that both keep their meaning at any size.
        stretch = max(1, -(-ROUND_STEPS // len(batches)))
        plateau = self.patience is not None
        trainer = Trainer(model, batch_loss, batches, epochs=self.epochs * stretch,
                          lr=self.lr, weight_decay=self.weight_decay, eval_fn=eval_fn,
                          schedule="plateau" if plateau else "constant",
                          patience=self.patience * stretch if plateau else None,
                          warmup_steps=min(len(batches), ROUND_STEPS), device=self.device, seed=seed,
                          **trainer_kw).fit()
        model.eval()
        self.loss_curve_, self.val_scores_ = trainer.loss_curve, trainer.val_scores
        self.best_epoch_ = trainer.best_epoch if eval_fn is not None else trainer.epoch
        self.n_epochs_, self.stop_reason_ = trainer.epoch, trainer.stop_reason

    def _module_logits(self, X: torch.Tensor) -> torch.Tensor:
        """Logits of already prepared rows (the validation score)."""
        raise NotImplementedError

    def _forward_exact(self, X: torch.Tensor) -> torch.Tensor:
        """``model_(X)`` in float64, for predictions (see :meth:`Head._all_logits`)."""
        weights = {k: v.double() for k, v in self.model_.state_dict().items()}
        return torch.func.functional_call(self.model_, weights, (X.double(),))

    def _extra_config(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in TrainedHead._extra_types}

    def _get_tensors(self) -> dict[str, torch.Tensor]:
        return {f"model.{k}": v for k, v in self.model_.state_dict().items()}

    def _set_tensors(self, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        with seeded(0, self.device):  # the init is overwritten; just leave the caller's RNG alone
            self.model_ = self._build().to(self.device)
        self.model_.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        self.model_.eval()
        for k in TrainedHead._extra_types:
            setattr(self, k, extra[k])


def trained_head_constraints() -> dict[str, list]:
    """The parameter constraints the trained heads share."""
    return {"lr": [POSITIVE], "weight_decay": [NON_NEGATIVE], "batch_size": [POSITIVE_INT, StrOptions({"auto"})],
            "epochs": [POSITIVE_INT], "patience": [POSITIVE_INT, None], "validation_fraction": [FRACTION, None],
            "normalize": ["boolean"], "random_state": ["random_state"], "device": DEVICE}
