"""Evaluation on feature stores: zero-shot, stratified CV, cross-dataset scoring.

Three entry points, one per CLI command; each is one call that returns a :class:`Report` (its
``text`` is the printed table) and, given ``out_dir``, writes its results folder in the one
layout of :mod:`clip_heads.results` (``report.txt``, ``metrics.json``, ``per_class.csv``,
``confusion_matrix.csv``, ``predictions.csv``):

* :func:`run_zero_shot` - ``clip-heads zero-shot STORE``
* :func:`train_head` - ``clip-heads train-head HEAD STORE --out DIR [--cv K] [--eval-store B]``
* :func:`evaluate_head` - ``clip-heads evaluate HEAD_DIR STORE``

Prompt ablation (``clip-heads ablate-prompts``) is in :mod:`clip_heads.ablation` and top-k
retrieval in :mod:`clip_heads.retrieval`; both build on this module's prompt helpers and
:class:`Report`. Folds and k-fold CV live in :mod:`clip_heads.crossval`.

**One decision rule per evaluation.** When a label map merges several head classes into one
evaluation class (FI's four positive emotions -> Emotion6 ``joy``), the head's probabilities
are summed over the classes each evaluation class merges, the prediction is the class with
the largest sum, and every metric of the run (the tables, accuracy, top-k, the soft-label
agreement and KL) is computed from those same summed probabilities. Without merging this is
the head's own most probable class. The report states the rule.

**Resubstitution.** A head records the fingerprint of the store it was trained on
(:func:`clip_heads.results.store_fingerprint`); scoring it on a store with the same data is
labelled resubstitution (optimistic), as train-head labels its own training-data report.
"""
from __future__ import annotations

import inspect
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import numpy as np

from clip_heads.datasets import EMOTION6_DISTRIBUTION  # columns of stores written before they were recorded
from clip_heads.crossval import CVResult, cross_validate, write_folds
from clip_heads.label_maps import LabelMapSpec, align_labels, load_label_map, norm
from clip_heads.metrics import (
    classification_report,
    format_soft_labels,
    format_table,
    soft_label_report,
)
from clip_heads.results import data_record, describe_data, results_dir, write_section, write_summary
from clip_heads.store import PromptSet, l2_normalize, open_store

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
LOGIT_SCALE = 100.0  # CLIP's learned temperature: turns zero-shot cosines into probabilities
SOFT_LABELS = "emotion_distribution"


@dataclass
class Report:
    """What an entry point returns: ``text`` is what it prints, ``metrics`` what metrics.json
    holds, ``predictions`` the columns of predictions.csv (``key, label, prediction``)."""

    kind: str
    text: str
    metrics: dict[str, Any]
    out_dir: Path | None = None
    cv: "CVResult | None" = None
    predictions: dict[str, list] | None = None

    def __str__(self) -> str:
        return self.text

    @property
    def rows(self) -> list[dict]:
        """The ranked rows of an ablation (empty for other reports)."""
        return list(self.metrics.get("rows", []))

    def summary(self) -> dict[str, Any]:
        """Headline numbers: accuracy, macro-/weighted-F1 (``*_std`` too for CV) per section."""
        def head(r: dict) -> dict[str, float]:
            return {"accuracy": r["accuracy"], "macro_f1": r["macro"]["f1"], "weighted_f1": r["weighted"]["f1"]}

        m = self.metrics
        if self.kind == "ablation":
            return dict(m["rows"][0]) if m.get("rows") else {}
        if self.kind != "train":
            return head(m)
        out: dict[str, Any] = {}
        if "cv" in m:
            out["cv"] = dict(head(m["cv"]["mean"]), **{f"{k}_std": v for k, v in head(m["cv"]["std"]).items()})
        for sec in ("eval", "train"):
            if sec in m:
                out[sec] = head(m[sec])
        return out


# ---------------------------------------------------------------------------------------
# Zero-shot: prompt vectors against image vectors
# ---------------------------------------------------------------------------------------
def resolve_templates(ps: PromptSet, templates: Any) -> list[int] | None:
    """Template ids from ids, id strings (``"0,3"``), or exact template texts; None = all."""
    if templates is None or (isinstance(templates, (list, tuple)) and not templates):
        return None
    items = [templates] if isinstance(templates, (str, int)) else list(templates)
    if len(items) == 1 and isinstance(items[0], str) and items[0] not in ps.templates \
            and all(p.strip().isdigit() for p in items[0].split(",")):
        items = items[0].split(",")
    ids = []
    for t in items:
        i = ps.templates.index(t) if t in ps.templates else int(t) if str(t).strip().isdigit() else -1
        if not 0 <= i < len(ps.templates):
            listing = "; ".join(f"{j}: {tpl}" for j, tpl in enumerate(ps.templates))
            raise ValueError(f"prompt set {ps.name!r} has no template {t!r}; its templates are {listing}")
        ids.append(i)
    return ids


