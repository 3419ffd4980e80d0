"""Scoring predictions against a store's labels: what every evaluation command shares.

* :func:`load_eval_data` reads a store once into :class:`EvalData`: vectors, labels, keys,
  the backbone a head must match, soft labels, the chosen prompt set, the store's zero-shot
  :class:`~clip_heads.zeroshot.ScoringRule`, and the record of the data (:func:`clip_heads.results.data_record`).
* :func:`score_predictions` scores a head's (or zero-shot's) predictions on it, through a label
  map where the class sets differ, under **one decision rule per evaluation**: when a map
  merges several head classes into one evaluation class (FI's four positive emotions ->
  Emotion6 ``joy``), the probabilities are summed over the classes each evaluation class
  merges, the prediction is the largest sum, and every metric (the tables, accuracy, top-k, the
  soft-label agreement and KL) uses those same sums. Without merging this is the head's own
  most probable class. The report states the rule.
* :func:`section` / :func:`section_text` / :func:`info_text`: the printed text of a scored section.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from clip_heads import zeroshot
from clip_heads.calibration import calibration_of, format_calibration
from clip_heads.datasets import EMOTION6_DISTRIBUTION  # columns of stores written before they were recorded
from clip_heads.label_maps import LabelMapSpec, align_labels, load_label_map
from clip_heads.metrics import classification_report, soft_label_metrics
from clip_heads.results import PROBA, PathLike, data_record, describe_data
from clip_heads.errors import BadValueError
from clip_heads.store import PRE_VIEWS, VIEWS, PromptSet, open_store
from clip_heads.tables import format_soft_labels, format_table

logger = logging.getLogger(__name__)

__all__ = ["SOFT_LABELS", "EvalData", "load_eval_data", "load_views", "VIEWS_COLUMN", "PRE_VIEWS_COLUMN", "require_prompts", "score_predictions", "section",
           "section_text", "info_text", "label_map_name"]

SOFT_LABELS = "emotion_distribution"


@dataclass
class EvalData:
    """A store's labelled rows, read once for an evaluation."""

    path: Path
    X: np.ndarray  # (n_labelled, dim)
    y: np.ndarray  # (n_labelled,) index into classes
    classes: list[str]
    keys: list[str]
    backbone: dict  # what a head checks (FeatureStore.backbone)
    soft: tuple[np.ndarray, list[str]] | None  # (emotion distributions, their column names)
    prompts: PromptSet | None  # the chosen (or default) prompt set
    record: dict  # results.data_record: split, n images, fingerprint
    scoring: zeroshot.ScoringRule  # how this store's model scores zero-shot

    @property
    def fingerprint(self) -> str:
        return self.record["fingerprint"]


def load_eval_data(path: PathLike, prompt_set: str | None = None) -> EvalData:
    """Read store ``path`` for an evaluation; unlabelled rows (label -1) are left out."""
    path = Path(path)
    with open_store(path) as s:
        X, y, classes = s.arrays()
        soft = None
        if SOFT_LABELS in s.extra_names():
            soft = (s.extra(SOFT_LABELS).astype(np.float64), s.extra_columns(SOFT_LABELS) or EMOTION6_DISTRIBUTION)
        prompts = s.prompt_set(prompt_set) if s.prompt_sets() or prompt_set else None
        keys = s.keys
        backbone = s.backbone()
        scoring = zeroshot.ScoringRule.from_attrs(s.attrs)
    record = data_record(path)
    labelled = y >= 0
    if not labelled.all():  # write_store marks unlabelled rows -1: nothing to score them against
        logger.info("%s: leaving out %d unlabelled samples", path.name, int((~labelled).sum()))
        X, y, keys = X[labelled], y[labelled], [k for k, m in zip(keys, labelled, strict=True) if m]
        soft = (soft[0][labelled], soft[1]) if soft is not None else None
    if not len(y):
        raise ValueError(f"store {path} has no labelled samples to evaluate")
    return EvalData(path, X, y, classes, keys, backbone, soft, prompts, record, scoring)


VIEWS_COLUMN, PRE_VIEWS_COLUMN = VIEWS, PRE_VIEWS  # the extra columns of encode --views K (clip_heads.schema)


