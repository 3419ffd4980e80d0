"""Full fine-tuning of CLIP on (image, class caption) pairs, and its k-fold evaluation.

Bondielli & Passaro (2021, sec. 2.2) fine-tune both towers of CLIP ViT-B/32 contrastively on
each image paired with its class caption ("an image that evokes the emotion of {}" for emotion
data, "a photo of a {}" for CIFAR-100): AdamW, lr 2e-5, weight decay 0.2, batch 256, 3 epochs
on emotions and 1 on CIFAR-100, 10-fold cross-validation, predictions by cosine to the captions.

* :func:`finetune` trains one model with :class:`clip_heads.train.Trainer` (the package's one
  loop) and writes a Hugging Face directory that ``encode --model DIR`` takes like a hub id.
  It checkpoints every N steps and resumes an interrupted run to the same final weights.
* :func:`cross_validate_finetune` runs the k-fold protocol on the folds of
  :func:`clip_heads.crossval.stratified_folds`, the heads' folds for the same seed.

WiSE-FT blends of the zero-shot and the fine-tuned model, and B&P's Table 5 generalisation
experiment along them, are in :mod:`clip_heads.wise_ft`.

The loss is CLIP's symmetric InfoNCE with the model's own temperature (``logit_scale``, capped
at ln 100 as CLIP does). Captions are per class, so a batch holds the same caption many times:
images of one class are positives of each other, never negatives (:func:`contrastive_loss`),
and the text tower runs once per distinct caption of the step, not once per image.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .backbone import (DEFAULT_MODEL, PRECISIONS, ModelFiles, Preprocess, as_embeddings, autocast_for, check_identity,
                       load_clip, resolve_device, resolve_model)
from .datasets import EMOTION6_CLASSES, FI_CLASSES, open_source
from .encode import default_workers
from .fsutil import atomic_write_text, exclusive_lock, staged_dir
from .heads.contrastive import multi_positive_clip_loss
from .loading import DecodedBatches
from .prompts import EMOTION_FORMATS, build_texts, class_phrase, default_template_sets, load_templates
from .source import Source
from .train import Trainer

logger = logging.getLogger(__name__)

__all__ = ["finetune", "FinetuneResult", "cross_validate_finetune", "evaluate_zero_shot", "contrastive_loss", "model_lineage"]

PathLike = Union[str, "os.PathLike[str]"]
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps its learned temperature at 100
EMOTION_EPOCHS, OTHER_EPOCHS = 3, 1  # B&P: Emotion-CLIP 3 epochs, CIFAR100-CLIP 1
_EMOTION_WORDS = set(FI_CLASSES) | set(EMOTION6_CLASSES) | {"neutral", "love", "confusion", "positive", "negative"}
# What a resumed or repeated run must share with the run that wrote the out dir, besides the
# starting model's identity (model_id, model_revision, model_hash: backbone.check_identity).
_IDENTITY = ("source", "train_indices", "templates", "epochs", "batch_size", "micro_batch", "lr", "weight_decay",
             "warmup", "max_grad_norm", "seed")
_REMEDY = "use another out dir, or overwrite=True (--overwrite) to start over"


# ---------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------
def contrastive_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, labels: torch.Tensor,
                     logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of pairs whose duplicate labels are positives.

    Parameters
    ----------
    image_embeds, text_embeds : (batch, dim) L2-normalised; row i of both is pair i.
    labels : (batch,) class ids; pairs with equal labels are positives of each other.
    logit_scale : CLIP's log-temperature, clamped at ln 100.

    The target of image row i is uniform over the text columns with label ``labels[i]``
    (and likewise for text rows), so a repeated class is not pushed away from itself. With
    distinct labels this is exactly CLIP's loss. When duplicates share one caption (one
    template) their text rows coincide and the value equals CLIP's plain loss too; the targets
    matter once a class is captioned several ways.
    """
    # One definition of the loss in the package: the CLIP-E contrastive head's, at CLIP's temperature.
    return multi_positive_clip_loss(image_embeds, text_embeds, labels, 1 / logit_scale.clamp(max=MAX_LOGIT_SCALE).exp())


