"""The paper's k-fold protocol for the full fine-tune (Bondielli & Passaro, Tables 3 and 4).

For each of ``cv`` folds, fine-tune from the ORIGINAL weights on the other folds
(:func:`clip_heads.finetune.finetune_loaded`) and zero-shot the held-out fold by cosine to the
class captions (:func:`clip_heads.finetune_eval.zero_shot_report`). The folds are
:func:`clip_heads.crossval.stratified_folds`, the heads' folds for the same seed. The folder is
one evaluation in the results layout (:mod:`clip_heads.results`): ``report.txt``,
``metrics.json``, ``per_class.csv``, ``confusion_matrix.csv``, out-of-fold ``predictions.csv``
(1-based ``fold``) and ``folds.csv`` (0-based ``fold_id``), beside one ``fold-NN/`` per fold.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .backbones.model import load_backbone, resolve_device
from .backbones.preprocess import image_recipe
from .calibration import calibration_of, format_calibration
from .catalog import DEFAULT_MODEL
from .crossval import stratified_folds, write_folds
from .encode import default_workers
from .finetune import TRAIN_LOG, finetune_loaded
from .finetune_config import FinetuneConfig, as_source, plan_finetune
from .finetune_eval import RAW_KEYS, zero_shot_report
from .fsutil import PathLike, exclusive_lock
from .identity import ModelFiles, resolve_model
from .metrics import classification_report, summarize_folds
from .results import METRICS, PROBA, REPORT, Report, render, results_files, source_record, write_json, write_section
from .source import Source
from .tables import format_table

logger = logging.getLogger(__name__)

__all__ = ["cross_validate_finetune", "fold_dir"]


def fold_dir(out: Path, fold: int) -> Path:
    """``out/fold-NN``: the folder of fold id ``fold`` (0-based, as ``folds.csv`` has it)."""
    return Path(out) / f"fold-{fold:02d}"


def cross_validate_finetune(source: PathLike | Source, out_dir: PathLike, model: str | os.PathLike = DEFAULT_MODEL,
                            config: FinetuneConfig | None = None, *, cv: int = 10, seed: int | None = None,
                            format: str = "auto", source_options: dict | None = None, keep_models: bool = False,
                            eval_batch_size: int = 64, overwrite: bool = False, progress: bool = True,
                            plots: bool | None = None, **options: Any) -> Report:
    """For each of ``cv`` folds, fine-tune from the ORIGINAL weights on the other folds and
    zero-shot the held-out fold by cosine to the class captions.

    ``config`` and ``options`` are :func:`clip_heads.finetune.finetune`'s (``epochs``,
    ``batch_size``, ``lr``, ``templates``...); ``seed`` (default the config's) seeds the folds
    and each fine-tune. Each fold lives in ``out_dir/fold-NN/`` (NN the fold id of ``folds.csv``;
    its weights are deleted after scoring unless ``keep_models``). A rerun reuses a scored fold
    only if it was fine-tuned from the same weights with the same settings (anything else is
    refused); ``overwrite=True`` discards the scored folds and starts over. Each fold model's
    zero-shot probabilities (its own scoring rule: CLIP's softmax over its ``logit_scale * cos``)
    are calibrated per fold and, out of fold, for the whole run (ECE 15 bins, Brier, NLL in
    metrics.json and report.txt; ``proba_<class>`` columns in predictions.csv). The folder's
    figures (confusion matrix, per-class bars, fold spread, reliability diagram; ``plots=False``
    skips them) and its ``index.html`` are drawn from the out-of-fold evaluation; each
    ``fold-NN/`` has a page of its numbers, linked from it.

    Returns a :class:`~clip_heads.results.Report` whose ``metrics`` are the
    :func:`clip_heads.metrics.summarize_folds` dict (per fold, mean, std, pooled) with ``info``.
    """
    config = FinetuneConfig.from_options(options, base=config)
    config = config if seed is None else config.replace(seed=seed)
    out = Path(out_dir)
    src = as_source(source, format, source_options)
    folds = stratified_folds(src.labels, cv, config.seed)
    dev = resolve_device(config.device)
    workers = default_workers(dev) if config.workers is None else config.workers
    files = resolve_model(model)  # every fold starts from these weights
    with exclusive_lock(out, f"clip-heads {cv}-fold fine-tune CV"):
        if overwrite:
            for old in out.glob("fold-*"):
                if old.is_dir() and old.name[5:].isdigit():
                    shutil.rmtree(old)
        out.mkdir(parents=True, exist_ok=True)
        write_folds(out / "folds.csv", src.keys, [src.classes[i] for i in src.labels], folds)  # readable while it runs
        reports = []
        from tqdm.auto import tqdm

        bar = tqdm(total=cv, desc=f"{cv}-fold fine-tune CV", unit="fold", disable=not progress)
        for f in range(cv):
            reports.append(_fold(src, out, files, config, folds, f, cv, dev, workers, keep_models, eval_batch_size,
                                 progress))
            bar.update(1)
        bar.close()
        report = _write(src, out, files, config, folds, reports, cv, plots)
    # The table is in report.txt (the CLI prints it); the log says where, once.
    logger.info("%d-fold fine-tune CV: accuracy %.4f ± %.4f; report in %s", cv, report["mean"]["accuracy"],
                report["std"]["accuracy"], out / "report.txt")
    return report


def _run(src: Source, files: ModelFiles, config: FinetuneConfig, cv: int) -> dict:
    """The ``info.run`` record of a fine-tune CV."""
    return {"command": "finetune --cv", "source": str(src.root), "format": src.format, "model": files.model_id, "cv": cv,
            "config": config.to_dict()}


def _fold(src: Source, out: Path, files: ModelFiles, config: FinetuneConfig, folds: np.ndarray, f: int, cv: int,
          dev: torch.device, workers: int, keep_models: bool, eval_batch_size: int, progress: bool) -> dict:
    """The held-out report of fold ``f``: reused when scored before by this same fine-tune, else trained and scored."""
    here, train = fold_dir(out, f), np.flatnonzero(folds != f)
    scored = _held_out_report(here)
    if scored is not None and (here / TRAIN_LOG).is_file():
        # A scored fold is reused only if it was fine-tuned exactly as this run would.
        plan_finetune(src, files, config, train).identity.check(json.loads((here / TRAIN_LOG).read_text())["identity"],
                                                                here)
        logger.info("fold %d/%d already scored", f + 1, cv)
        return scored
    logger.info("fold %d/%d: fine-tuning on %d images", f + 1, cv, len(train))
    # No training figure: the fold's page is its held-out evaluation, drawn below.
    res, loaded = finetune_loaded(src, here, files, config, train_indices=train, overwrite=False, progress=progress,
                                  plots=False)
    if loaded is None:
        reloaded = load_backbone(here, dev, precision="fp32", dtype=torch.float32)
        loaded = reloaded.model, reloaded.tokenizer, reloaded.processor
    clip, tokenizer, processor = loaded
    rep = zero_shot_report(clip, tokenizer, image_recipe(processor), src, np.flatnonzero(folds == f),
                           res.log["identity"]["templates"], dev, config.precision, eval_batch_size, workers, progress)
    rep["fold"] = f  # the fold id of folds.csv; messages count folds from 1
    rep["info"] = {"run": dict(_run(src, files, config, cv), fold=f + 1), "data": source_record(src, rep["positions"]),
                   "model": files.identity(), "trained_on": f"the other {cv - 1} folds ({len(train)} images)"}
    # The fine-tune's own report.txt / metrics.json (and page) give way to the fold's held-out evaluation.
    with results_files(here) as stage:
        text = format_table(rep, f"Fold {f + 1} of {cv}: zero-shot on its held-out images")
        if "calibration" in rep:
            text += "\n" + format_calibration(rep["calibration"])
        (stage / REPORT).write_text(text)
        write_json(stage / METRICS, rep)
        # Its numbers only: the figures (pooled out of fold, and the spread over folds) are the CV page's.
        render(stage, False, here, title=f"clip-heads finetune --cv: fold {f + 1} of {cv}, zero-shot on its held-out "
               f"images", notes=["One fold of a cross-validation: its figures are drawn for all folds together on "
                                 "the page of the folder above (../index.html)."])
    if not keep_models:
        for w in here.glob("*.safetensors"):
            w.unlink()
    logger.info("fold %d/%d: accuracy %.4f, macro F1 %.4f", f + 1, cv, rep["accuracy"], rep["macro"]["f1"])
    return rep


def _held_out_report(here: Path) -> dict | None:
    """The fold's scored held-out report, or None (not scored yet: its metrics.json, if any, is the fine-tune's)."""
    try:
        rep = json.loads((here / METRICS).read_text())
    except (OSError, ValueError):
        return None
    return rep if isinstance(rep, dict) and "positions" in rep and "y_pred" in rep else None


def _write(src: Source, out: Path, files: ModelFiles, config: FinetuneConfig, folds: np.ndarray, reports: list[dict],
           cv: int, plots: bool | None = None) -> Report:
    pos = np.concatenate([r["positions"] for r in reports]).astype(np.int64)
    y_pred = np.concatenate([r["y_pred"] for r in reports]).astype(np.int64)
    # Out-of-fold probabilities: each image's from the fold model that did not see it (a fold
    # scored by an earlier version has none; then there is no pooled calibration).
    P = np.concatenate([r["proba"] for r in reports]) if all(r.get("proba") for r in reports) else None
    pooled = classification_report(src.labels[pos], y_pred, src.classes, P)
    summary = summarize_folds([{k: v for k, v in r.items() if k not in (*RAW_KEYS, "info")} for r in reports],
                              pooled)
    summary["folds_file"] = str(out / "folds.csv")
    summary["seed"] = config.seed  # of the folds and of every fold's fine-tune
    summary["info"] = {"run": _run(src, files, config, cv), "data": source_record(src), "model": files.identity()}
    sigmoid = any((r.get("scoring") or {}).get("scoring") == "sigmoid" for r in reports)
    how = ("each fold model's own sigmoid(logit_scale * cos + logit_bias), renormalised to sum to 1" if sigmoid else
           "each fold model's own softmax over logit_scale * cos")  # each fold's scale: folds[i].scoring
    cal = calibration_of(src.labels[pos], P, src.classes, probabilities=how, computed="out of fold") \
        if P is not None else None
    if cal is not None:
        summary["calibration"] = cal
    title = f"Fine-tuned CLIP, {cv}-fold cross-validation (zero-shot on each held-out fold)"
    text = format_table(summary, title)
    if cal is not None:
        text += "\n" + format_calibration(cal)
    names = np.asarray(src.classes, dtype=object)
    order = np.argsort(pos, kind="stable")  # predictions in source order, like train-head --cv's
    predictions = {"key": [src.keys[i] for i in pos[order]], "label": names[src.labels[pos[order]]].tolist(),
                   "prediction": names[y_pred[order]].tolist(), "fold": (folds[pos[order]] + 1).tolist()}
    if P is not None:
        predictions[PROBA] = P[order]
    with results_files(out) as stage:
        write_section(stage, summary, text, predictions)
        render(stage, plots, out)
    return Report("finetune-cv", text, summary, out, predictions=predictions)
