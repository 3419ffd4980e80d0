"""The fine-tune's recipe as typed data: what a user asks for, and what decides the weights.

* :class:`FinetuneConfig` - every option of :func:`clip_heads.finetune.finetune` besides the
  data, the output folder and the starting model: Bondielli & Passaro's recipe by default
  (AdamW, lr 2e-5, weight decay 0.2, batch 256, 3 epochs on emotion data and 1 otherwise).
  Saved in ``train_log.json`` as ``config``.
* :class:`FinetuneIdentity` - what a config resolves to on one dataset and one model: the
  model's identity, the source's fingerprint, the training positions, the caption templates'
  texts and every setting that changes the weights. Saved with every checkpoint and in
  ``train_log.json`` as ``identity``, and compared on resume (:meth:`FinetuneIdentity.check`):
  a run resumes, or is refused in one line naming the first thing that differs. Settings that
  do not change the weights (device, precision, workers, checkpointing) may differ on resume.
* :func:`plan_finetune` - validate a config against the data and the model, loading no model.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from .catalog import PRECISIONS
from .fsutil import PathLike
from .identity import ModelFiles, check_identity, resolve_model
from .kinds import is_emotion_data
from .prompts import default_template_sets, load_templates
from .source import Source

__all__ = ["EMOTION_EPOCHS", "OTHER_EPOCHS", "REMEDY", "FinetuneConfig", "FinetuneIdentity", "FinetunePlan",
           "plan_finetune", "as_source", "default_caption_templates", "default_epochs"]

EMOTION_EPOCHS, OTHER_EPOCHS = 3, 1  # B&P: Emotion-CLIP 3 epochs, CIFAR100-CLIP 1
REMEDY = "use another out dir, or overwrite=True (--overwrite) to start over"


@dataclass(frozen=True)
class FinetuneConfig:
    """A fine-tune's options. ``None`` means "the default for this data".

    Parameters
    ----------
    templates : caption template set name or file; several templates: one drawn per image per
        epoch (seeded). Default "bp-emotion" for emotion data, else "bp-photo".
    epochs : default 3 for emotion data, 1 otherwise (B&P's recipe).
    batch_size : images per optimizer step; ``micro_batch`` (a divisor) splits it into
        gradient-accumulated forward passes when it does not fit. Each micro-batch is its own
        contrastive problem (its own negatives), as in most CLIP fine-tuning code.
    lr, weight_decay : AdamW's.
    warmup : warm-up steps, or a fraction of all steps when < 1 (default 10%), then cosine decay.
    max_grad_norm : clip gradients to this norm (default: no clipping).
    seed : the epoch orders, each image's caption template, and the CV folds.
    precision : "auto" = bf16 autocast on a GPU that has it, else fp16 with loss scaling, fp32 on CPU.
    device : "auto", "cpu", "cuda", "cuda:N", "mps".
    gradient_checkpointing : recompute activations in the backward pass (less memory, ~30% slower).
    workers : DataLoader decoding processes (default: :func:`clip_heads.encode.default_workers`).
    checkpoint_every : optimizer steps between checkpoints (also written at every epoch end;
        0: epoch ends only). Rerunning an interrupted call resumes from the last one.
    keep_checkpoint : keep ``checkpoint/`` once the model is complete.
    """

    templates: str | None = None
    epochs: int | None = None
    batch_size: int = 256
    micro_batch: int | None = None
    lr: float = 2e-5
    weight_decay: float = 0.2
    warmup: float = 0.1
    max_grad_norm: float | None = None
    seed: int = 0
    precision: str = "auto"
    device: str = "auto"
    gradient_checkpointing: bool = False
    workers: int | None = None
    checkpoint_every: int = 100
    keep_checkpoint: bool = False

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ValueError(f"fine-tune option {name}={getattr(self, name)!r} is invalid: {rule}")

        def integer(v: Any) -> bool:
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

        def number(v: Any) -> bool:
            return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)

        need(self.templates is None or isinstance(self.templates, str), "templates", "a template set name or file")
        need(self.epochs is None or (integer(self.epochs) and self.epochs >= 1), "epochs", "an integer >= 1")
        need(integer(self.batch_size) and self.batch_size >= 1, "batch_size", "an integer >= 1")
        if self.micro_batch is not None and not (integer(self.micro_batch) and self.micro_batch >= 1
                                                 and self.batch_size % self.micro_batch == 0):
            raise ValueError(f"micro_batch ({self.micro_batch!r}) must divide batch_size ({self.batch_size}), both >= 1")
        need(number(self.lr) and self.lr > 0, "lr", "a number > 0")
        need(number(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "a number >= 0")
        need(number(self.warmup) and self.warmup >= 0, "warmup", "a fraction < 1 of all steps, or a number of steps")
        need(self.max_grad_norm is None or (number(self.max_grad_norm) and self.max_grad_norm > 0), "max_grad_norm",
             "a number > 0, or None for no clipping")
        need(integer(self.seed), "seed", "an integer")
        need(self.precision in PRECISIONS, "precision", f"one of {', '.join(PRECISIONS)}")
        need(isinstance(self.device, str), "device", "auto, cpu, cuda, cuda:N or mps")
        need(self.workers is None or (integer(self.workers) and self.workers >= 0), "workers", "an integer >= 0")
        need(integer(self.checkpoint_every) and self.checkpoint_every >= 0, "checkpoint_every",
             "an integer >= 0 (0: at epoch ends only)")

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_options(cls, options: Mapping[str, Any], base: "FinetuneConfig | None" = None) -> "FinetuneConfig":
        """``base`` (default: the defaults) with ``options`` replaced; an unknown name is a TypeError listing the valid ones."""
        unknown = sorted(set(options) - set(cls.names()))
        if unknown:
            raise TypeError(f"unknown fine-tune option(s) {unknown}; valid: {', '.join(cls.names())}")
        return dataclasses.replace(base or cls(), **dict(options))

    def replace(self, **changes: Any) -> "FinetuneConfig":
        return self.from_options(changes, base=self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class FinetuneIdentity:
    """What decides a fine-tune's weights; two runs with equal identities train the same model.

    Recorded as the ``identity`` of ``train_log.json`` and of every checkpoint's ``log.json``,
    in the form earlier versions wrote it (:meth:`to_dict`), so their runs still resume.
    """

    model_id: str
    model_revision: str | None
    model_hash: str
    source: str  # the source's fingerprint (keys, labels, classes, file sizes and times)
    train_indices: str  # sha256 of the sorted training positions (int64)
    templates: tuple[str, ...]  # the caption templates' texts
    epochs: int
    batch_size: int
    micro_batch: int
    lr: float
    weight_decay: float
    warmup: float
    max_grad_norm: float | None
    seed: int

    def to_dict(self) -> dict[str, Any]:
        return dict(dataclasses.asdict(self), templates=list(self.templates))

    @classmethod
    def from_dict(cls, record: Mapping[str, Any], where: Any = "the fine-tune") -> "FinetuneIdentity":
        """Read a recorded identity (logs before model revisions were recorded name the model
        ``model``); a field missing or unknown is refused in one line."""
        record = dict(record)
        if "model_id" not in record and "model" in record:
            record["model_id"] = record.pop("model")
        record.setdefault("model_revision", None)
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(record) - set(names))
        if unknown:
            raise ValueError(f"{where} holds a fine-tune recorded with {unknown[0]}={record[unknown[0]]!r}, which this "
                             f"clip-heads does not know; {REMEDY}")
        missing = [n for n in names if n not in record]
        if missing:
            raise ValueError(f"{where} holds a fine-tune that records no {missing[0]}; {REMEDY}")
        return cls(**dict(record, templates=tuple(record["templates"])))

    def model(self) -> dict[str, Any]:
        return {"model_id": self.model_id, "model_revision": self.model_revision, "model_hash": self.model_hash}

    def check(self, found: Mapping[str, Any], where: Any) -> None:
        """Refuse unless ``found`` (a recorded identity, as a dict) names this same run: first the
        model (:func:`clip_heads.identity.check_identity`), then every setting in field order."""
        found = dict(found)
        model = dict(found, model_id=found.get("model_id", found.get("model")))
        check_identity(model, self.model(), f"the fine-tune in {where}", REMEDY)
        recorded = FinetuneIdentity.from_dict(found, where).to_dict()
        mine = self.to_dict()
        for name in mine:
            if name in ("model_id", "model_revision", "model_hash"):
                continue
            if recorded[name] != mine[name]:
                raise ValueError(f"{where} holds a fine-tune with {name}={recorded[name]!r}, but this run has "
                                 f"{name}={mine[name]!r}; {REMEDY}")


@dataclass(frozen=True)
class FinetunePlan:
    """A config checked against its data and model: what a run trains on and how."""

    config: FinetuneConfig
    identity: FinetuneIdentity
    files: ModelFiles
    positions: np.ndarray = field(repr=False)  # sorted source positions to train on
    template_set: str  # the caption set's name
    micro: int  # micro-batch size


def as_source(source: PathLike | Source, format: str = "auto", options: dict | None = None) -> Source:
    """An open Source as is, or the dataset at a path opened with ``format`` and ``options``."""
    from .datasets import open_source

    return source if isinstance(source, Source) else open_source(source, format=format, **(options or {}))


def default_caption_templates(src: Source) -> str:
    """B&P's caption set for a source: "bp-emotion" for emotion data, else the kind's first set."""
    return default_template_sets(src.format, src.classes)[0]


def default_epochs(src: Source) -> int:
    return EMOTION_EPOCHS if is_emotion_data(src.format, src.classes) else OTHER_EPOCHS


def plan_finetune(src: Source, model: str | os.PathLike | ModelFiles, config: FinetuneConfig,
                  train_indices: Sequence[int] | None = None) -> FinetunePlan:
    """Resolve ``config`` on ``src`` and ``model`` (by its files' hash: no model is loaded)."""
    positions = np.arange(len(src)) if train_indices is None else np.unique(np.asarray(train_indices, np.int64))
    if not len(positions) or positions[0] < 0 or positions[-1] >= len(src):
        raise ValueError(f"train_indices must be non-empty positions in 0..{len(src) - 1}")
    micro = config.micro_batch or config.batch_size
    tpl_name, tpls = load_templates(config.templates or default_caption_templates(src))
    files = model if isinstance(model, ModelFiles) else resolve_model(model)
    ident = files.identity()
    identity = FinetuneIdentity(
        model_id=ident["model_id"], model_revision=ident["model_revision"], model_hash=ident["model_hash"],
        source=src.fingerprint(), train_indices=hashlib.sha256(positions.tobytes()).hexdigest(), templates=tuple(tpls),
        epochs=config.epochs if config.epochs is not None else default_epochs(src), batch_size=config.batch_size,
        micro_batch=micro, lr=config.lr, weight_decay=config.weight_decay, warmup=config.warmup,
        max_grad_norm=config.max_grad_norm, seed=config.seed)
    return FinetunePlan(config, identity, files, positions, tpl_name, micro)