def _normed(x: Any) -> torch.Tensor:
    return F.normalize(as_embeddings(x).float(), dim=-1)


class _CaptionLoss:
    """``loss(batch)`` for the Trainer: images through the image tower, each distinct caption of
    the batch once through the text tower, then :func:`contrastive_loss` on the B x B pairs."""

    def __init__(self, model, tokens: dict[str, torch.Tensor], n_templates: int) -> None:
        self.model, self.tokens, self.n_templates = model, tokens, n_templates
        self.pending: list[torch.Tensor] = []  # micro-batch losses of the current optimizer step

    def __call__(self, batch: dict) -> torch.Tensor:
        labels, captions = batch["labels"], batch["labels"] * self.n_templates + batch["templates"]
        if len(labels) == 0:  # every image of this micro-batch was unreadable
            return self.model.logit_scale * 0.0
        uniq, inverse = torch.unique(captions, return_inverse=True)
        img = _normed(self.model.get_image_features(pixel_values=batch["pixels"]))
        txt = _normed(self.model.get_text_features(**{k: v[uniq] for k, v in self.tokens.items()}))
        loss = contrastive_loss(img, txt[inverse], labels, self.model.logit_scale)
        self.pending.append(loss.detach().float())
        return loss


# ---------------------------------------------------------------------------------------
# Data: seeded epoch orders over a source, decoded and preprocessed in DataLoader workers
# ---------------------------------------------------------------------------------------
class _EpochData:
    """``data(epoch, start)``: micro-batches of one seeded permutation of ``positions``, from
    micro-batch ``start`` on. The order and each image's caption template depend on
    ``(seed, epoch)`` only, so a resumed run sees exactly the batches it would have seen."""

    def __init__(self, src: Source, positions: np.ndarray, micro: int, preprocess: Preprocess, n_templates: int,
                 seed: int, workers: int, pin: bool) -> None:
        self.src, self.positions, self.micro, self.preprocess = src, np.asarray(positions), micro, preprocess
        self.n_templates, self.seed, self.workers, self.pin = n_templates, seed, workers, pin
        self.wait_s, self.skipped = 0.0, {}

    def __len__(self) -> int:
        return math.ceil(len(self.positions) / self.micro)

    def order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.positions)

    def templates(self, epoch: int) -> np.ndarray:
        """Template id per source item for this epoch (one caption per image per epoch)."""
        return np.random.default_rng([self.seed, epoch, 1]).integers(self.n_templates, size=len(self.src))

    def __call__(self, epoch: int, start: int = 0):
        tpl = torch.from_numpy(self.templates(epoch))
        todo = self.order(epoch)[start * self.micro:]
        loader = DataLoader(DecodedBatches(self.src, todo, self.micro, self.preprocess), batch_size=None,
                            num_workers=self.workers, pin_memory=self.pin,
                            prefetch_factor=2 if self.workers else None)
        it = iter(loader)
        while True:
            t = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            self.wait_s += time.perf_counter() - t  # time the step was starved of data
            for i, reason in item["bad"]:
                if self.src.keys[i] not in self.skipped:
                    logger.warning("skipped %s: %s", self.src.keys[i], reason)
                    self.skipped[self.src.keys[i]] = reason
            good = torch.as_tensor(item["good"], dtype=torch.long)
            yield {"pixels": item["pixels"], "labels": torch.from_numpy(self.src.labels)[good], "templates": tpl[good]}


def _resolve_amp(device: torch.device, precision: str) -> bool | str:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    if device.type != "cuda":
        if precision in ("fp16", "bf16"):
            raise ValueError(f"precision {precision!r} trains with autocast on a CUDA GPU only; "
                             f"this run is on {device}: use fp32")
        return False
    if precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return False if precision == "fp32" else precision


def model_lineage(model_dir: str | os.PathLike) -> list[dict]:
    """Identities of the models ``model_dir`` was made from, nearest first: the base of a
    fine-tune (its ``train_log.json``) or the endpoints of a WiSE-FT blend (``wise_ft.json``),
    and theirs in turn. Empty for a model clip-heads did not make."""
    folder = Path(model_dir)
    for name in ("train_log.json", "wise_ft.json"):
        try:
            record = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and isinstance(record.get("lineage"), list):
            return [i for i in record["lineage"] if isinstance(i, dict) and i.get("model_hash")]
    return []


