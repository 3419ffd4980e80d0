"""What every head shares: the scikit-learn estimator contract, save/load, backbone checks."""
from __future__ import annotations

import contextlib
import functools
import json
import logging
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.model_selection import train_test_split
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_array, check_is_fitted, check_X_y

import clip_heads

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# Rows of X scored at once at predict time: bounds memory for big inputs, costs nothing small.
PREDICT_BLOCK = 8192
# Below this many input numbers a fit or predict runs on one CPU thread: thread hand-offs cost
# more than they save, and on a busy machine two spinning threads slow each other down 10x.
SINGLE_THREAD_BELOW = 2**20
MIN_STEPS = 200  # optimiser steps a trained head gets however small its training set


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


def sized_threads(fit: Callable) -> Callable:
    """Decorate ``fit(self, X, y)`` to run under :func:`threads_for` of ``X``'s size."""
    @functools.wraps(fit)
    def wrapper(self: Any, X: Any = None, *args: Any, **kwargs: Any) -> Any:
        with threads_for(int(np.size(X)) if X is not None else 0):
            return fit(self, X, *args, **kwargs)
    return wrapper


def auto_batch_size(batch_size: int | str, n_samples: int, cap: int = 512) -> int:
    """``"auto"``: ``cap`` rows, but at least ~32 steps per epoch, which small datasets need."""
    if batch_size == "auto":
        return int(min(cap, max(32, n_samples // 32)))
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int or 'auto', got {batch_size!r}")
    return int(batch_size)


class Head(ClassifierMixin, BaseEstimator):
    """Base class of the heads: a classifier over cached CLIP image vectors.

    Subclasses set ``name`` (their registry key), implement ``fit``, ``_logits(X)`` on a float
    tensor on ``self.device``, and ``_get_tensors`` / ``_set_tensors`` for what they learned.
    """

    name: ClassVar[str] = ""
    # Constructor parameters that hold arrays: saved among the tensors, not in config.json.
    _tensor_params: ClassVar[tuple[str, ...]] = ()

    # -- estimator plumbing -------------------------------------------------------------
    def __sklearn_is_fitted__(self) -> bool:
        # Not "any attribute ending in _": set_backbone() may run before fit.
        return hasattr(self, "classes_")

    def _validate_fit(self, X: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
        """Check X, y; set ``classes_`` and ``n_features_in_``; return X (float32) and y as indices."""
        X, y = check_X_y(X, y, dtype=np.float32)
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"need at least 2 classes to fit a classifier, got {self.classes_.tolist()}")
        self.n_features_in_ = X.shape[1]
        return X, y_idx

    def _validate_X(self, X: Any) -> torch.Tensor:
        check_is_fitted(self)
        X = check_array(X, dtype=np.float32)
        if X.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {X.shape[1]} features, but {type(self).__name__} was fitted with "
                             f"{self.n_features_in_} (a different backbone?)")
        return torch.from_numpy(X)

    def _logits(self, X: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _all_logits(self, X: Any) -> np.ndarray:
        X = self._validate_X(X)
        with torch.inference_mode(), threads_for(X.numel()):
            out = [self._logits(X[i:i + PREDICT_BLOCK].to(self.device)).float().cpu()
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
        """Class probabilities, shape ``(n_samples, n_classes)``."""
        return torch.softmax(torch.from_numpy(self._all_logits(X)).double(), dim=1).numpy()

    def predict(self, X: Any) -> np.ndarray:
        """Predicted labels, shape ``(n_samples,)``, drawn from ``classes_``."""
        scores = self._all_logits(X)  # first: it raises NotFittedError before classes_ is read
        return self.classes_[np.argmax(scores, axis=1)]

    # -- backbone provenance --------------------------------------------------------------
    def set_backbone(self, model_id: str, model_hash: str | None = None, dim: int | None = None) -> "Head":
        """Record which CLIP produced the training vectors; saved with the head."""
        self.backbone_ = {"model_id": model_id, "model_hash": model_hash, "dim": dim}
        return self

    def set_training_data(self, store: str, fingerprint: str) -> "Head":
        """Record which store the head was trained on (saved with it), so that scoring it on
        the same data can be labelled resubstitution."""
        self.training_data_ = {"store": str(store), "fingerprint": str(fingerprint)}
        return self

    def check_backbone(self, model_id: str, model_hash: str | None = None, dim: int | None = None) -> None:
        """Raise ``ValueError`` if vectors from this backbone do not fit the head.

        Compares the model id, its hash (when both are known) and the vector dimension, and
        says which of them disagree.
        """
        ours = dict(getattr(self, "backbone_", None) or {})
        if ours.get("dim") is None and hasattr(self, "n_features_in_"):
            ours["dim"] = self.n_features_in_
        bad = [k for k, theirs in (("model_id", model_id), ("model_hash", model_hash), ("dim", dim))
               if ours.get(k) is not None and theirs is not None and ours[k] != theirs]
        if bad:
            raise ValueError(
                f"{', '.join(bad)} disagree: head was trained on model {ours.get('model_id')} "
                f"(hash {ours.get('model_hash')}, dim {ours.get('dim')}) but the store has model {model_id} "
                f"(hash {model_hash}, dim {dim})")

    # -- save / load ------------------------------------------------------------------------
    def _get_tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _set_tensors(self, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        raise NotImplementedError

    def _extra_config(self) -> dict[str, Any]:
        """Learned scalars (e.g. a chosen C) that belong in config.json rather than the tensors."""
        return {}

    def save_pretrained(self, save_directory: str | Path) -> Path:
        """Write ``config.json`` (head, params, classes, backbone, version) + ``model.safetensors``."""
        check_is_fitted(self)
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        params = {k: _jsonable(v) for k, v in self.get_params(deep=False).items() if k not in self._tensor_params}
        config = {"head": self.name, "params": params, "classes": _jsonable(self.classes_),
                  "n_features_in": int(self.n_features_in_), "backbone": getattr(self, "backbone_", None),
                  "training_data": getattr(self, "training_data_", None),
                  "extra": _jsonable(self._extra_config()), "clip_heads_version": clip_heads.__version__}
        (out / CONFIG_NAME).write_text(json.dumps(config, indent=2))
        tensors = {k: v.detach().cpu().contiguous() for k, v in self._get_tensors().items()}
        save_file(tensors, str(out / WEIGHTS_NAME), metadata={"head": self.name})
        logger.info("saved %s head to %s", self.name, out)
        return out

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | None = None) -> "Head":
        """Load a head written by :meth:`save_pretrained`; ``device`` overrides the saved one.

        Called on ``Head`` it dispatches by the saved head name; called on a subclass it
        refuses a directory holding another kind of head.
        """
        from clip_heads.heads import get_head  # the registry imports this module

        directory = Path(directory)
        if not (directory / CONFIG_NAME).is_file() or not (directory / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"{directory} lacks {CONFIG_NAME} or {WEIGHTS_NAME}: not a saved head")
        config = json.loads((directory / CONFIG_NAME).read_text())
        head_cls = get_head(config["head"])
        if cls is not Head and head_cls is not cls:
            raise ValueError(f"{directory} holds a {config['head']!r} head, not {cls.name!r}")
        params = dict(config["params"])
        if device is not None:
            params["device"] = device
        try:
            head = head_cls(**params)
        except TypeError as e:
            raise ValueError(f"{directory / CONFIG_NAME} was written by clip-heads "
                             f"{config.get('clip_heads_version')} with parameters this version's "
                             f"{config['head']!r} head does not take: {e}") from e
        head.classes_ = np.asarray(config["classes"])
        head.n_features_in_ = config["n_features_in"]
        if config.get("backbone"):
            head.backbone_ = config["backbone"]
        if config.get("training_data"):
            head.training_data_ = config["training_data"]
        head._set_tensors(load_file(str(directory / WEIGHTS_NAME)), config.get("extra", {}))
        return head


def _jsonable(v: Any) -> Any:
    """numpy scalars and arrays, tuples and dicts into plain JSON values."""
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return v


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


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Unit rows (a zero row stays zero)."""
    return torch.nn.functional.normalize(x, dim=-1)


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(1) == y).float().mean().item()


class TrainedHead(Head):
    """A head whose ``model_`` is a torch module trained with the package's :class:`Trainer`.

    Subclasses have the parameters ``epochs, lr, weight_decay, batch_size, patience,
    validation_fraction, device`` and build, train and score their module through
    :meth:`_train`, :meth:`_build` and :meth:`_logits`.
    """

    def _build(self) -> torch.nn.Module:
        raise NotImplementedError

    def _train(self, X: torch.Tensor, y: torch.Tensor, seed: int,
               loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        """Seeded init, an optional stratified early-stopping split, then the training loop.

        ``loss_fn(model(X_batch), y_batch)``; the kept weights are those of the best
        validation accuracy. Sets ``model_``, ``loss_curve_``, ``val_scores_``, ``best_epoch_``.
        """
        from clip_heads.train import TensorBatches, Trainer  # train.py knows nothing of heads

        eval_fn = None
        if self.validation_fraction:
            split = validation_split(y.cpu().numpy(), self.validation_fraction, seed)
            tr, va = (torch.from_numpy(i).to(X.device) for i in split)
            X, y, X_val, y_val = X[tr], y[tr], X[va], y[va]
            eval_fn = lambda: accuracy(self._module_logits(X_val), y_val)  # noqa: E731
        with seeded(seed, self.device):
            self.model_ = model = self._build().to(self.device)
        batches = TensorBatches(X, y, batch_size=auto_batch_size(self.batch_size, len(X)), seed=seed)
        # A small training set is one batch an epoch: give it at least MIN_STEPS optimiser steps,
        # stretching epochs and early-stopping patience by the same factor so both keep their meaning.
        stretch = max(1, -(-MIN_STEPS // (len(batches) * self.epochs)))
        trainer = Trainer(model, lambda b: loss_fn(model(b[0]), b[1]), batches, epochs=self.epochs * stretch,
                          lr=self.lr, weight_decay=self.weight_decay, eval_fn=eval_fn,
                          patience=None if self.patience is None else self.patience * stretch,
                          device=self.device, seed=seed).fit()
        model.eval()
        self.loss_curve_, self.val_scores_ = trainer.loss_curve, trainer.val_scores
        self.best_epoch_ = trainer.best_epoch if eval_fn is not None else trainer.epoch

    def _module_logits(self, X: torch.Tensor) -> torch.Tensor:
        """Logits of already prepared rows (the early-stopping score)."""
        raise NotImplementedError

    def _extra_config(self) -> dict[str, Any]:
        return {"loss_curve_": self.loss_curve_, "val_scores_": self.val_scores_, "best_epoch_": self.best_epoch_}

    def _get_tensors(self) -> dict[str, torch.Tensor]:
        return {f"model.{k}": v for k, v in self.model_.state_dict().items()}

    def _set_tensors(self, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        with seeded(0, self.device):  # the init is overwritten; just leave the caller's RNG alone
            self.model_ = self._build().to(self.device)
        self.model_.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        self.model_.eval()
        self.loss_curve_, self.val_scores_ = extra["loss_curve_"], extra["val_scores_"]
        self.best_epoch_ = extra["best_epoch_"]
