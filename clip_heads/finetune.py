"""Full fine-tuning of a vision-language model on (image, class caption) pairs: the training loop's glue.

Bondielli & Passaro (2021, sec. 2.2) fine-tune both towers of CLIP ViT-B/32 contrastively on
each image paired with its class caption ("an image that evokes the emotion of {}" for emotion
data, "a photo of a {}" for CIFAR-100): AdamW, lr 2e-5, weight decay 0.2, batch 256, 3 epochs
on emotions and 1 on CIFAR-100, 10-fold cross-validation, predictions by cosine to the captions.

:func:`finetune` trains one model with :class:`clip_heads.train.Trainer` (the package's one
loop) and writes a Hugging Face directory that ``encode --model DIR`` takes like a hub id, with
``report.txt`` and ``metrics.json`` beside it. It checkpoints every N steps and resumes an
interrupted run to the same final weights. Its options are a typed
:class:`~clip_heads.finetune_config.FinetuneConfig`; what they resolve to on the data
(:class:`~clip_heads.finetune_config.FinetuneIdentity`) is saved with every checkpoint and
compared on resume.

Elsewhere: the recipe and its checks in :mod:`clip_heads.finetune_config`, zero-shot scoring
of a loaded model in :mod:`clip_heads.finetune_eval`, the k-fold protocol in
:mod:`clip_heads.finetune_cv`, WiSE-FT blends and the generalisation experiment in
:mod:`clip_heads.wise_ft`.

The model is loaded through the backbone layer (:func:`clip_heads.backbones.model.load_backbone`),
so any supported family fine-tunes with its own rules and its own loss (:func:`family_loss`):
CLIP-like families keep CLIP's symmetric InfoNCE with the model's own temperature
(``logit_scale``, capped at CLIP's 100 as CLIP does); SigLIP and SigLIP 2 train with their
pairwise sigmoid loss at the model's own scale and bias, both learned, uncapped
(:func:`clip_heads.backbones.losses.sigmoid_loss`). Captions are per class, so a batch holds the
same caption many times: images of one class are positives of each other, never negatives,
and the text tower runs once per distinct caption of the step, not once per image.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from . import zeroshot
from .backbones import towers
from .backbones.families import FamilySpec, family_of_model
from .backbones.losses import sigmoid_loss
from .backbones.model import load_backbone, resolve_device
from .backbones.preprocess import ImageRecipe
from .catalog import DEFAULT_MODEL, PRECISIONS
from .encode import default_workers
from .finetune_config import FinetuneConfig, FinetuneIdentity, FinetunePlan, as_source, plan_finetune
from .fsutil import PathLike, atomic_write_text, exclusive_lock, staged_dir
from .heads.contrastive import multi_positive_clip_loss
from .identity import ModelFiles
from .loading import DecodedBatches
from .prompts import class_phrase
from .results import REPORT, render, results_files, source_record, write_json
from .source import Source
from .train import Trainer

logger = logging.getLogger(__name__)

__all__ = ["finetune", "finetune_loaded", "FinetuneResult", "contrastive_loss", "family_loss", "model_lineage",
           "MAX_LOGIT_SCALE", "TRAIN_LOG"]

MAX_LOGIT_SCALE = math.log(zeroshot.CLIP_LOGIT_SCALE)  # CLIP clamps its learned temperature at 100
TRAIN_LOG = "train_log.json"  # written last: a model folder that has it is complete


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
    logit_scale : CLIP's log-temperature, clamped at ln 100 (:data:`MAX_LOGIT_SCALE`).

    The target of image row i is uniform over the text columns with label ``labels[i]``
    (and likewise for text rows), so a repeated class is not pushed away from itself. With
    distinct labels this is exactly CLIP's loss. When duplicates share one caption (one
    template) their text rows coincide and the value equals CLIP's plain loss too; the targets
    matter once a class is captioned several ways.
    """
    # One definition of the loss in the package: the CLIP-E contrastive head's, at CLIP's temperature.
    return multi_positive_clip_loss(image_embeds, text_embeds, labels, 1 / logit_scale.clamp(max=MAX_LOGIT_SCALE).exp())


