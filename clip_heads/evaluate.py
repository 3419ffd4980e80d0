"""Evaluation commands on feature stores: zero-shot, training a head, scoring a saved head.

Three entry points, one per CLI command; each is one call that returns a
:class:`~clip_heads.results.Report` (its ``text`` is the printed table) and, given ``out_dir``,
writes its results folder in the one layout of :mod:`clip_heads.results` (``report.txt``,
``metrics.json``, ``per_class.csv``, ``confusion_matrix.csv``, ``predictions.csv``):

* :func:`run_zero_shot` - ``clip-heads zero-shot STORE``
* :func:`train_head` - ``clip-heads train-head HEAD STORE --out DIR [--cv K] [--eval-store B]``
* :func:`evaluate_head` - ``clip-heads evaluate HEAD_DIR STORE``

The zero-shot rules (prompt ensembling, the store's scoring rule) are the kernel's,
:mod:`clip_heads.zeroshot`; reading a store, label alignment and the one decision rule per
evaluation are :mod:`clip_heads.scoring`. Prompt ablation (``clip-heads ablate-prompts``) is in
:mod:`clip_heads.ablation`, top-k retrieval in :mod:`clip_heads.retrieval`, folds and k-fold CV
in :mod:`clip_heads.crossval`.

**Resubstitution.** A head records the fingerprint of the store it was trained on
(:func:`clip_heads.results.store_fingerprint`); scoring it on a store with the same data is
labelled resubstitution (optimistic), as train-head labels its own training-data report.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np

from clip_heads import zeroshot
from clip_heads.crossval import cross_validate, write_folds
from clip_heads.errors import BadValueError
from clip_heads.label_maps import LabelMapSpec, norm
from clip_heads.calibration import format_calibration
from clip_heads.metrics import soft_label_metrics
from clip_heads.results import PROBA, PathLike, Report, render, results_dir, write_section, write_summary
from clip_heads.scoring import (EvalData, info_text, label_map_name, load_eval_data, require_prompts,
                                score_predictions, section)
from clip_heads.store import PromptSet
from clip_heads.tables import format_soft_labels, format_table

logger = logging.getLogger(__name__)

__all__ = ["run_zero_shot", "train_head", "evaluate_head"]


# ---------------------------------------------------------------------------------------
# Zero-shot
# ---------------------------------------------------------------------------------------
def run_zero_shot(store_path: PathLike, prompt_set: str | None = None, template_ids: Any = None,
                  out_dir: PathLike | None = None, label_map: LabelMapSpec | None = None, top_k: int = 0,
                  overwrite: bool = False, *, plots: bool | None = None) -> Report:
    """Zero-shot: each image gets the class whose prompt vector is nearest in cosine.

    Parameters
    ----------
    prompt_set : name of a prompt set in the store (default: the store's default set).
    template_ids : ids of the set's templates (``[0, 3]``, ``"0,3"``) or template texts;
        default all (their ensemble).
    label_map : when the prompt set's classes differ from the store's (FI prompts on an
        Emotion6 store): built-in name, JSON path or dict (see :mod:`clip_heads.label_maps`).
        Without one, prompts are matched to the store's classes by name.
    top_k : also write the ``top_k`` images nearest each class prompt (:func:`clip_heads.retrieval.top_k_images`).
    overwrite : replace an ``out_dir`` holding the results of another run (see :mod:`clip_heads.results`).
    plots : draw the figures (:func:`clip_heads.results.render`; default on, ``CLIP_HEADS_PLOTS=0``
        turns them off); ``index.html`` is written either way.

    Class probabilities follow the store's scoring rule (:class:`clip_heads.zeroshot.ScoringRule`:
    CLIP's softmax at the store's ``logit_scale``, 100 when the store records none); the
    prediction is the class of highest cosine; their calibration (ECE, Brier, NLL) is reported.
    Writes the results layout to ``out_dir`` (+ ``top_k.json``/``top_k.png`` with ``top_k``), its
    figures in ``plots/`` and ``index.html``.
    """
    d = load_eval_data(store_path, prompt_set)
    ps = require_prompts(d)
    tids = zeroshot.resolve_template_ids(ps, template_ids)
    V = zeroshot.class_vectors(ps, tids)
    head_classes = ps.classes
    if label_map is None:  # score the store's own label set only, whatever else the set has
        V, head_classes = V[zeroshot.prompt_columns(ps, d.classes)], d.classes
    cos = zeroshot.cosine(d.X, V)
    how = d.scoring.describe() + ("" if d.scoring.scoring == "softmax" else ", renormalised to sum to 1")
    sec, predictions = score_predictions(cos.argmax(1), d.scoring.distribution(cos), head_classes, d, label_map,
                                         f"prompt set {ps.name!r}", probabilities=how)
    sec["scoring"] = d.scoring.to_dict()
    used = ps.templates if tids is None else [ps.templates[i] for i in tids]
    # The record of what was run keeps its key "templates" (the ids), so earlier results folders still match.
    run = {"command": "zero-shot", "store": os.path.abspath(d.path), "prompt_set": ps.name,
           "templates": None if tids is None else list(tids), "label_map": label_map_name(label_map)}
    info = {"store": str(d.path), "model_id": d.backbone["model_id"], "prompt_set": ps.name, "templates": used,
            "scoring": d.scoring.describe(), "data": d.record, "run": run}
    metrics, text = section(sec, "Zero-shot classification", info)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        with results_dir(out, run, overwrite) as stage:
            write_section(stage, metrics, text, predictions)
            if top_k:
                from clip_heads.retrieval import top_k_images

                top_k_images(store_path, k=top_k, prompt_set=ps.name, template_ids=tids, out_dir=stage)
            render(stage, plots, out)
    return Report("zero-shot", text, metrics, out, predictions=predictions)


# ---------------------------------------------------------------------------------------
# Heads
# ---------------------------------------------------------------------------------------
def _head_factory(head_cls: type, params: dict | None, seed: int, prompts: PromptSet | None,
                  classes: list[str], scoring: zeroshot.ScoringRule) -> Callable[[], Any]:
    from clip_heads.heads import make_head

    params = dict(params or {})
    make_head(head_cls.name, params)  # a bad parameter fails now, before any fold is trained
    params.setdefault("random_state", seed)  # every head takes one
    if head_cls.zero_shot_scoring:  # it scores with the store's own rule (the model's scale and bias)
        for k in ("scoring", "logit_scale", "logit_bias"):
            params.setdefault(k, getattr(scoring, k))
    if head_cls.uses_prompts and params.get("prompt_embeds") is None:
        if prompts is None:
            raise ValueError(f"head {getattr(head_cls, 'name', head_cls.__name__)!r} needs class prompts, "
                             f"but the store has no prompt set (add one with `clip-heads prompts`)")
        V = zeroshot.class_vectors(prompts, classes=classes)
        params["prompt_embeds"] = {c: v for c, v in zip(classes, V, strict=True)}  # by name: no row-order ambiguity
    return lambda: make_head(head_cls.name, params)


def _predict(head: Any, X: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """(predicted indices into the head's classes, probabilities or None, class names)."""
    names = [str(c) for c in head.classes_]
    if hasattr(head, "predict_proba"):
        P = np.asarray(head.predict_proba(X))
        return P.argmax(1), P, names
    index = {c: i for i, c in enumerate(head.classes_)}
    return np.array([index[v] for v in head.predict(X)]), None, names


def _score_head(head: Any, d: EvalData, label_map: LabelMapSpec | None, desc: str) -> tuple[dict, dict]:
    """Score a fitted head on store ``d``: same classes, through a label map, or natively via
    the store's own prompts for a text-side head (one with ``with_prompts``)."""
    head_names = {norm(c) for c in head.classes_}
    native = None
    if label_map is None and not all(norm(c) in head_names for c in d.classes) and head.can_requery:
        native = require_prompts(d)
        V = zeroshot.class_vectors(native, classes=d.classes)
        head = head.with_prompts({c: v for c, v in zip(d.classes, V, strict=True)}, classes=d.classes)
        logger.info("no label map: scoring %s over the classes of %s via its prompt set %r",
                    desc, d.path.name, native.name)
    pred, P, names = _predict(head, d.X)
    sec, predictions = score_predictions(pred, P, names, d, label_map, desc)
    if native is not None:
        sec["alignment"].update(mode="native", prompt_set=native.name)
    return sec, predictions


def _check_backbone(head: Any, d: EvalData, what: str) -> None:
    try:
        head.check_backbone(**d.backbone)
    except ValueError as e:
        raise ValueError(f"{what} cannot score store {d.path}: {e}") from e


def train_head(head_name: str, store_path: PathLike, out_dir: PathLike, cv: int | None = None, seed: int = 0,
               eval_store: PathLike | None = None, label_map: LabelMapSpec | None = None,
               head_params: dict | None = None, prompt_set: str | None = None, progress: bool = True,
               plots: bool | None = None) -> Report:
    """Train a head on a store; optionally cross-validate it and score it on another store.

    With ``cv=K``, stratified K-fold CV (:func:`cross_validate`, folds from
    :func:`stratified_folds(labels, K, seed)`) runs first; on a store with soft labels
    (Emotion6's ``emotion_distribution``) its soft-label metrics are computed out of fold.
    Then a final head is fitted on all of the store and saved with ``save_pretrained(out_dir)``
    after ``set_backbone`` and ``set_training_data`` (the store's fingerprint). With
    ``eval_store``, the final head is scored there: same class names directly, else through
    ``label_map``, else (zero-shot/contrastive heads) natively over the other store's prompts.
    Without either, the report is on the training data itself (resubstitution, optimistic);
    an eval store holding the same data as the training store is labelled so too.

    With ``head_params["use_views"]`` true (``--param use_views=true``) the head trains on the
    store's augmented views too (``encode --views K``: each image's K views with its label; in CV
    only the training folds' views), and is scored on the plain vectors.

    Writes to ``out_dir``: the head (``config.json``, ``model.safetensors``), ``report.txt``
    and ``metrics.json`` (all sections), and one folder per section in the results layout:
    ``cv/`` (+ ``folds.csv``; out-of-fold ``predictions.csv`` with 1-based fold numbers),
    ``eval/`` or ``train/``, each with its figures (``plots/``, unless ``plots=False``) and
    ``index.html``, and an ``index.html`` on top showing them all. Heads that predict
    probabilities get their calibration (out of fold for CV). The folder is swapped in whole at
    the end; other files a user keeps there survive, the previous run's sections do not.
    """
    from clip_heads.heads import get_head

    if label_map is not None and eval_store is None:
        raise BadValueError("a label map applies to an eval store: pass eval_store too "
                         "(the training store's own labels need none)")
    head_cls = get_head(head_name)
    d = load_eval_data(store_path, prompt_set)
    e = load_eval_data(eval_store) if eval_store is not None else None  # a bad eval store fails before training
    names = np.asarray(d.classes)[d.y]
    make = _head_factory(head_cls, head_params, seed, d.prompts, d.classes, d.scoring)
    views = None
    if (head_params or {}).get("use_views") is True:  # the store's augmented views train beside the images
        from clip_heads.scoring import load_views

        views = load_views(d.path)  # row for row with d's labelled rows; evaluation stays on plain vectors
    out = Path(out_dir)
    run = {"command": "train-head", "head": head_name, "store": os.path.abspath(d.path), "cv": cv, "seed": seed,
           "eval_store": os.path.abspath(e.path) if e is not None else None, "label_map": label_map_name(label_map),
           "prompt_set": prompt_set, "head_params": {k: v for k, v in (head_params or {}).items() if k != "prompt_embeds"}}
    info = {"head": head_name, "store": str(d.path), "model_id": d.backbone["model_id"], "seed": seed,
            "head_params": run["head_params"], "data": d.record, "run": run}
    texts, metrics, result, sections = [], {"info": info}, None, {}
    if cv:
        result = cross_validate(make, d.X, names, k=cv, seed=seed, classes=d.classes, progress=progress, views=views)
        report = result.report
        title = f"{result.k}-fold cross-validation of the {head_name} head on {d.path.name}"
        text = format_table(report, title)
        if d.soft is not None and result.y_score is not None:
            try:
                report["soft_labels"] = dict(soft_label_metrics(d.soft[0], result.y_score, d.soft[1], d.classes),
                                             computed="out of fold")
                text += ("\nOut of fold: each image's probabilities come from the fold model that did not see it\n"
                         + format_soft_labels(report["soft_labels"]))
            except ValueError as err:
                logger.info("soft-label metrics skipped: %s", err)
        if "calibration" in report:
            text += "\n" + format_calibration(report["calibration"])
        oof = {"key": list(d.keys), "label": names.tolist(), "prediction": np.asarray(d.classes)[result.y_pred].tolist(),
               "fold": (result.folds + 1).tolist()}
        if result.y_score is not None:
            oof[PROBA] = result.y_score
        sections["cv"] = (report, text, oof)
        metrics["cv"], texts = report, [text]
    head = make().fit(d.X, names) if views is None else make().fit(d.X, names, views=views)
    head.set_backbone(**d.backbone)
    head.set_training_data(str(d.path), d.fingerprint)
    if e is not None:
        _check_backbone(head, e, f"the {head_name} head trained on {d.path}")
        resub = e.fingerprint == d.fingerprint
        sec, preds = _score_head(head, e, label_map, f"{head_name} head trained on {d.path.name}")
        title = (f"The {head_name} head trained on {d.path.name}, evaluated on {e.path.name}"
                 + (" (resubstitution: the same data as its training store; optimistic)" if resub else ""))
        m, text = section(sec, title, {"eval_store": str(e.path), "trained_on": str(d.path),
                                       "resubstitution": resub, "data": e.record})
        sections["eval"] = (m, text, preds)
        metrics["eval"] = m
        texts.append(text)
    elif not cv:
        sec, preds = _score_head(head, d, None, f"{head_name} head")
        m, text = section(sec, f"The {head_name} head on its own training data (resubstitution: optimistic)",
                          {"store": str(d.path), "resubstitution": True, "data": d.record})
        sections["train"] = (m, text, preds)
        metrics["train"] = m
        texts.append(text)
    text = info_text(dict(info, saved_to=str(out))) + "\n" + "\n".join(texts)
    # Retraining into a folder replaces the head and every section of the previous run, and
    # keeps whatever else the user put there.
    with results_dir(out, run, overwrite=True, keep_existing=True) as stage:
        for stale in ("cv", "eval", "train", "report.txt", "metrics.json", "predictions.csv", "plots", "index.html"):
            p = stage / stale
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        head.save_pretrained(stage)
        for name, (m, sec_text, preds) in sections.items():
            write_section(stage / name, m, sec_text, preds)
        if result is not None:
            write_folds(stage / "cv" / "folds.csv", d.keys, names, result.folds)
        write_summary(stage, metrics, text)
        render(stage, plots, out)
    return Report("train", text, metrics, out, result)


def evaluate_head(head_dir: PathLike, store_path: PathLike, out_dir: PathLike | None = None,
                  label_map: LabelMapSpec | None = None, prompt_set: str | None = None,
                  overwrite: bool = False, plots: bool | None = None) -> Report:
    """Score a saved head on a store, after checking both come from the same CLIP.

    Class sets are met as in :func:`train_head`'s ``eval_store``. Emotion6-style stores with an
    ``emotion_distribution`` extra also get soft-label metrics. A store holding the data the
    head was trained on (same fingerprint) is reported as resubstitution, with a warning.
    Writes the results layout to ``out_dir`` (with ``plots/`` and ``index.html``); a folder
    holding another run's results is not replaced unless ``overwrite``.
    """
    from clip_heads.heads.base import Head

    head = Head.from_pretrained(head_dir)
    d = load_eval_data(store_path, prompt_set)
    _check_backbone(head, d, f"head {head_dir}")
    trained = getattr(head, "training_data_", None) or {}
    resub = bool(trained) and trained.get("fingerprint") == d.fingerprint
    if resub:
        logger.warning("head %s was trained on this data (store %s, same fingerprint): the scores are "
                       "resubstitution and optimistic", head_dir, trained.get("store"))
    sec, predictions = _score_head(head, d, label_map, f"head {Path(head_dir).name!r}")
    run = {"command": "evaluate", "head_dir": os.path.abspath(head_dir), "store": os.path.abspath(d.path),
           "label_map": label_map_name(label_map), "prompt_set": prompt_set}
    info = {"head_dir": str(head_dir), "head": getattr(head, "name", type(head).__name__), "store": str(d.path),
            "model_id": d.backbone["model_id"], "trained_on": trained.get("store", "unknown (not recorded)"),
            "resubstitution": resub, "data": d.record, "run": run}
    title = f"Head {Path(head_dir).name} on {d.path.name}"
    if resub:
        title += " (resubstitution: the head was trained on this data; optimistic)"
    metrics, text = section(sec, title, info)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        with results_dir(out, run, overwrite) as stage:
            write_section(stage, metrics, text, predictions)
            render(stage, plots, out)
    return Report("evaluate", text, metrics, out, predictions=predictions)
