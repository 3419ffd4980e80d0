"""Evaluation on feature stores: zero-shot, stratified CV, cross-dataset scoring.

Three entry points, one per CLI command; each is one call that returns a :class:`Report` (its
``text`` is the printed table) and, given ``out_dir``, writes ``metrics.json``, CSVs and
``report.txt`` there:

* :func:`run_zero_shot` - ``clip-heads zero-shot STORE``
* :func:`train_head` - ``clip-heads train-head HEAD STORE --out DIR [--cv K] [--eval-store B]``
* :func:`evaluate_head` - ``clip-heads evaluate HEAD_DIR STORE``

Prompt ablation (``clip-heads ablate-prompts``) is in :mod:`clip_heads.ablation` and top-k
retrieval in :mod:`clip_heads.retrieval`; both build on this module's prompt helpers and
:class:`Report`.

Folds and k-fold CV live in :mod:`clip_heads.crossval`; ``train_head(cv=K)`` uses them and
saves the folds per key.
"""
from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import numpy as np

from clip_heads.datasets import EMOTION6_DISTRIBUTION  # columns of stores written before they were recorded
from clip_heads.crossval import CVResult, cross_validate, write_folds
from clip_heads.label_maps import LabelMapSpec, align_labels, norm
from clip_heads.metrics import (
    classification_report,
    format_soft_labels,
    format_table,
    json_default,
    soft_label_report,
    write_report,
)
from clip_heads.store import PromptSet, l2_normalize, open_store

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
LOGIT_SCALE = 100.0  # CLIP's learned temperature: turns zero-shot cosines into probabilities
SOFT_LABELS = "emotion_distribution"


@dataclass
class Report:
    """What an entry point returns: ``text`` is what it prints, ``metrics`` what metrics.json holds."""

    kind: str
    text: str
    metrics: dict[str, Any]
    out_dir: Path | None = None
    cv: "CVResult | None" = None

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
    labelled = y >= 0
    if not labelled.all():  # write_store marks unlabelled rows -1: nothing to score them against
        logger.info("%s: leaving out %d unlabelled samples", path.name, int((~labelled).sum()))
        X, y, keys = X[labelled], y[labelled], [k for k, m in zip(keys, labelled) if m]
        soft = (soft[0][labelled], soft[1]) if soft is not None else None
    if not len(y):
        raise ValueError(f"store {path} has no labelled samples to evaluate")
    return _Data(path, X, y, classes, keys, backbone, soft, prompts)


def _prompts(d: _Data) -> PromptSet:
    if d.prompts is None:
        raise ValueError(f"store {d.path} has no prompt set (add one with `clip-heads prompts`)")
    return d.prompts


def _score(pred: np.ndarray, proba: np.ndarray | None, head_classes: Sequence[str], d: _Data,
           label_map: LabelMapSpec | None, head_desc: str) -> dict[str, Any]:
    """Report for predictions ``pred`` (indices into ``head_classes``) on store ``d``."""
    align = align_labels(head_classes, d.classes, label_map, head_desc=head_desc, store_desc=f"store {d.path.name}")
    y, keep = align.map_truth(d.y)
    if not keep.any():
        raise ValueError(f"no sample of {d.path} is left after mapping: every class was mapped to null")
    p = align.pred[pred][keep]
    P = align.map_proba(proba)[keep] if proba is not None else None
    out: dict[str, Any] = classification_report(y, p, align.classes, P)
    out["alignment"] = {"mode": align.mode, "label_map": align.map_name, "head_classes": list(head_classes),
                        "store_classes": d.classes, "dropped_classes": align.dropped, "n_dropped": int((~keep).sum())}
    if d.soft is not None and P is not None:
        try:
            out["soft_labels"] = soft_label_report(d.soft[0][keep], P, d.soft[1], align.classes)
        except ValueError as e:
            logger.info("soft-label metrics skipped: %s", e)
    names = np.asarray(align.classes, dtype=object)
    out["_predictions"] = (np.asarray(d.keys, dtype=object)[keep], names[y], names[p])
    return out