def family_loss(spec: FamilySpec, model: Any, image_embeds: torch.Tensor, text_embeds: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
    """The loss ``model``'s family was trained with, on L2-normalised pairs whose equal labels
    are positives: :func:`contrastive_loss` (InfoNCE) at the model's temperature, or SigLIP's
    :func:`~clip_heads.backbones.losses.sigmoid_loss` at its own scale and bias."""
    if spec.loss == "sigmoid":
        return sigmoid_loss(image_embeds, text_embeds, labels, model.logit_scale, model.logit_bias)
    return contrastive_loss(image_embeds, text_embeds, labels, model.logit_scale)


def _normed(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


class _CaptionLoss:
    """``loss(batch)`` for the Trainer: images through the image tower, each distinct caption of
    the batch once through the text tower, then the family's loss (:func:`family_loss`) on the
    B x B pairs."""

    def __init__(self, model, tokens: dict[str, torch.Tensor], n_templates: int, spec: FamilySpec | None = None) -> None:
        self.model, self.tokens, self.n_templates = model, tokens, n_templates
        self.spec = spec or family_of_model(model)
        self.pending: list[torch.Tensor] = []  # micro-batch losses of the current optimizer step

    def __call__(self, batch: dict) -> torch.Tensor:
        labels, captions = batch["labels"], batch["labels"] * self.n_templates + batch["templates"]
        if len(labels) == 0:  # every image of this micro-batch was unreadable
            return self.model.logit_scale.sum() * 0.0
        uniq, inverse = torch.unique(captions, return_inverse=True)
        img = _normed(towers.image_embeds(self.model, batch["pixels"]))
        txt = _normed(towers.text_embeds(self.model, {k: v[uniq] for k, v in self.tokens.items()}))
        loss = family_loss(self.spec, self.model, img, txt[inverse], labels)
        self.pending.append(loss.detach().float())
        return loss


# ---------------------------------------------------------------------------------------
# Data: seeded epoch orders over a source, decoded and preprocessed in DataLoader workers
# ---------------------------------------------------------------------------------------
class _EpochData:
    """``data(epoch, start)``: micro-batches of one seeded permutation of ``positions``, from
    micro-batch ``start`` on. The order and each image's caption template depend on
    ``(seed, epoch)`` only, so a resumed run sees exactly the batches it would have seen."""

    def __init__(self, src: Source, positions: np.ndarray, micro: int, preprocess: ImageRecipe, n_templates: int,
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


def _load_checkpoint(root: Path, trainer: Trainer, identity: FinetuneIdentity) -> dict | None:
    from safetensors.torch import load_file

    latest = root / "latest"
    if not latest.is_file():
        return None
    d = root / latest.read_text().strip()
    log = json.loads((d / "log.json").read_text())
    identity.check(log["identity"], root)
    state = torch.load(d / "trainer.pt", map_location="cpu", weights_only=True)
    state["model"] = load_file(str(d / "model.safetensors"))
    trainer.load_state_dict(state)
    return log


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


def finetune(source: PathLike | Source, out_dir: PathLike, model: str | os.PathLike | ModelFiles = DEFAULT_MODEL,
             config: FinetuneConfig | None = None, *, format: str = "auto", source_options: dict | None = None,
             train_indices: Sequence[int] | None = None, overwrite: bool = False, progress: bool = True,
             plots: bool | None = None, **options: Any) -> FinetuneResult:
    """Fine-tune both CLIP towers on ``source`` paired with class captions; save to ``out_dir``.

    Parameters
    ----------
    source : any dataset :func:`clip_heads.datasets.open_source` opens, or an open Source.
    model : hub id or directory of the CLIP to start from.
    config : the recipe (:class:`~clip_heads.finetune_config.FinetuneConfig`, default B&P's);
        ``options`` replace its fields by name (``epochs=3``, ``lr=1e-5``, ``templates="clip-e"``...).
    train_indices : positions of the source to train on (default all), e.g. a CV fold's complement.
    overwrite : start over instead of resuming a run in ``out_dir``.
    plots : draw the training curve into ``out_dir/plots/`` (:func:`clip_heads.results.render`;
        default on, ``CLIP_HEADS_PLOTS=0`` turns it off); ``index.html`` is written either way.

    Rerunning an interrupted call resumes from its last checkpoint; rerunning a finished one
    returns ``"up-to-date"``; either is refused, naming what differs, unless the model, data and
    recipe are the ones ``out_dir`` was trained with.

    Returns
    -------
    FinetuneResult; ``out_dir`` holds the model, tokenizer and image processor
    (``save_pretrained``), ``report.txt``, ``metrics.json``, ``train_log.json`` and the run's
    page (``index.html``: provenance, loss per epoch, the training curve).
    """
    config = FinetuneConfig.from_options(options, base=config)
    result, _ = finetune_loaded(source, out_dir, model, config, format=format, source_options=source_options,
                                train_indices=train_indices, overwrite=overwrite, progress=progress, plots=plots)
    return result


def finetune_loaded(source: PathLike | Source, out_dir: PathLike, model: str | os.PathLike | ModelFiles,
                    config: FinetuneConfig, *, format: str = "auto", source_options: dict | None = None,
                    train_indices: Sequence[int] | None = None, overwrite: bool = False,
                    progress: bool = True, plots: bool | None = None) -> tuple[FinetuneResult, tuple | None]:
    """:func:`finetune`, also returning the trained ``(model, tokenizer, processor)`` so a caller
    can score it without reloading; ``None`` in their place when the out dir already held the
    finished run."""
    out = Path(out_dir)
    src = as_source(source, format, source_options)
    plan = plan_finetune(src, model, config, train_indices)
    dev = resolve_device(config.device)
    amp = _resolve_amp(dev, config.precision)
    with exclusive_lock(out, "clip-heads fine-tune"):
        return _train(src, out, plan, dev, amp, overwrite=overwrite, progress=progress, plots=plots)


def _train(src: Source, out: Path, plan: FinetunePlan, dev: torch.device, amp: bool | str, *, overwrite: bool,
           progress: bool, plots: bool | None = None) -> tuple[FinetuneResult, tuple | None]:
    config, identity, files, positions, micro = plan.config, plan.identity, plan.files, plan.positions, plan.micro
    epochs, tpls = identity.epochs, list(identity.templates)
    ckpt = out / "checkpoint"
    if overwrite:
        shutil.rmtree(ckpt, ignore_errors=True)
        (out / TRAIN_LOG).unlink(missing_ok=True)
    if (out / TRAIN_LOG).is_file():
        done = json.loads((out / TRAIN_LOG).read_text())
        identity.check(done["identity"], out)
        logger.info("%s is a finished fine-tune with these settings; nothing to do", out)
        return FinetuneResult(out, "up-to-date", done["steps"][-1]["step"] if done["steps"] else 0, len(positions),
                              done["skipped"], done), None
    for stale in ckpt.glob(".step-*"):  # staging folders of a killed run; we hold the lock, so nobody else's
        shutil.rmtree(stale, ignore_errors=True)

    loaded = load_backbone(files, dev, precision="fp32", trainable=True, dtype=torch.float32)  # fp32 master weights
    clip, tokenizer, processor, spec = loaded.model, loaded.tokenizer, loaded.processor, loaded.spec
    cap = math.log(spec.max_logit_scale) if spec.max_logit_scale else None  # CLIP's cap; SigLIP's scale is free
    if config.gradient_checkpointing:
        # transformers 5 renamed it; 4.x only has the old name.
        (getattr(clip, "activation_checkpointing_enable", None) or clip.gradient_checkpointing_enable)()

    # Every caption tokenized once, by the family's rule; caption id = class * n_templates + template.
    texts = [t.format(class_phrase(c)) for c in src.classes for t in tpls]
    tokens = {k: v.to(dev) for k, v in loaded.tokenize(texts).items()}
    data = _EpochData(src, positions, micro, loaded.preprocess, len(tpls), config.seed,
                      default_workers(dev) if config.workers is None else config.workers, dev.type == "cuda")
    loss_fn = _CaptionLoss(clip, tokens, len(tpls), spec)
    recipe = dict(family=spec.name, loss=spec.loss, template_set=plan.template_set, n_train=int(len(positions)),
                  classes=list(src.classes),
                  precision=str(amp or "fp32"), device=str(dev), gradient_checkpointing=config.gradient_checkpointing,
                  steps_per_epoch=math.ceil(len(data) / (config.batch_size // micro)))
    # The starting model and its own ancestors, so WiSE-FT can tell a fine-tune from an unrelated model.
    base = files.identity()
    log: dict[str, Any] = {"identity": identity.to_dict(), "config": config.to_dict(), "base": base,
                           "lineage": [base] + model_lineage(files.path), "recipe": recipe, "steps": [], "epochs": [],
                           "skipped": {}}
    from tqdm.auto import tqdm

    clock = {"t": time.perf_counter(), "wait": 0.0}

    def on_step(trainer: Trainer, logs: dict) -> None:
        if cap is not None:
            with torch.no_grad():
                clip.logit_scale.clamp_(0, cap)  # CLIP's cap, after each update
        now = time.perf_counter()
        loss = torch.stack(loss_fn.pending).mean().item() if loss_fn.pending else float("nan")
        loss_fn.pending.clear()
        step = {"step": trainer.step, "epoch": trainer.epoch + 1, "loss": loss, "lr": logs["lr"],
                **towers.logit_values(clip, spec), "seconds": now - clock["t"], "data_wait": data.wait_s - clock["wait"]}
        log["steps"].append(step)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        if config.checkpoint_every and trainer.step % config.checkpoint_every == 0:
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

    trainer = Trainer(clip, loss_fn, data, epochs=epochs, lr=config.lr, weight_decay=config.weight_decay,
                      warmup_steps=config.warmup, grad_accum=config.batch_size // micro,
                      max_grad_norm=config.max_grad_norm, device=dev, amp=amp, steps_per_epoch=len(data),
                      seed=config.seed, on_step=on_step, on_epoch_end=on_epoch_end)
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
    result = FinetuneResult(out, status, trainer.step, len(positions), dict(data.skipped), log)
    _write_report(out, src, plan, result, plots)
    atomic_write_text(out / TRAIN_LOG, json.dumps(log, indent=1))  # last: marks the model complete
    if not config.keep_checkpoint:
        shutil.rmtree(ckpt, ignore_errors=True)
    logger.info("fine-tuned %s on %d images (%d skipped) in %d steps -> %s", files.model_id, len(positions),
                len(data.skipped), trainer.step, out)
    return result, (clip, tokenizer, processor)


def _write_report(out: Path, src: Source, plan: FinetunePlan, result: FinetuneResult,
                  plots: bool | None = None) -> None:
    """``report.txt``, ``metrics.json`` and ``index.html`` beside the model (the results layout):
    what was trained, and how its loss went (``loss_curve``: per optimiser step)."""
    log, ident = result.log, plan.identity
    run = {"command": "finetune", "source": str(src.root), "format": src.format, "model": plan.files.model_id,
           "config": plan.config.to_dict()}
    info = {"run": run, "data": dict(source_record(src, plan.positions), train_indices=ident.train_indices),
            "model": plan.files.identity()}
    losses = [e["loss"] for e in log["epochs"]]
    lines = [f"Fine-tuned {plan.files.model_id} on {len(plan.positions)} images of {src.root} ({src.format}): "
             f"{result.steps} steps, {ident.epochs} epochs, batch {ident.batch_size} (micro-batch {ident.micro_batch}), "
             f"lr {ident.lr:g}, weight decay {ident.weight_decay:g}, captions {plan.template_set} "
             f"({len(ident.templates)} templates), seed {ident.seed} [{result.status}]",
             "loss per epoch: " + ", ".join("-" if v is None else f"{v:.4f}" for v in losses),
             f"skipped images: {len(result.skipped)}",
             f"encode with: clip-heads encode SOURCE --model {out}"]
    metrics = {"info": info, "kind": "finetune", "status": result.status, "n_steps": result.steps,
               "n_train": result.n_train, "identity": log["identity"], "epochs": log["epochs"],
               "skipped": result.skipped,
               "loss_curve": {k: [s.get(k) for s in log["steps"]] for k in ("step", "epoch", "loss", "lr")}}
    with results_files(out) as stage:
        (stage / REPORT).write_text("\n".join(lines) + "\n")
        write_json(stage / "metrics.json", metrics)
        render(stage, plots, out)