def as_source(source: PathLike | Source, format: str = "auto", options: dict | None = None) -> Source:
    """An open Source as is, or the dataset at a path opened with ``format`` and ``options``."""
    return source if isinstance(source, Source) else open_source(source, format=format, **(options or {}))


def _is_emotion(src: Source) -> bool:
    return src.format in EMOTION_FORMATS or {c.lower() for c in src.classes} <= _EMOTION_WORDS


def default_caption_templates(src: Source) -> str:
    """B&P's caption set for a source: "bp-emotion" for emotion data, else the kind's first set."""
    return "bp-emotion" if _is_emotion(src) else default_template_sets(src.format)[0]


# ---------------------------------------------------------------------------------------
# Checkpoints: <out>/checkpoint/step-N-epoch-E/{model.safetensors, trainer.pt, log.json} + latest
# ---------------------------------------------------------------------------------------
def _save_checkpoint(root: Path, trainer: Trainer, log: dict) -> None:
    from safetensors.torch import save_file

    # The epoch-end state of step N differs from its on-step state: the name tells them apart,
    # so `latest` never points at a folder being replaced.
    name = f"step-{trainer.step:08d}-epoch-{trainer.epoch:03d}"
    with staged_dir(root / name) as tmp:
        state = trainer.state_dict()
        save_file({k: v.detach().cpu().contiguous() for k, v in state.pop("model").items()}, str(tmp / "model.safetensors"))
        torch.save(state, tmp / "trainer.pt")  # tensors and plain values only: loads with weights_only=True
        (tmp / "log.json").write_text(json.dumps(log))
    atomic_write_text(root / "latest", name)
    for old in root.glob("step-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(root: Path, trainer: Trainer, identity: dict) -> dict | None:
    from safetensors.torch import load_file

    latest = root / "latest"
    if not latest.is_file():
        return None
    d = root / latest.read_text().strip()
    log = json.loads((d / "log.json").read_text())
    _check_identity(log["identity"], identity, root)
    state = torch.load(d / "trainer.pt", map_location="cpu", weights_only=True)
    state["model"] = load_file(str(d / "model.safetensors"))
    trainer.load_state_dict(state)
    return log


def _check_identity(found: dict, wanted: dict, where: Path) -> None:
    # Logs written before model_revision was recorded named the starting model "model".
    check_identity(dict(found, model_id=found.get("model_id", found.get("model"))), wanted,
                   f"the fine-tune in {where}", _REMEDY)
    for k in _IDENTITY:
        if found.get(k) != wanted.get(k):
            raise ValueError(f"{where} holds a fine-tune with {k}={found.get(k)!r}, but this run has {k}={wanted.get(k)!r}; "
                             + _REMEDY)


# ---------------------------------------------------------------------------------------
# Fine-tuning
# ---------------------------------------------------------------------------------------
@dataclass
class FinetuneResult:
    out_dir: Path
    status: str  # "trained", "resumed", "up-to-date"
    steps: int
    n_train: int
    skipped: dict[str, str] = field(default_factory=dict)  # key -> reason
    log: dict = field(default_factory=dict)  # what train_log.json holds


def finetune(source: PathLike | Source, out_dir: PathLike, model: str = DEFAULT_MODEL, *, format: str = "auto",
             source_options: dict | None = None, templates: str | None = None, train_indices: Sequence[int] | None = None,
             epochs: int | None = None, batch_size: int = 256, micro_batch: int | None = None, lr: float = 2e-5,
             weight_decay: float = 0.2, warmup: float = 0.1, max_grad_norm: float | None = None,
             precision: str = "auto", device: str = "auto", gradient_checkpointing: bool = False,
             workers: int | None = None, seed: int = 0, checkpoint_every: int = 100, keep_checkpoint: bool = False,
             overwrite: bool = False, progress: bool = True) -> FinetuneResult:
    """Fine-tune both CLIP towers on ``source`` paired with class captions; save to ``out_dir``.

    Parameters
    ----------
    source : any dataset :func:`clip_heads.datasets.open_source` opens, or an open Source.
    model : hub id or directory of the CLIP to start from.
    templates : template set name or file for the captions; several templates: one drawn per
        image per epoch (seeded). Default "bp-emotion" for emotion data, else "bp-photo".
    train_indices : positions of the source to train on (default all), e.g. a CV fold's complement.
    epochs : default 3 for emotion data, 1 otherwise (B&P's recipe).
    batch_size : images per optimizer step; ``micro_batch`` (a divisor) splits it into
        gradient-accumulated forward passes when it does not fit. Each micro-batch is its own
        contrastive problem (its own negatives), as in most CLIP fine-tuning code.
    warmup : warm-up steps, or a fraction of all steps when < 1 (default 10%), then cosine decay.
    precision : "auto" = bf16 autocast on a GPU that has it, else fp16 with loss scaling, fp32 on CPU.
    gradient_checkpointing : recompute activations in the backward pass (less memory, ~30% slower).
    checkpoint_every : optimizer steps between checkpoints (also written at every epoch end).
        Rerunning an interrupted call resumes from the last one; ``overwrite`` starts over.

    Returns
    -------
    FinetuneResult; ``out_dir`` holds the model, tokenizer and image processor
    (``save_pretrained``) and ``train_log.json``.
    """
    result, _ = finetune_loaded(**locals())
    return result


def _plan(src: Source, model: str | ModelFiles, *, train_indices, templates, epochs, batch_size, micro_batch, lr,
          weight_decay, warmup, max_grad_norm, seed) -> tuple[dict, dict]:
    """Validate a fine-tune's settings and name the run: ``(identity, settings)``. The identity is
    what a resumed or repeated run must share with the one that wrote the out dir; computing it
    loads no model (the starting weights are identified by their hash)."""
    positions = np.arange(len(src)) if train_indices is None else np.unique(np.asarray(train_indices, np.int64))
    if not len(positions) or positions[0] < 0 or positions[-1] >= len(src):
        raise ValueError(f"train_indices must be non-empty positions in 0..{len(src) - 1}")
    micro = micro_batch or batch_size
    if batch_size < 1 or micro < 1 or batch_size % micro:
        raise ValueError(f"micro_batch ({micro_batch}) must divide batch_size ({batch_size}), both >= 1")
    epochs = epochs if epochs is not None else (EMOTION_EPOCHS if _is_emotion(src) else OTHER_EPOCHS)
    tpl_name, tpls = load_templates(templates or default_caption_templates(src))
    files = model if isinstance(model, ModelFiles) else resolve_model(model)
    identity = {**files.identity(), "source": src.fingerprint(),
                "train_indices": hashlib.sha256(positions.tobytes()).hexdigest(), "templates": tpls, "epochs": epochs,
                "batch_size": batch_size, "micro_batch": micro, "lr": lr, "weight_decay": weight_decay,
                "warmup": warmup, "max_grad_norm": max_grad_norm, "seed": seed}
    return identity, dict(files=files, positions=positions, micro=micro, epochs=epochs, tpl_name=tpl_name, tpls=tpls)


def finetune_loaded(source, out_dir, model, *, format, source_options, templates, train_indices, epochs,
                    batch_size, micro_batch, lr, weight_decay, warmup, max_grad_norm, precision, device,
                    gradient_checkpointing, workers, seed, checkpoint_every, keep_checkpoint, overwrite, progress):
    """:func:`finetune` (every option given, as :func:`resolve_finetune_options` fills them), also
    returning the trained ``(model, tokenizer, processor)`` so a caller can score it without
    reloading; ``None`` in their place when the out dir already held the finished run."""
    out = Path(out_dir)
    src = as_source(source, format, source_options)
    identity, plan = _plan(src, model, train_indices=train_indices, templates=templates, epochs=epochs,
                           batch_size=batch_size, micro_batch=micro_batch, lr=lr, weight_decay=weight_decay,
                           warmup=warmup, max_grad_norm=max_grad_norm, seed=seed)
    dev = resolve_device(device)
    amp = _resolve_amp(dev, precision)
    with exclusive_lock(out, "clip-heads fine-tune"):
        return _train(src, out, plan, identity, dev, amp, gradient_checkpointing=gradient_checkpointing,
                      batch_size=batch_size, lr=lr, weight_decay=weight_decay, warmup=warmup,
                      max_grad_norm=max_grad_norm, workers=workers, seed=seed, checkpoint_every=checkpoint_every,
                      keep_checkpoint=keep_checkpoint, overwrite=overwrite, progress=progress)


def _train(src, out, plan, identity, dev, amp, *, gradient_checkpointing, batch_size, lr, weight_decay, warmup,
           max_grad_norm, workers, seed, checkpoint_every, keep_checkpoint, overwrite, progress):
    positions, micro, epochs, tpl_name, tpls = (plan[k] for k in ("positions", "micro", "epochs", "tpl_name", "tpls"))
    files: ModelFiles = plan["files"]
    ckpt = out / "checkpoint"
    if overwrite:
        shutil.rmtree(ckpt, ignore_errors=True)
        (out / "train_log.json").unlink(missing_ok=True)
    if (out / "train_log.json").is_file():
        done = json.loads((out / "train_log.json").read_text())
        _check_identity(done["identity"], identity, out)
        logger.info("%s is a finished fine-tune with these settings; nothing to do", out)
        return FinetuneResult(out, "up-to-date", done["steps"][-1]["step"] if done["steps"] else 0, len(positions),
                              done["skipped"], done), None
    for stale in ckpt.glob(".step-*"):  # staging folders of a killed run; we hold the lock, so nobody else's
        shutil.rmtree(stale, ignore_errors=True)

    loaded = load_clip(files, dev, dtype=torch.float32)  # fp32 master weights
    clip, tokenizer, processor = loaded.model, loaded.tokenizer, loaded.processor
    if gradient_checkpointing:
        # transformers 5 renamed it; 4.x only has the old name.
        (getattr(clip, "activation_checkpointing_enable", None) or clip.gradient_checkpointing_enable)()

    # Every caption tokenized once; caption id = class * n_templates + template.
    texts = [t.format(class_phrase(c)) for c in src.classes for t in tpls]
    tok = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    tokens = {k: v.to(dev) for k, v in tok.items() if k in ("input_ids", "attention_mask")}
    data = _EpochData(src, positions, micro, Preprocess.from_processor(processor), len(tpls), seed,
                      default_workers(dev) if workers is None else workers, dev.type == "cuda")
    loss_fn = _CaptionLoss(clip, tokens, len(tpls))
    recipe = dict(template_set=tpl_name, n_train=int(len(positions)), classes=list(src.classes),
                  precision=str(amp or "fp32"), device=str(dev), gradient_checkpointing=gradient_checkpointing,
                  steps_per_epoch=math.ceil(len(data) / (batch_size // micro)))
    # The starting model and its own ancestors, so WiSE-FT can tell a fine-tune from an unrelated model.
    base = files.identity()
    log: dict[str, Any] = {"identity": identity, "base": base, "lineage": [base] + model_lineage(files.path),
                           "recipe": recipe, "steps": [], "epochs": [], "skipped": {}}

    from tqdm.auto import tqdm

    clock = {"t": time.perf_counter(), "wait": 0.0}

    def on_step(trainer: Trainer, logs: dict) -> None:
        with torch.no_grad():
            clip.logit_scale.clamp_(0, MAX_LOGIT_SCALE)  # CLIP's cap, after each update
        now = time.perf_counter()
        loss = torch.stack(loss_fn.pending).mean().item() if loss_fn.pending else float("nan")
        loss_fn.pending.clear()
        log["steps"].append({"step": trainer.step, "epoch": trainer.epoch + 1, "loss": loss, "lr": logs["lr"],
                             "logit_scale": clip.logit_scale.exp().item(), "seconds": now - clock["t"],
                             "data_wait": data.wait_s - clock["wait"]})
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        if checkpoint_every and trainer.step % checkpoint_every == 0:
            _save_checkpoint(ckpt, trainer, dict(log, skipped=data.skipped))
        clock["t"], clock["wait"] = time.perf_counter(), data.wait_s  # a step's time excludes checkpointing

    def on_epoch_end(trainer: Trainer, logs: dict) -> None:
        steps = [s for s in log["steps"] if s["epoch"] == trainer.epoch]  # epochs count from 1
        secs = sum(s["seconds"] for s in steps)
        log["epochs"].append({"epoch": trainer.epoch, "loss": float(np.mean([s["loss"] for s in steps])) if steps else None,
                              "seconds": secs,
                              "data_wait_fraction": sum(s["data_wait"] for s in steps) / secs if secs else 0.0})
        logger.info("epoch %d/%d: loss %.4f", trainer.epoch, epochs, log["epochs"][-1]["loss"] or float("nan"))
        _save_checkpoint(ckpt, trainer, dict(log, skipped=data.skipped))

    trainer = Trainer(clip, loss_fn, data, epochs=epochs, lr=lr, weight_decay=weight_decay, warmup_steps=warmup,
                      grad_accum=batch_size // micro, max_grad_norm=max_grad_norm, device=dev, amp=amp,
                      steps_per_epoch=len(data), seed=seed, on_step=on_step, on_epoch_end=on_epoch_end)
    status = "trained"
    if ckpt.exists():
        saved = _load_checkpoint(ckpt, trainer, identity)
        if saved is not None:
            log.update(steps=saved["steps"], epochs=saved["epochs"])
            data.skipped.update(saved["skipped"])
            status = "resumed"
            logger.info("resuming %s at epoch %d, step %d", out, trainer.epoch, trainer.step)
    total = epochs * log["recipe"]["steps_per_epoch"]
    bar = tqdm(total=total, initial=trainer.step, unit="step", desc="finetune", disable=not progress)
    clock["t"] = time.perf_counter()
    try:
        trainer.fit()
    finally:
        bar.close()

    clip.eval()
    out.mkdir(parents=True, exist_ok=True)
    clip.save_pretrained(out)
    tokenizer.save_pretrained(out)
    processor.save_pretrained(out)
    log["skipped"] = data.skipped
    atomic_write_text(out / "train_log.json", json.dumps(log, indent=1))  # last: marks the model complete
    if not keep_checkpoint:
        shutil.rmtree(ckpt, ignore_errors=True)
    logger.info("fine-tuned %s on %d images (%d skipped) in %d steps -> %s", files.model_id, len(positions),
                len(data.skipped), trainer.step, out)
    return FinetuneResult(out, status, trainer.step, len(positions), dict(data.skipped), log), (clip, tokenizer, processor)


def resolve_finetune_options(options: dict) -> dict:
    """``finetune``'s defaults updated with ``options``; unknown names are refused."""
    import inspect

    params = inspect.signature(finetune).parameters
    fixed = ("source", "out_dir", "model")
    unknown = sorted(set(options) - set(params) | set(options) & set(fixed))
    if unknown:
        raise TypeError(f"unknown fine-tune option(s) {unknown}; valid: {', '.join(p for p in params if p not in fixed)}")
    return {k: options.get(k, p.default) for k, p in params.items() if k not in fixed}


# ---------------------------------------------------------------------------------------
# Zero-shot by cosine to the class captions, on images straight from a source
# ---------------------------------------------------------------------------------------
@torch.inference_mode()
def _class_vectors(clip, tokenizer, templates: Sequence[str], classes: Sequence[str], device, precision) -> torch.Tensor:
    # As PromptSet.class_vectors: mean of the normalised template embeddings of a class, renormalised.
    texts, _, cid = build_texts(templates, classes)
    tok = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    with autocast_for(device, precision):
        E = _normed(clip.get_text_features(input_ids=tok["input_ids"].to(device),
                                           attention_mask=tok["attention_mask"].to(device)))
    V = torch.zeros(len(classes), E.shape[1], device=E.device).index_add_(0, torch.as_tensor(cid, device=E.device), E)
    return F.normalize(V, dim=-1)


@torch.inference_mode()
def zero_shot_report(clip, tokenizer, preprocess: Preprocess, src: Source, positions: np.ndarray,
                     templates: Sequence[str], device: torch.device, precision: str, batch_size: int, workers: int,
                     progress: bool = False) -> dict:
    """Zero-shot a loaded CLIP on ``positions`` of ``src`` (see :func:`evaluate_zero_shot`)."""
    from tqdm.auto import tqdm

    from .metrics import classification_report

    clip.eval()
    V = _class_vectors(clip, tokenizer, templates, src.classes, device, precision)
    loader = DataLoader(DecodedBatches(src, np.asarray(positions), batch_size, preprocess), batch_size=None,
                        num_workers=workers, pin_memory=device.type == "cuda", prefetch_factor=2 if workers else None)
    good, preds, skipped = [], [], {}
    for item in tqdm(loader, unit="batch", desc=f"zero-shot {Path(src.root).name}", disable=not progress):
        for i, reason in item["bad"]:
            skipped[src.keys[i]] = reason
        if item["good"]:
            with autocast_for(device, precision):
                img = _normed(clip.get_image_features(pixel_values=item["pixels"].to(device)))
            preds.append((img @ V.T).argmax(1).cpu())
            good += item["good"]
    if not good:
        raise ValueError(f"no readable image among the {len(positions)} to evaluate in {src.root}")
    y_pred = torch.cat(preds).numpy()
    report = classification_report(src.labels[good], y_pred, src.classes)
    report.update(templates=list(templates), skipped=skipped, positions=[int(i) for i in good], y_pred=y_pred.tolist())
    return report


def evaluate_zero_shot(model: str, source: PathLike | Source, *, format: str = "auto", source_options: dict | None = None,
                       indices: Sequence[int] | None = None, templates: str | None = None, batch_size: int = 64,
                       workers: int | None = None, device: str = "auto", precision: str = "auto") -> dict:
    """Zero-shot classification of ``source`` (or its ``indices``) by cosine to the class captions.

    The same rule as ``clip-heads zero-shot`` on a store encoded with ``model``; here images
    go straight through the model. Returns a :func:`clip_heads.metrics.classification_report`
    plus ``templates``, ``skipped`` ({key: reason}), ``positions`` and ``y_pred``.
    """
    src = as_source(source, format, source_options)
    dev = resolve_device(device)
    loaded = load_clip(model, dev, dtype=torch.float32)
    clip, tokenizer, processor = loaded.model, loaded.tokenizer, loaded.processor
    positions = np.arange(len(src)) if indices is None else np.asarray(indices, np.int64)
    _, tpls = load_templates(templates or default_caption_templates(src))
    return zero_shot_report(clip, tokenizer, Preprocess.from_processor(processor), src, positions, tpls, dev, precision,
                      batch_size, default_workers(dev) if workers is None else workers)


# ---------------------------------------------------------------------------------------
# k-fold cross-validation (B&P Tables 3 and 4)
# ---------------------------------------------------------------------------------------
def cross_validate_finetune(source: PathLike | Source, out_dir: PathLike, model: str = DEFAULT_MODEL, *, cv: int = 10,
                            seed: int = 0, format: str = "auto", source_options: dict | None = None,
                            keep_models: bool = False, eval_batch_size: int = 64, **finetune_options: Any) -> dict:
    """For each of ``cv`` folds, fine-tune from the ORIGINAL weights on the other folds and
    zero-shot the held-out fold by cosine to the class captions.

    Folds are :func:`clip_heads.crossval.stratified_folds` ``(labels, cv, seed)``, so they are
    the heads' folds for the same seed; ``seed`` also seeds each fine-tune. ``finetune_options``
    are :func:`finetune`'s (``epochs``, ``batch_size``, ``lr``, ``templates``...). Each fold
    lives in ``out_dir/fold-NN/`` (NN the fold id of ``folds.csv``; its weights are deleted after
    scoring unless ``keep_models``). A rerun reuses a scored fold only if it was fine-tuned from the
    same weights with the same settings (anything else is refused); ``overwrite=True`` discards
    the scored folds and starts over. Writes ``folds.csv`` and, via :func:`clip_heads.metrics.write_report`,
    ``metrics.json`` (per fold, mean, std, pooled), ``per_class.csv``, ``report.txt``.

    Returns the :func:`clip_heads.metrics.summarize_folds` dict.
    """
    from tqdm.auto import tqdm

    from .crossval import stratified_folds, write_folds
    from .metrics import classification_report, summarize_folds, write_report

    out = Path(out_dir)
    src = as_source(source, format, source_options)
    opts = resolve_finetune_options(dict(finetune_options, seed=seed))
    folds = stratified_folds(src.labels, cv, seed)
    dev = resolve_device(opts["device"])
    workers = default_workers(dev) if opts["workers"] is None else opts["workers"]
    files = resolve_model(model)  # every fold starts from these weights
    plan = {k: opts[k] for k in ("templates", "epochs", "batch_size", "micro_batch", "lr", "weight_decay", "warmup",
                                 "max_grad_norm", "seed")}
    with exclusive_lock(out, f"clip-heads {cv}-fold fine-tune CV"):
        if opts["overwrite"]:
            for old in out.glob("fold-*"):
                if old.is_dir() and old.name[5:].isdigit():
                    shutil.rmtree(old)
        out.mkdir(parents=True, exist_ok=True)
        write_folds(out / "folds.csv", src.keys, [src.classes[i] for i in src.labels], folds)
        reports = []
        bar = tqdm(total=cv, desc=f"{cv}-fold fine-tune CV", unit="fold", disable=not opts["progress"])
        for f in range(cv):
            fold_dir, train = out / f"fold-{f:02d}", np.flatnonzero(folds != f)
            scored = fold_dir / "metrics.json"
            if scored.is_file() and (fold_dir / "train_log.json").is_file():
                # A scored fold is reused only if it was fine-tuned exactly as this run would.
                identity, _ = _plan(src, files, train_indices=train, **plan)
                _check_identity(json.loads((fold_dir / "train_log.json").read_text())["identity"], identity, fold_dir)
                reports.append(json.loads(scored.read_text()))
                logger.info("fold %d/%d already scored", f + 1, cv)
                bar.update(1)
                continue
            logger.info("fold %d/%d: fine-tuning on %d images", f + 1, cv, len(train))
            res, loaded = finetune_loaded(src, fold_dir, files, **dict(opts, train_indices=train, overwrite=False))
            if loaded is None:
                reloaded = load_clip(fold_dir, dev, dtype=torch.float32)
                loaded = reloaded.model, reloaded.tokenizer, reloaded.processor
            clip, tokenizer, processor = loaded
            tpls = res.log["identity"]["templates"]
            rep = zero_shot_report(clip, tokenizer, Preprocess.from_processor(processor), src, np.flatnonzero(folds == f),
                             tpls, dev, opts["precision"], eval_batch_size, workers, opts["progress"])
            rep["fold"] = f  # the fold id of folds.csv; messages count folds from 1
            atomic_write_text(scored, json.dumps(rep))
            if not keep_models:
                for w in fold_dir.glob("*.safetensors"):
                    w.unlink()
            logger.info("fold %d/%d: accuracy %.4f, macro F1 %.4f", f + 1, cv, rep["accuracy"], rep["macro"]["f1"])
            reports.append(rep)
            del clip, loaded
            bar.update(1)
        bar.close()
        pos = np.concatenate([r["positions"] for r in reports])
        pooled = classification_report(src.labels[pos], np.concatenate([r["y_pred"] for r in reports]), src.classes)
        summary = summarize_folds([{k: v for k, v in r.items() if k not in ("positions", "y_pred")} for r in reports],
                                  pooled)
        summary["folds_file"] = str(out / "folds.csv")
        title = f"Fine-tuned CLIP, {cv}-fold cross-validation (zero-shot on each held-out fold)"
        write_report(summary, out, title=title)
    # The table is in report.txt (the CLI prints it); the log says where, once.
    logger.info("%d-fold fine-tune CV: accuracy %.4f ± %.4f; report in %s", cv, summary["mean"]["accuracy"],
                summary["std"]["accuracy"], out / "report.txt")
    return summary