def load_views(path: PathLike, pre_projection: bool = False, labelled_only: bool = True) -> np.ndarray:
    """The augmented views of store ``path`` as float32 ``(n, K, dim)``, row for row with its
    labelled rows (``labelled_only``, as the evaluations read them) or all rows; with
    ``pre_projection`` their pre-projection features ``(n, K, pre_dim)`` (prolip's inputs). A
    store without them is refused in one line (:data:`clip_heads.heads.views.NO_VIEWS`)."""
    from clip_heads.heads.views import NO_VIEWS

    path = Path(path)
    with open_store(path) as s:
        column = PRE_VIEWS_COLUMN if pre_projection else VIEWS_COLUMN
        if column not in s.extra_names():
            why = NO_VIEWS if not pre_projection or VIEWS_COLUMN not in s.extra_names() else (
                "use_views=true for prolip needs the views' pre-projection features, and this store has only their "
                "embeddings (encode with --views K --features projected,pre-projection)")
            raise BadValueError(f"store {path}: {why}")
        V = s.extra(column).astype(np.float32, copy=False)
        return V[s.labels >= 0] if labelled_only else V


def require_prompts(d: EvalData) -> PromptSet:
    """The store's chosen prompt set, or a one-line error saying how to add one."""
    if d.prompts is None:
        raise ValueError(f"store {d.path} has no prompt set (add one with `clip-heads prompts`)")
    return d.prompts


def score_predictions(pred: np.ndarray, proba: np.ndarray | None, head_classes: Sequence[str], d: EvalData,
                      label_map: LabelMapSpec | None, head_desc: str,
                      probabilities: str = "the head's predict_proba") -> tuple[dict[str, Any], dict[str, Any]]:
    """``(report, predictions columns)`` for predictions ``pred`` (indices into ``head_classes``)
    on store ``d``.

    With probabilities, the prediction is the argmax of the probabilities summed into the
    evaluation classes (:meth:`~clip_heads.label_maps.LabelAlignment.decision_rule`), and every
    metric uses that one matrix: the tables, top-k, soft labels, and the calibration (ECE, Brier,
    NLL: :func:`clip_heads.calibration.calibration_of`; ``probabilities`` says which they are).
    The columns are ``key, label, prediction`` by class name, and with probabilities
    ``proba`` (the ``(n, n_classes)`` matrix, one ``proba_<class>`` column each in predictions.csv).
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
    if P is not None:
        merged = " summed per evaluation class" if rule.get("merged") else ""
        cal = calibration_of(y, P, align.classes, probabilities=probabilities + merged)
        if cal is not None:
            out["calibration"] = cal
    if d.soft is not None and P is not None:
        try:
            out["soft_labels"] = soft_label_metrics(d.soft[0][keep], P, d.soft[1], align.classes)
        except ValueError as e:
            logger.info("soft-label metrics skipped: %s", e)
    names = np.asarray(align.classes, dtype=object)
    predictions: dict[str, Any] = {"key": np.asarray(d.keys, dtype=object)[keep].tolist(), "label": names[y].tolist(),
                                   "prediction": names[p].tolist()}
    if P is not None:
        predictions[PROBA] = P
    return out, predictions


def section_text(sec: dict, title: str, digits: int = 2) -> str:
    """The table of one scored evaluation, with its alignment, decision rule and soft labels."""
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
    if "calibration" in sec:
        text += "\n" + format_calibration(sec["calibration"])
    return text


def info_text(info: dict) -> str:
    """``key: value`` lines of a section's ``info`` (long lists shortened; ``run`` left out)."""
    def show(v: Any) -> str:
        if isinstance(v, dict) and "fingerprint" in v and "n_images" in v:
            return describe_data(v)
        return f"{len(v)} items: {v[0]!r}, {v[1]!r}, ..." if isinstance(v, list) and len(v) > 3 else str(v)

    return "".join(f"{k}: {show(v)}\n" for k, v in info.items() if k != "run")


def section(sec: dict, title: str, info: dict, digits: int = 2) -> tuple[dict, str]:
    """``(metrics, text)`` of one scored evaluation: the report with its ``info``, and its printed text."""
    return dict(sec, info=info), info_text(info) + "\n" + section_text(sec, title, digits)


def label_map_name(label_map: LabelMapSpec | None) -> str | None:
    """The name a run record gives a label map (a built-in's name, a file's path)."""
    return None if label_map is None else load_label_map(label_map).name