def prompt_columns(ps: PromptSet, classes: Sequence[str]) -> list[int]:
    """Index in ``ps.classes`` of every class, matched by name; names any class without a prompt."""
    idx = {norm(c): i for i, c in enumerate(ps.classes)}
    missing = [c for c in classes if norm(c) not in idx]
    if missing:
        raise ValueError(f"prompt set {ps.name!r} has no prompt for store classes {missing}; its classes are "
                         f"{ps.classes} (add prompts for them, or pass a label map)")
    return [idx[norm(c)] for c in classes]


def _softmax(S: np.ndarray) -> np.ndarray:
    Z = np.exp(S - S.max(1, keepdims=True))
    return Z / Z.sum(1, keepdims=True)


# ---------------------------------------------------------------------------------------
# Scoring predictions against a store's labels (through a label map when the sets differ)
# ---------------------------------------------------------------------------------------
@dataclass
class _Data:
    path: Path
    X: np.ndarray
    y: np.ndarray
    classes: list[str]
    keys: list[str]
    backbone: dict
    soft: tuple[np.ndarray, list[str]] | None  # (emotion distributions, their column names)
    prompts: PromptSet | None  # the chosen (or default) prompt set
    record: dict  # results.data_record: split, n images, fingerprint

    @property
    def fingerprint(self) -> str:
        return self.record["fingerprint"]


def _load(path: PathLike, prompt_set: str | None = None) -> _Data:
    path = Path(path)
    with open_store(path) as s:
        X, y, classes = s.arrays()
        soft = None
        if SOFT_LABELS in s.extra_names():
            soft = (s.extra(SOFT_LABELS).astype(np.float64), s.extra_columns(SOFT_LABELS) or EMOTION6_DISTRIBUTION)
        prompts = s.prompt_set(prompt_set) if s.prompt_sets() or prompt_set else None
        keys = s.keys
        backbone = s.backbone()
    record = data_record(path)
    labelled = y >= 0
    if not labelled.all():  # write_store marks unlabelled rows -1: nothing to score them against
        logger.info("%s: leaving out %d unlabelled samples", path.name, int((~labelled).sum()))
        X, y, keys = X[labelled], y[labelled], [k for k, m in zip(keys, labelled) if m]
        soft = (soft[0][labelled], soft[1]) if soft is not None else None
    if not len(y):
        raise ValueError(f"store {path} has no labelled samples to evaluate")
    return _Data(path, X, y, classes, keys, backbone, soft, prompts, record)


def _prompts(d: _Data) -> PromptSet:
    if d.prompts is None:
        raise ValueError(f"store {d.path} has no prompt set (add one with `clip-heads prompts`)")
    return d.prompts


def _score(pred: np.ndarray, proba: np.ndarray | None, head_classes: Sequence[str], d: _Data,
           label_map: LabelMapSpec | None, head_desc: str) -> dict[str, Any]:
    """Report for predictions ``pred`` (indices into ``head_classes``) on store ``d``.

    With probabilities, the prediction is the argmax of the probabilities summed into the
    evaluation classes (:meth:`LabelAlignment.decision_rule`), and every metric uses that one matrix.
    """
    align = align_labels(head_classes, d.classes, label_map, head_desc=head_desc, store_desc=f"store {d.path.name}")
    y, keep = align.map_truth(d.y)
    if not keep.any():
        raise ValueError(f"no sample of {d.path} is left after mapping: every class was mapped to null")
    rule = align.decision_rule(head_classes, proba is not None)
    if proba is not None:
        P = align.map_proba(proba)[keep]
        p = P.argmax(1)
    else:
        P, p = None, align.pred[pred][keep]
    out: dict[str, Any] = classification_report(y, p, align.classes, P)
    out["alignment"] = {"mode": align.mode, "label_map": align.map_name, "head_classes": list(head_classes),
                        "store_classes": d.classes, "dropped_classes": align.dropped, "n_dropped": int((~keep).sum())}
    out["decision_rule"] = rule
    if d.soft is not None and P is not None:
        try:
            out["soft_labels"] = soft_label_report(d.soft[0][keep], P, d.soft[1], align.classes)
        except ValueError as e:
            logger.info("soft-label metrics skipped: %s", e)
    names = np.asarray(align.classes, dtype=object)
    out["_predictions"] = {"key": np.asarray(d.keys, dtype=object)[keep].tolist(), "label": names[y].tolist(),
                           "prediction": names[p].tolist()}
    return out


