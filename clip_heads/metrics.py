"""Classification and soft-label metrics: the numbers of every evaluation.

A *report* is a JSON-able dict (:func:`classification_report`); a *CV report* summarises the
per-fold reports as mean and std (:func:`summarize_folds`). How reports are printed (the
paper's tables) and saved (``metrics.json``, ``per_class.csv``, ``confusion_matrix.csv``,
``report.txt``) is :mod:`clip_heads.tables`.

Macro averages run over the classes that occur in the true or the predicted labels (what
scikit-learn does when no ``labels`` are given), so a class a store has no sample of (common
after mapping one dataset's labels onto another's) neither counts as a zero nor hides the
head's wrong guesses of it. Every class keeps its row in the per-class table and the
confusion matrix.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)

__all__ = ["AVERAGES", "PRF", "classification_report", "confusion_matrices", "metrics_from_confusion",
           "soft_label_report", "soft_label_breakdown", "soft_label_metrics", "defined_in_fold", "summarize_folds",
           "is_cv_report", "json_default"]

AVERAGES = ("macro", "weighted")
PRF = ("precision", "recall", "f1")


def classification_report(
    y_true: Sequence[int], y_pred: Sequence[int], classes: Sequence[str], y_score: np.ndarray | None = None
) -> dict[str, Any]:
    """Accuracy, macro/weighted precision-recall-F1, per-class metrics and the confusion matrix.

    Parameters
    ----------
    y_true, y_pred : (n_samples,) class indices into ``classes``.
    classes : class names.
    y_score : (n_samples, n_classes) scores or probabilities, optional; adds top-k accuracy.

    Returns
    -------
    dict with ``accuracy``, ``balanced_accuracy``, ``macro`` and ``weighted`` (each
    ``{precision, recall, f1}``), ``per_class`` (``{name: {precision, recall, f1, support}}``),
    ``confusion_matrix`` (rows true, columns predicted, every class), ``classes``,
    ``n_samples`` and, with ``y_score``, ``top_k_accuracy`` (``{"2": ..., "3": ...}``).
    """
    y_true, y_pred = np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)
    classes = [str(c) for c in classes]
    if y_true.shape != y_pred.shape or y_true.ndim != 1:
        raise ValueError(f"y_true and y_pred must be 1-D of one length; got {y_true.shape} and {y_pred.shape}")
    if len(y_true) == 0:
        raise ValueError("no samples to evaluate")
    C = len(classes)
    out_of_range = sorted({int(v) for v in np.concatenate([y_true, y_pred]) if not 0 <= v < C})
    if out_of_range:
        raise ValueError(f"labels {out_of_range} are out of range for {C} classes {classes}")
    labels = list(range(C))
    present = sorted(set(y_true.tolist()) | set(y_pred.tolist()))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    report: dict[str, Any] = {
        "classes": classes,
        "n_samples": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(_balanced_accuracy(y_true, y_pred)),
    }
    for avg, labs in (("macro", present), ("weighted", labels)):
        ap, ar, af, _ = precision_recall_fscore_support(y_true, y_pred, labels=labs, average=avg, zero_division=0)
        report[avg] = {"precision": float(ap), "recall": float(ar), "f1": float(af)}
    report["per_class"] = {
        c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
        for i, c in enumerate(classes)
    }
    report["confusion_matrix"] = confusion_matrix(y_true, y_pred, labels=labels).tolist()
    if y_score is not None:
        y_score = np.asarray(y_score, np.float64)
        if y_score.shape != (len(y_true), C):
            raise ValueError(f"y_score has shape {y_score.shape}; expected ({len(y_true)}, {C})")
        report["top_k_accuracy"] = {
            str(k): float(top_k_accuracy_score(y_true, y_score, k=k, labels=labels)) for k in (2, 3) if k < C
        }
    return report


def _balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    import warnings

    with warnings.catch_warnings():  # "y_pred contains classes not in y_true" is expected after mapping
        warnings.simplefilter("ignore", UserWarning)
        return balanced_accuracy_score(y_true, y_pred)


# ---------------------------------------------------------------------------------------
# Many predictions at once (prompt ablation): metrics from stacked confusion matrices
# ---------------------------------------------------------------------------------------
def confusion_matrices(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Confusion matrices ``(M, C, C)`` of ``M`` predictions ``y_pred (n_samples, M)`` at once."""
    y_true, y_pred = np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)
    M = y_pred.shape[1]
    C = n_classes
    flat = (np.arange(M) * C * C)[None, :] + (y_true * C)[:, None] + y_pred
    return np.bincount(flat.ravel(), minlength=M * C * C).reshape(M, C, C)