def _section_text(sec: dict, title: str, digits: int = 2) -> str:
    text = format_table(sec, title, digits)
    a = sec.get("alignment", {})
    if a.get("mode") == "native":
        text += f"Scored over the store's own classes via its prompt set {a['prompt_set']!r} (no label map)\n"
    if a.get("mode") in ("labels", "common"):
        text += (f"Labels mapped with {a['label_map']} ({a['mode']} mode); dropped classes "
                 f"{a['dropped_classes'] or 'none'} ({a['n_dropped']} samples)\n")
    if "soft_labels" in sec:
        text += "\n" + format_soft_labels(sec["soft_labels"])
    return text


def _info_text(info: dict) -> str:
    def show(v: Any) -> str:
        return f"{len(v)} items: {v[0]!r}, {v[1]!r}, ..." if isinstance(v, list) and len(v) > 3 else str(v)

    return "".join(f"{k}: {show(v)}\n" for k, v in info.items())


def _write_section(sec: dict, out: Path | None, title: str, info: dict, digits: int = 2) -> tuple[dict, str]:
    """Write one evaluation (report + predictions.csv) to ``out``; return its metrics and text."""
    keys, true, pred = sec.pop("_predictions")
    text = _info_text(info) + "\n" + _section_text(sec, title, digits)
    metrics = dict(sec, info=info)
    if out is not None:
        write_report(metrics, out, text=text)
        with open(out / "predictions.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["key", "label", "prediction"])
            w.writerows(zip(keys, true, pred))
    return metrics, text


# ---------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------
def run_zero_shot(store_path: PathLike, prompt_set: str | None = None, templates: Any = None,
                  out_dir: PathLike | None = None, label_map: LabelMapSpec | None = None, top_k: int = 0) -> Report:
    """Zero-shot CLIP: each image gets the class whose prompt vector is nearest in cosine.

    Parameters
    ----------
    prompt_set : name of a prompt set in the store (default: the store's default set).
    templates : template ids, ``"0,3"`` or template texts; default all (their ensemble).
    label_map : when the prompt set's classes differ from the store's (FI prompts on an
        Emotion6 store): built-in name, JSON path or dict (see :mod:`clip_heads.label_maps`).
        Without one, prompts are matched to the store's classes by name.
    top_k : also write the ``top_k`` images nearest each class prompt (:func:`clip_heads.retrieval.top_k_images`).

    Writes ``metrics.json, per_class.csv, confusion_matrix.csv, predictions.csv, report.txt``.
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
    info = {"store": str(d.path), "model_id": d.backbone["model_id"], "prompt_set": ps.name, "templates": used}
    out = Path(out_dir) if out_dir is not None else None
    metrics, text = _write_section(sec, out, "Zero-shot classification", info)
    if out is not None and top_k:
        from clip_heads.retrieval import top_k_images  # here, not at the top: retrieval imports this module

        top_k_images(store_path, k=top_k, prompt_set=ps.name, templates=tids, out_dir=out)
    return Report("zero-shot", text, metrics, out)


def _head_factory(head_cls: type, params: dict | None, seed: int, prompts: PromptSet | None,
                  classes: list[str]) -> Callable[[], Any]:
    from clip_heads.heads import make_head

    params = dict(params or {})
    make_head(head_cls.name, params)  # a bad parameter fails now, before any fold is trained
    params.setdefault("random_state", seed)  # every head takes one
    if head_cls.uses_prompts and params.get("prompt_embeds") is None:
        if prompts is None:
            raise ValueError(f"head {getattr(head_cls, 'name', head_cls.__name__)!r} needs class prompts, "
                             f"but the store has no prompt set (add one with `clip-heads prompts`)")
        V = prompts.class_vectors()[prompt_columns(prompts, classes)]
        params["prompt_embeds"] = {c: v for c, v in zip(classes, V)}  # by name: no row-order ambiguity
    return lambda: make_head(head_cls.name, params)


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
    if label_map is None and not all(norm(c) in head_names for c in d.classes) and head.can_requery:
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
    :func:`stratified_folds(labels, K, seed)`) runs first; then a final head is fitted on all
    of the store and saved with ``save_pretrained(out_dir)`` after ``set_backbone``. With
    ``eval_store``, the final head is scored there: same class names directly, else through
    ``label_map``, else (zero-shot/contrastive heads) natively over the other store's prompts.
    Without either, the report is on the training data itself (resubstitution, optimistic).

    Writes to ``out_dir``: the head (``config.json``, ``model.safetensors``), ``report.txt``
    and ``metrics.json`` (all sections), and one folder per section: ``cv/`` (+ ``folds.csv``,
    out-of-fold ``predictions.csv``), ``eval/`` or ``train/``, each with the files of
    :func:`metrics.write_report`.
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
    out.mkdir(parents=True, exist_ok=True)
    info = {"head": head_name, "store": str(d.path), "model_id": d.backbone["model_id"], "seed": seed,
            "head_params": {k: v for k, v in (head_params or {}).items() if k != "prompt_embeds"}}
    texts, metrics, result = [], {"info": info}, None
    if cv:
        result = cross_validate(make, d.X, names, k=cv, seed=seed, classes=d.classes, progress=progress)
        title = f"{result.k}-fold cross-validation of the {head_name} head on {d.path.name}"
        text = format_table(result.report, title)
        write_report(result.report, out / "cv", text=text)
        write_folds(out / "cv" / "folds.csv", d.keys, names, result.folds)
        with open(out / "cv" / "predictions.csv", "w", newline="") as f:
            csv.writer(f).writerows([("key", "label", "prediction", "fold"),
                                     *zip(d.keys, names, np.asarray(d.classes)[result.y_pred], result.folds.tolist())])
        metrics["cv"], texts = result.report, [text]
    head = make().fit(d.X, names)
    head.set_backbone(**d.backbone)
    head.save_pretrained(out)
    if e is not None:
        _check_backbone(head, e, f"the {head_name} head trained on {d.path}")
        sec = _score_head(head, e, label_map, f"{head_name} head trained on {d.path.name}")
        m, text = _write_section(sec, out / "eval", f"The {head_name} head trained on {d.path.name}, "
                                 f"evaluated on {e.path.name}", {"eval_store": str(e.path), "trained_on": str(d.path)})
        metrics["eval"] = m
        texts.append(text)
    elif not cv:
        sec = _score_head(head, d, None, f"{head_name} head")
        m, text = _write_section(sec, out / "train", f"The {head_name} head on its own training data "
                                 f"(resubstitution: optimistic)", {"store": str(d.path)})
        metrics["train"] = m
        texts.append(text)
    text = _info_text(dict(info, saved_to=str(out))) + "\n" + "\n".join(texts)
    (out / "report.txt").write_text(text)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=json_default))
    return Report("train", text, metrics, out, result)


def evaluate_head(head_dir: PathLike, store_path: PathLike, out_dir: PathLike | None = None,
                  label_map: LabelMapSpec | None = None, prompt_set: str | None = None) -> Report:
    """Score a saved head on a store, after checking both come from the same CLIP.

    Class sets are met as in :func:`train_head`'s ``eval_store``. Emotion6-style stores with an
    ``emotion_distribution`` extra also get soft-label metrics. Writes ``metrics.json,
    per_class.csv, confusion_matrix.csv, predictions.csv, report.txt``.
    """
    from clip_heads.heads.base import Head

    head = Head.from_pretrained(head_dir)
    d = _load(store_path, prompt_set)
    _check_backbone(head, d, f"head {head_dir}")
    sec = _score_head(head, d, label_map, f"head {Path(head_dir).name!r}")
    info = {"head_dir": str(head_dir), "head": getattr(head, "name", type(head).__name__), "store": str(d.path),
            "model_id": d.backbone["model_id"]}
    out = Path(out_dir) if out_dir is not None else None
    metrics, text = _write_section(sec, out, f"Head {Path(head_dir).name} on {d.path.name}", info)
    return Report("evaluate", text, metrics, out)