def _section_text(sec: dict, title: str, digits: int = 2) -> str:
    text = format_table(sec, title, digits)
    a = sec.get("alignment", {})
    if a.get("mode") == "native":
        text += f"Scored over the store's own classes via its prompt set {a['prompt_set']!r} (no label map)\n"
    if a.get("mode") in ("labels", "common"):
        text += (f"Labels mapped with {a['label_map']} ({a['mode']} mode); dropped classes "
                 f"{a['dropped_classes'] or 'none'} ({a['n_dropped']} samples)\n")
        text += sec["decision_rule"]["text"] + "\n"
    elif sec.get("decision_rule", {}).get("rule") == "mapped-prediction":
        text += sec["decision_rule"]["text"] + "\n"
    if "soft_labels" in sec:
        text += "\n" + format_soft_labels(sec["soft_labels"])
    return text


def _info_text(info: dict) -> str:
    def show(v: Any) -> str:
        if isinstance(v, dict) and "fingerprint" in v and "n_images" in v:
            return describe_data(v)
        return f"{len(v)} items: {v[0]!r}, {v[1]!r}, ..." if isinstance(v, list) and len(v) > 3 else str(v)

    return "".join(f"{k}: {show(v)}\n" for k, v in info.items() if k != "run")


def _section(sec: dict, title: str, info: dict, digits: int = 2) -> tuple[dict, str, dict]:
    """(metrics, text, predictions columns) of one scored evaluation."""
    predictions = sec.pop("_predictions")
    text = _info_text(info) + "\n" + _section_text(sec, title, digits)
    return dict(sec, info=info), text, predictions


def _map_name(label_map: LabelMapSpec | None) -> str | None:
    return None if label_map is None else load_label_map(label_map).name


# ---------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------
def run_zero_shot(store_path: PathLike, prompt_set: str | None = None, templates: Any = None,
                  out_dir: PathLike | None = None, label_map: LabelMapSpec | None = None, top_k: int = 0,
                  overwrite: bool = False) -> Report:
    """Zero-shot CLIP: each image gets the class whose prompt vector is nearest in cosine.

    Parameters
    ----------
    prompt_set : name of a prompt set in the store (default: the store's default set).
    templates : template ids, ``"0,3"`` or template texts; default all (their ensemble).
    label_map : when the prompt set's classes differ from the store's (FI prompts on an
        Emotion6 store): built-in name, JSON path or dict (see :mod:`clip_heads.label_maps`).
        Without one, prompts are matched to the store's classes by name.
    top_k : also write the ``top_k`` images nearest each class prompt (:func:`clip_heads.retrieval.top_k_images`).
    overwrite : replace an ``out_dir`` holding the results of another run (see :mod:`clip_heads.results`).

    Writes the results layout to ``out_dir`` (+ ``top_k.json``/``top_k.png`` with ``top_k``).
    """
    d = _load(store_path, prompt_set)
    ps = _prompts(d)
    tids = resolve_templates(ps, templates)
    V = ps.class_vectors(tids)
    head_classes = ps.classes
    if label_map is None:  # score the store's own label set only, whatever else the set has
        cols = prompt_columns(ps, d.classes)
        V, head_classes = V[cols], d.classes
    S = l2_normalize(d.X) @ V.T
    sec = _score(S.argmax(1), _softmax(LOGIT_SCALE * S), head_classes, d, label_map, f"prompt set {ps.name!r}")
    used = ps.templates if tids is None else [ps.templates[i] for i in tids]
    run = {"command": "zero-shot", "store": os.path.abspath(d.path), "prompt_set": ps.name,
           "templates": None if tids is None else list(tids), "label_map": _map_name(label_map)}
    info = {"store": str(d.path), "model_id": d.backbone["model_id"], "prompt_set": ps.name, "templates": used,
            "data": d.record, "run": run}
    metrics, text, predictions = _section(sec, "Zero-shot classification", info)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        with results_dir(out, run, overwrite) as stage:
            write_section(stage, metrics, text, predictions)
            if top_k:
                from clip_heads.retrieval import top_k_images  # here, not at the top: retrieval imports this module

                top_k_images(store_path, k=top_k, prompt_set=ps.name, templates=tids, out_dir=stage)
    return Report("zero-shot", text, metrics, out, predictions=predictions)