def metrics_from_confusion(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy and macro/weighted precision, recall, F1 from confusion matrices ``(..., C, C)``.

    Same definitions as :func:`classification_report` (zero_division=0, macro over the classes
    present in truth or prediction, F1 as ``2 tp / (n_true + n_pred)`` as scikit-learn computes
    it), vectorised over the leading axes. Each value has the leading shape.
    """
    cm = np.asarray(cm, np.float64)
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    n_true, n_pred = cm.sum(-1), cm.sum(-2)
    total = n_true.sum(-1)

    def div(a, b):
        return np.divide(a, b, out=np.zeros_like(a), where=b > 0)

    per = {"precision": div(tp, n_pred), "recall": div(tp, n_true), "f1": div(2 * tp, n_true + n_pred)}
    present = (n_true + n_pred) > 0
    out = {"accuracy": tp.sum(-1) / total}
    for k, v in per.items():
        out[f"macro_{k}"] = (v * present).sum(-1) / present.sum(-1)
        out[f"weighted_{k}"] = (v * n_true).sum(-1) / total
    return out


# ---------------------------------------------------------------------------------------
# Soft labels (emotion distributions)
# ---------------------------------------------------------------------------------------
def soft_label_report(
    P_true: np.ndarray,
    P_pred: np.ndarray,
    true_columns: Sequence[str] | None = None,
    pred_columns: Sequence[str] | None = None,
    k: int = 2,
    eps: float = 1e-6,
) -> dict[str, Any]:
    """Agreement of predicted class probabilities with voted emotion distributions.

    Columns are aligned by (case-insensitive) class name when both column lists are given, in
    the order of ``pred_columns``; both sides are then renormalised over the shared columns
    (Emotion6's ``neutral`` column, say, against a head that has no neutral class). Samples with
    no true mass on the shared columns cannot be compared and are left out (``n_dropped``).

    Returns
    -------
    dict with ``kl`` (mean KL(P_true || P_pred), natural log, after adding ``eps`` to every
    entry and renormalising), ``top1_agreement`` (the predicted argmax is a true argmax; ties
    in the votes all count), ``top{k}_agreement`` (the predicted argmax is among the true top
    ``k``, ties at the k-th value included), ``columns``, ``n_samples``, ``n_dropped``.
    """
    P_true, P_pred = np.asarray(P_true, np.float64), np.asarray(P_pred, np.float64)
    if P_true.ndim != 2 or P_pred.ndim != 2 or len(P_true) != len(P_pred):
        raise ValueError(f"P_true and P_pred must be (n, K) with the same n; got {P_true.shape} and {P_pred.shape}")
    if true_columns is not None and pred_columns is not None:
        t_idx = {str(c).strip().lower(): i for i, c in enumerate(true_columns)}
        shared = [c for c in pred_columns if str(c).strip().lower() in t_idx]
        if len(shared) < 2:
            raise ValueError(f"prediction classes {list(pred_columns)} and distribution columns {list(true_columns)} "
                             f"share fewer than 2 names; nothing to compare")
        P_true = P_true[:, [t_idx[str(c).strip().lower()] for c in shared]]
        P_pred = P_pred[:, [list(pred_columns).index(c) for c in shared]]
        columns = [str(c) for c in shared]
    else:
        if P_true.shape[1] != P_pred.shape[1]:
            raise ValueError(f"{P_true.shape[1]} true columns vs {P_pred.shape[1]} predicted: "
                             f"pass the column names to align them")
        columns = [str(c) for c in (pred_columns or true_columns or range(P_true.shape[1]))]
    keep = P_true.sum(1) > 0
    P_true, P_pred = P_true[keep], P_pred[keep]
    if not len(P_true):
        raise ValueError(f"no sample has any true mass on the shared columns {columns}")
    p = (P_true + eps) / (P_true + eps).sum(1, keepdims=True)
    q = (P_pred + eps) / (P_pred + eps).sum(1, keepdims=True)
    kl = (p * (np.log(p) - np.log(q))).sum(1)
    # Agreement on the raw (renormalised) votes: smoothing must not break ties.
    t = P_true / P_true.sum(1, keepdims=True)
    got = t[np.arange(len(t)), P_pred.argmax(1)]
    kk = min(k, t.shape[1])
    kth = -np.partition(-t, kk - 1, axis=1)[:, kk - 1]
    tol = 1e-12
    return {
        "kl": float(kl.mean()),
        "top1_agreement": float((got >= t.max(1) - tol).mean()),
        f"top{kk}_agreement": float((got >= kth - tol).mean()),
        "k": kk,
        "columns": columns,
        "n_samples": int(len(t)),
        "n_dropped": int((~keep).sum()),
        "eps": eps,
    }


def soft_label_breakdown(P_true: np.ndarray, P_pred: np.ndarray, true_columns: Sequence[str],
                         pred_columns: Sequence[str], k: int = 2) -> dict[str, Any]:
    """Predicted versus vote distributions, overall and per dominant voted class.

    Columns are aligned by name as :func:`soft_label_report` aligns them, and
    each group's numbers come from that same function, so KL and agreement mean what they mean
    in metrics.json. Returns ``columns``, ``mean_true`` and ``mean_pred`` (the average
    distributions), ``overall`` (the report on all samples) and ``per_class``: for every class
    that is the argmax of some sample's votes, ``n`` and that group's report.
    """
    P_true, P_pred = np.asarray(P_true, np.float64), np.asarray(P_pred, np.float64)
    overall = soft_label_report(P_true, P_pred, true_columns, pred_columns, k=k)
    cols = overall["columns"]
    t_idx = {str(c).strip().lower(): i for i, c in enumerate(true_columns)}
    T = P_true[:, [t_idx[c.strip().lower()] for c in cols]]
    Q = P_pred[:, [list(map(str, pred_columns)).index(c) for c in cols]]
    keep = T.sum(1) > 0
    T, Q = T[keep], Q[keep]  # as soft_label_report sees them: it smooths and renormalises itself
    dominant = T.argmax(1)
    per_class = {}
    for i, c in enumerate(cols):
        g = dominant == i
        if g.any():
            per_class[c] = dict(soft_label_report(T[g], Q[g], k=k), n=int(g.sum()))
    mean_true = (T / T.sum(1, keepdims=True)).mean(0)
    mean_pred = (Q / np.maximum(Q.sum(1, keepdims=True), 1e-300)).mean(0)
    return {"columns": cols, "mean_true": mean_true.tolist(), "mean_pred": mean_pred.tolist(),
            "overall": overall, "per_class": per_class, "k": overall["k"]}


def soft_label_metrics(P_true: np.ndarray, P_pred: np.ndarray, true_columns: Sequence[str],
                       pred_columns: Sequence[str], k: int = 2) -> dict[str, Any]:
    """What metrics.json keeps of soft labels: :func:`soft_label_report` on all samples, plus
    ``mean_true`` / ``mean_pred`` (the average vote and predicted distributions over
    ``columns``) and ``by_dominant_class`` (per class that is some image's top vote: ``n``,
    ``kl``, ``top1_agreement``, ``top{k}_agreement``), the numbers of the soft-label figure."""
    b = soft_label_breakdown(P_true, P_pred, true_columns, pred_columns, k=k)
    kk = b["k"]
    keep = ("n", "kl", "top1_agreement", f"top{kk}_agreement")
    return dict(b["overall"], mean_true=b["mean_true"], mean_pred=b["mean_pred"],
                by_dominant_class={c: {key: r[key] for key in keep} for c, r in b["per_class"].items()})


# ---------------------------------------------------------------------------------------
# Cross-validation summaries
# ---------------------------------------------------------------------------------------
def defined_in_fold(report: dict, cls: str) -> dict[str, bool]:
    """Which of a class's metrics a single (fold) report defines.

    Precision is defined where the class was predicted at least once, recall where it has test
    samples, and F1 (``2 TP / (support + predicted)``, scikit-learn's formula) where either
    holds. A report without a confusion matrix is taken as defining all three.
    """
    i = report["classes"].index(cls)
    support = report["per_class"][cls]["support"]
    cm = report.get("confusion_matrix")
    predicted = int(np.asarray(cm)[:, i].sum()) if cm is not None else 1
    return {"precision": predicted > 0, "recall": support > 0, "f1": support + predicted > 0}


def summarize_folds(fold_reports: Sequence[dict], pooled: dict | None = None) -> dict[str, Any]:
    """Mean and std (over folds, ``ddof=0`` as scikit-learn's ``cv_results_``) of per-fold reports.

    Returns ``{"kind": "cv", "k", "classes", "n_samples", "mean": report, "std": report,
    "folds": [...], "pooled": report}`` where ``mean``/``std`` have the shape of a report
    (supports are summed over folds in both) and ``pooled`` is the report of the out-of-fold
    predictions taken together (its confusion matrix is the sum of the folds').

    Accuracy and the macro/weighted averages are defined in every fold and averaged over all
    of them. A per-class metric is averaged only over the folds that define it
    (:func:`defined_in_fold`): a fold where a class has no test sample says nothing about its
    recall, and counting it as 0 (scikit-learn's ``zero_division=0``) would bias the mean down
    whenever a class is smaller than k. ``mean["per_class"][c]["n_folds"]`` counts those folds
    per metric; a metric no fold defines is ``None``. Each entry of ``folds`` carries its
    1-based ``fold`` number.
    """
    if not fold_reports:
        raise ValueError("no fold reports to summarise")
    classes = fold_reports[0]["classes"]
    defined = [{c: defined_in_fold(r, c) for c in classes} for r in fold_reports]

    def agg(fn) -> dict[str, Any]:
        out: dict[str, Any] = {"classes": classes, "n_samples": int(sum(r["n_samples"] for r in fold_reports))}
        for key in ("accuracy", "balanced_accuracy"):
            out[key] = float(fn([r[key] for r in fold_reports]))
        for avg in AVERAGES:
            out[avg] = {m: float(fn([r[avg][m] for r in fold_reports])) for m in PRF}
        out["per_class"] = {}
        for c in classes:
            row: dict[str, Any] = {}
            for m in PRF:
                vals = [r["per_class"][c][m] for r, d in zip(fold_reports, defined, strict=True) if d[c][m]]
                row[m] = float(fn(vals)) if vals else None
            row["support"] = int(sum(r["per_class"][c]["support"] for r in fold_reports))
            row["n_folds"] = {m: int(sum(d[c][m] for d in defined)) for m in PRF}
            out["per_class"][c] = row
        if all("top_k_accuracy" in r for r in fold_reports):
            out["top_k_accuracy"] = {k: float(fn([r["top_k_accuracy"][k] for r in fold_reports]))
                                     for k in fold_reports[0]["top_k_accuracy"]}
        return out

    summary = {"kind": "cv", "k": len(fold_reports), "classes": classes,
               "n_samples": int(sum(r["n_samples"] for r in fold_reports)),
               "mean": agg(np.mean), "std": agg(np.std),
               "folds": [dict(r, fold=i + 1) for i, r in enumerate(fold_reports)]}
    if pooled is not None:
        summary["pooled"] = pooled
    return summary


def is_cv_report(report: dict) -> bool:
    """Whether ``report`` is a CV report (:func:`summarize_folds`) rather than a single one."""
    return report.get("kind") == "cv"


def json_default(o: Any) -> Any:
    """``json.dumps`` fallback: numpy values and paths as plain JSON."""
    if isinstance(o, (np.ndarray, np.generic)):
        return o.tolist()
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")
