"""The report tables of Bondielli & Passaro (2021), and the files a report is saved as.

:func:`format_table` prints a report or a CV report (:mod:`clip_heads.metrics`) in the paper's
layout (rows per class, then Macro Avg., Weighted Avg., Accuracy); :func:`write_report` saves
``metrics.json``, ``per_class.csv``, ``confusion_matrix.csv`` and ``report.txt``.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from clip_heads.metrics import PRF, is_cv_report, json_default

__all__ = ["format_table", "format_soft_labels", "write_report", "read_confusion_csv"]


# ---------------------------------------------------------------------------------------
# Tables and files
# ---------------------------------------------------------------------------------------
def format_table(report: dict, title: str = "", digits: int = 2) -> str:
    """The paper's table: one row per class, then Macro Avg., Weighted Avg. and Accuracy.

    Columns Precision, Recall, F1-Score, Support; ``digits`` decimals (2 as in the paper). A CV
    report (:func:`summarize_folds`) prints every cell as ``mean ± std`` over folds, marks a
    per-class mean taken over fewer than k folds (the metric is undefined in the others) with
    ``*`` and one defined in no fold with ``–``, and then prints the pooled out-of-fold table
    below it, each under a heading that says which it is.
    """
    if not is_cv_report(report):
        return _table(report, None, title, digits)
    k, mean = report["k"], report["mean"]
    lines = [title] if title else []
    lines.append(f"Mean ± std over the {k} folds (std with ddof=0)")
    text = "\n".join(lines) + "\n" + _table(mean, report["std"], "", digits, k)
    partial = any(v < k for row in mean["per_class"].values() for v in row.get("n_folds", {}).values())
    if partial:
        text += ("* per-class mean over fewer than the k folds: only the folds where the metric is defined "
                 "(precision: the class was predicted; recall: it has test samples; F1: either); "
                 "'–': defined in no fold. per_class.csv has the fold counts.\n")
    if "pooled" in report:
        p = report["pooled"]
        text += ("\n" + _table(p, None, f"Pooled out-of-fold: the {p['n_samples']} held-out predictions of all "
                 f"{k} folds scored as one set (each by the fold model that did not see it)", digits))
    return text


def _table(mean: dict, std: dict | None, title: str, digits: int, k: int | None = None) -> str:
    def cell(path: tuple[str, ...]) -> str:
        v = _get(mean, path)
        if v is None:
            return "– " if std is not None else "–"
        text = f"{v:.{digits}f}"
        if std is not None:
            text += f" ± {_get(std, path):.{digits}f}"
            partial = path[0] == "per_class" and k is not None \
                and mean["per_class"][path[1]].get("n_folds", {}).get(path[2], k) < k
            text += "*" if partial else " "  # keeps the columns aligned whether or not a cell is marked
        return text

    classes = list(mean["classes"])
    names = classes + ["Macro Avg.", "Weighted Avg.", "Accuracy"]
    w0 = max(len(n) for n in names) + 2
    wc = (2 * digits + 12) if std is not None else max(9, digits + 4)
    pad = " " if std is not None else ""
    header = " " * w0 + "".join((h + pad).rjust(wc) for h in ("Precision", "Recall", "F1-Score")) + "Support".rjust(10)
    lines = ([title] if title else []) + [header]
    for c in classes:
        lines.append(c.rjust(w0) + "".join(cell(("per_class", c, m)).rjust(wc) for m in PRF)
                     + str(mean["per_class"][c]["support"]).rjust(10))
    lines.append("")
    n = str(mean["n_samples"])
    for label, avg in (("Macro Avg.", "macro"), ("Weighted Avg.", "weighted")):
        lines.append(label.rjust(w0) + "".join(cell((avg, m)).rjust(wc) for m in PRF) + n.rjust(10))
    lines.append("Accuracy".rjust(w0) + " " * (2 * wc) + cell(("accuracy",)).rjust(wc) + n.rjust(10))
    extra = f"Balanced accuracy {cell(('balanced_accuracy',))}"
    if "top_k_accuracy" in mean:
        extra += "".join(f"   top-{t} accuracy {cell(('top_k_accuracy', t))}" for t in mean["top_k_accuracy"])
    lines += ["", extra.rstrip()]
    return "\n".join(line.rstrip() for line in lines) + "\n"


def format_soft_labels(soft: dict, digits: int = 3) -> str:
    """One line per soft-label metric, for report.txt."""
    k = soft["k"]
    return (f"Soft labels over {soft['columns']} ({soft['n_samples']} samples, "
            f"{soft['n_dropped']} without mass there dropped)\n"
            f"  mean KL(true || predicted)  {soft['kl']:.{digits}f}\n"
            f"  top-1 agreement             {soft['top1_agreement']:.{digits}f}\n"
            f"  top-{k} agreement             {soft[f'top{k}_agreement']:.{digits}f}\n")


def _get(d: dict, path: tuple[str, ...]) -> float | None:
    for p in path:
        d = d[p]
    return None if d is None else float(d)


def write_report(report: dict, out_dir: str | os.PathLike, title: str = "", digits: int = 2,
                 text: str | None = None) -> Path:
    """Write ``metrics.json``, ``per_class.csv``, ``confusion_matrix.csv`` and ``report.txt``.

    ``report`` is a report or a CV report. For a CV report the per-class CSV has, per metric,
    the mean and std over the folds that define it, the number of those folds, and the pooled
    out-of-fold value (empty cells where undefined); the confusion matrix is the pooled
    (summed) one. ``text`` replaces the table in ``report.txt`` (e.g. a table plus notes).
    Returns ``out_dir``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(report, indent=2, default=json_default))
    cv = is_cv_report(report)
    mean = report["mean"] if cv else report
    with open(out / "per_class.csv", "w", newline="") as f:
        w = csv.writer(f)
        if cv:
            pooled = report.get("pooled")
            cols = [s for s in ("mean", "std", "folds", "pooled") if s != "pooled" or pooled is not None]
            w.writerow(["class"] + [f"{m}_{s}" for m in PRF for s in cols] + ["support"])

            def value(c: str, m: str, s: str) -> Any:
                if s == "folds":
                    return mean["per_class"][c].get("n_folds", {}).get(m, report["k"])
                v = (pooled if s == "pooled" else report[s])["per_class"][c][m]
                return "" if v is None else v

            for c in mean["classes"]:
                w.writerow([c] + [value(c, m, s) for m in PRF for s in cols] + [mean["per_class"][c]["support"]])
        else:
            w.writerow(["class", *PRF, "support"])
            for c in mean["classes"]:
                pc = mean["per_class"][c]
                w.writerow([c, pc["precision"], pc["recall"], pc["f1"], pc["support"]])
    cm = report["pooled"]["confusion_matrix"] if cv and "pooled" in report else mean.get("confusion_matrix")
    if cm is not None:
        with open(out / "confusion_matrix.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["true \\ predicted", *mean["classes"]])
            for c, row in zip(mean["classes"], cm, strict=True):
                w.writerow([c, *row])
    (out / "report.txt").write_text(text if text is not None else format_table(report, title, digits))
    return out


def read_confusion_csv(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """Read back ``confusion_matrix.csv``: ``(classes, matrix (C, C))``."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0][1:], np.array([[int(v) for v in r[1:]] for r in rows[1:]], np.int64)