def _head_factory(head_cls: type, params: dict | None, seed: int, prompts: PromptSet | None,
                  classes: list[str]) -> Callable[[], Any]:
    params = dict(params or {})
    sig = inspect.signature(head_cls.__init__).parameters
    if "random_state" in sig:
        params.setdefault("random_state", seed)
    if "prompt_embeds" in sig and params.get("prompt_embeds") is None:
        if prompts is None:
            raise ValueError(f"head {getattr(head_cls, 'name', head_cls.__name__)!r} needs class prompts, "
                             f"but the store has no prompt set (add one with `clip-heads prompts`)")
        V = prompts.class_vectors()[prompt_columns(prompts, classes)]
        params["prompt_embeds"] = {c: v for c, v in zip(classes, V)}  # by name: no row-order ambiguity
    return lambda: head_cls(**params)


def _predict(head: Any, X: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """(predicted indices into the head's classes, probabilities or None, class names)."""
    names = [str(c) for c in head.classes_]
    if hasattr(head, "predict_proba"):
        P = np.asarray(head.predict_proba(X))
        return P.argmax(1), P, names
    index = {c: i for i, c in enumerate(head.classes_)}
    return np.array([index[v] for v in head.predict(X)]), None, names


def _score_head(head: Any, d: _Data, label_map: LabelMapSpec | None, desc: str) -> dict:
    """Score a fitted head on store ``d``: same classes, through a label map, or natively via
    the store's own prompts for a text-side head (one with ``with_prompts``)."""
    head_names = {norm(c) for c in head.classes_}
    native = None
    if label_map is None and not all(norm(c) in head_names for c in d.classes) and hasattr(head, "with_prompts"):
        native = _prompts(d)
        V = native.class_vectors()[prompt_columns(native, d.classes)]
        head = head.with_prompts({c: v for c, v in zip(d.classes, V)}, classes=d.classes)
        logger.info("no label map: scoring %s over the classes of %s via its prompt set %r",
                    desc, d.path.name, native.name)
    pred, P, names = _predict(head, d.X)
    sec = _score(pred, P, names, d, label_map, desc)
    if native is not None:
        sec["alignment"].update(mode="native", prompt_set=native.name)
    return sec


def _check_backbone(head: Any, d: _Data, what: str) -> None:
    try:
        head.check_backbone(**d.backbone)
    except ValueError as e:
        raise ValueError(f"{what} cannot score store {d.path}: {e}") from e


def train_head(head_name: str, store_path: PathLike, out_dir: PathLike, cv: int | None = None, seed: int = 0,
               eval_store: PathLike | None = None, label_map: LabelMapSpec | None = None,
               head_params: dict | None = None, prompt_set: str | None = None, progress: bool = True) -> Report:
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

    Writes to ``out_dir``: the head (``config.json``, ``model.safetensors``), ``report.txt``
    and ``metrics.json`` (all sections), and one folder per section in the results layout:
    ``cv/`` (+ ``folds.csv``; out-of-fold ``predictions.csv`` with 1-based fold numbers),
    ``eval/`` or ``train/``. The folder is swapped in whole at the end; other files a user
    keeps there survive, the previous run's sections do not.
    """
    from clip_heads.heads import get_head

    if label_map is not None and eval_store is None:
        raise ValueError("a label map applies to an eval store: pass eval_store too "
                         "(the training store's own labels need none)")
    head_cls = get_head(head_name)
    d = _load(store_path, prompt_set)
    e = _load(eval_store) if eval_store is not None else None  # a bad eval store fails before training
    names = np.asarray(d.classes)[d.y]
    make = _head_factory(head_cls, head_params, seed, d.prompts, d.classes)
    out = Path(out_dir)
    run = {"command": "train-head", "head": head_name, "store": os.path.abspath(d.path), "cv": cv, "seed": seed,
           "eval_store": os.path.abspath(e.path) if e is not None else None, "label_map": _map_name(label_map),
           "prompt_set": prompt_set, "head_params": {k: v for k, v in (head_params or {}).items() if k != "prompt_embeds"}}
    info = {"head": head_name, "store": str(d.path), "model_id": d.backbone["model_id"], "seed": seed,
            "head_params": run["head_params"], "data": d.record, "run": run}
    texts, metrics, result, sections = [], {"info": info}, None, {}
    if cv:
        result = cross_validate(make, d.X, names, k=cv, seed=seed, classes=d.classes, progress=progress)
        report = result.report
        title = f"{result.k}-fold cross-validation of the {head_name} head on {d.path.name}"
        text = format_table(report, title)
        if d.soft is not None and result.y_score is not None:
            try:
                report["soft_labels"] = dict(soft_label_report(d.soft[0], result.y_score, d.soft[1], d.classes),
                                             computed="out of fold")
                text += ("\nOut of fold: each image's probabilities come from the fold model that did not see it\n"
                         + format_soft_labels(report["soft_labels"]))
            except ValueError as err:
                logger.info("soft-label metrics skipped: %s", err)
        oof = {"key": list(d.keys), "label": names.tolist(), "prediction": np.asarray(d.classes)[result.y_pred].tolist(),
               "fold": (result.folds + 1).tolist()}
        sections["cv"] = (report, text, oof)
        metrics["cv"], texts = report, [text]
    head = make().fit(d.X, names)
    head.set_backbone(**d.backbone)
    head.set_training_data(str(d.path), d.fingerprint)
    if e is not None:
        _check_backbone(head, e, f"the {head_name} head trained on {d.path}")
        resub = e.fingerprint == d.fingerprint
        sec = _score_head(head, e, label_map, f"{head_name} head trained on {d.path.name}")
        title = (f"The {head_name} head trained on {d.path.name}, evaluated on {e.path.name}"
                 + (" (resubstitution: the same data as its training store; optimistic)" if resub else ""))
        m, text, preds = _section(sec, title, {"eval_store": str(e.path), "trained_on": str(d.path),
                                               "resubstitution": resub, "data": e.record})
        sections["eval"] = (m, text, preds)
        metrics["eval"] = m
        texts.append(text)
    elif not cv:
        sec = _score_head(head, d, None, f"{head_name} head")
        m, text, preds = _section(sec, f"The {head_name} head on its own training data "
                                  f"(resubstitution: optimistic)", {"store": str(d.path), "resubstitution": True,
                                                                     "data": d.record})
        sections["train"] = (m, text, preds)
        metrics["train"] = m
        texts.append(text)
    text = _info_text(dict(info, saved_to=str(out))) + "\n" + "\n".join(texts)
    # Retraining into a folder replaces the head and every section of the previous run, and
    # keeps whatever else the user put there.
    with results_dir(out, run, overwrite=True, keep_existing=True) as stage:
        for stale in ("cv", "eval", "train", "report.txt", "metrics.json", "predictions.csv"):
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
    return Report("train", text, metrics, out, result)


def evaluate_head(head_dir: PathLike, store_path: PathLike, out_dir: PathLike | None = None,
                  label_map: LabelMapSpec | None = None, prompt_set: str | None = None,
                  overwrite: bool = False) -> Report:
    """Score a saved head on a store, after checking both come from the same CLIP.

    Class sets are met as in :func:`train_head`'s ``eval_store``. Emotion6-style stores with an
    ``emotion_distribution`` extra also get soft-label metrics. A store holding the data the
    head was trained on (same fingerprint) is reported as resubstitution, with a warning.
    Writes the results layout to ``out_dir``; a folder holding another run's results is not
    replaced unless ``overwrite``.
    """
    from clip_heads.heads.base import Head

    head = Head.from_pretrained(head_dir)
    d = _load(store_path, prompt_set)
    _check_backbone(head, d, f"head {head_dir}")
    trained = getattr(head, "training_data_", None) or {}
    resub = bool(trained) and trained.get("fingerprint") == d.fingerprint
    if resub:
        logger.warning("head %s was trained on this data (store %s, same fingerprint): the scores are "
                       "resubstitution and optimistic", head_dir, trained.get("store"))
    sec = _score_head(head, d, label_map, f"head {Path(head_dir).name!r}")
    run = {"command": "evaluate", "head_dir": os.path.abspath(head_dir), "store": os.path.abspath(d.path),
           "label_map": _map_name(label_map), "prompt_set": prompt_set}
    info = {"head_dir": str(head_dir), "head": getattr(head, "name", type(head).__name__), "store": str(d.path),
            "model_id": d.backbone["model_id"], "trained_on": trained.get("store", "unknown (not recorded)"),
            "resubstitution": resub, "data": d.record, "run": run}
    title = f"Head {Path(head_dir).name} on {d.path.name}"
    if resub:
        title += " (resubstitution: the head was trained on this data; optimistic)"
    metrics, text, predictions = _section(sec, title, info)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        with results_dir(out, run, overwrite) as stage:
            write_section(stage, metrics, text, predictions)
    return Report("evaluate", text, metrics, out, predictions=predictions)
