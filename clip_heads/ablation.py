"""Prompt ablation: zero-shot scores of every template alone and of every set's ensemble.

:func:`ablate_prompts` is ``clip-heads ablate-prompts STORE``; :func:`ablate` is its core on
arrays in memory, every template of every prompt set scored in one matmul per chunk of rows.
The class vectors are the zero-shot kernel's (:mod:`clip_heads.zeroshot`), so an ablation row
is exactly what ``clip-heads zero-shot`` with that template (or set) measures.
"""
from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from clip_heads import zeroshot
from clip_heads.calibration import format_calibration
from clip_heads.evaluate import run_zero_shot
from clip_heads.metrics import confusion_matrices, metrics_from_confusion
from clip_heads.results import METRICS, REPORT, PathLike, Report, render, results_dir, write_json, write_section
from clip_heads.store import PromptSet, open_store

logger = logging.getLogger(__name__)

__all__ = ["ablate", "ablate_prompts"]


def ablate(X: np.ndarray, y: np.ndarray, classes: Sequence[str], prompt_sets: Sequence[PromptSet],
           chunk: int | None = None) -> list[dict[str, Any]]:
    """Zero-shot accuracy, macro- and weighted-F1 of each template alone and of each set's ensemble.

    All per-template class vectors (:func:`clip_heads.zeroshot.template_vectors`) and each set's
    ensemble (:func:`clip_heads.zeroshot.class_vectors`) are stacked into one ``(dim, M * C)`` matrix, scored in one
    matmul per chunk of rows (``chunk`` rows; by default as many as keep the score block near
    64 MB), and metrics come from the stacked confusion matrices
    (:func:`metrics.metrics_from_confusion`). Rows are ranked by accuracy, then macro-F1.
    """
    C = len(classes)
    blocks, meta = [], []
    for ps in prompt_sets:
        per_template, full = zeroshot.template_vectors(ps, classes)
        for t in np.flatnonzero(~full):
            logger.warning("prompt set %r template %d lacks some classes; left out of the ablation", ps.name, t)
        for t in np.flatnonzero(full):
            blocks.append(per_template[t])
            meta.append({"prompt_set": ps.name, "template_id": int(t), "template": ps.templates[t], "n_templates": 1})
        blocks.append(zeroshot.class_vectors(ps, classes=classes))
        meta.append({"prompt_set": ps.name, "template_id": None,
                     "template": f"(ensemble of {len(ps.templates)} templates)", "n_templates": len(ps.templates)})
    W = np.stack(blocks).reshape(-1, X.shape[1]).T.astype(np.float32)  # (D, M*C), unit columns
    M = len(blocks)
    y = np.asarray(y, np.int64)
    chunk = chunk or max(64, 2**24 // (M * C))
    cm = np.zeros((M, C, C), np.int64)
    for i in range(0, len(X), chunk):
        S = zeroshot.cosine(X[i:i + chunk], W.T)
        cm += confusion_matrices(y[i:i + chunk], S.reshape(len(S), M, C).argmax(-1), C)
    m = metrics_from_confusion(cm)
    rows = [dict(meta[j], **{k: float(v[j]) for k, v in m.items()}) for j in range(M)]
    rows.sort(key=lambda r: (-r["accuracy"], -r["macro_f1"]))
    for rank, r in enumerate(rows, 1):
        r["rank"] = rank
    return rows


def ablate_prompts(store_path: PathLike, prompt_sets: Sequence[str] | None = None,
                   out_dir: PathLike | None = None, digits: int = 3, overwrite: bool = False,
                   plots: bool | None = None) -> Report:
    """Rank every template (alone) and every set's ensemble of a store's prompt sets by zero-shot.

    ``prompt_sets`` default: all sets of the store that have a prompt for each store class
    (others are skipped with a note). Writes the results layout of :mod:`clip_heads.results`
    (``report.txt``, ``metrics.json``; ``per_class.csv``, ``confusion_matrix.csv`` and
    ``predictions.csv`` of the rank-1 prompt) plus ``ablation.csv``, the ranked rows, the
    figures (``plots/ablation.png``, ranked bars, and the rank-1 prompt's in ``plots/rank1/``;
    ``plots=False`` skips them) and ``index.html``.
    """
    path = Path(store_path)
    with open_store(path) as s:
        X, y, classes = s.arrays()
        names = list(prompt_sets) if prompt_sets else s.prompt_sets()
        sets = [s.prompt_set(n) for n in names]
    if (y < 0).any():
        X, y = X[y >= 0], y[y >= 0]
    if not sets:
        raise ValueError(f"store {path} has no prompt set to ablate (add one with `clip-heads prompts`)")
    usable, skipped = [], []
    for ps in sets:
        try:
            zeroshot.prompt_columns(ps, classes)
            usable.append(ps)
        except ValueError as e:
            if prompt_sets:
                raise
            skipped.append(ps.name)
            logger.info("skipping %s", e)
    if not usable:
        raise ValueError(f"no prompt set of {path} has a prompt for every store class {classes}: "
                         f"{skipped} are for other label sets")
    rows = ablate(X, y, classes, usable)
    # The rank-1 prompt scored in full, so the folder has the per-class files of every results folder.
    top = rows[0]
    best = run_zero_shot(path, prompt_set=top["prompt_set"],
                         template_ids=None if top["template_id"] is None else [top["template_id"]])
    w = max(len("Template"), *(len(r["template"]) for r in rows))
    ws = max(len("Prompt set"), *(len(r["prompt_set"]) for r in rows))
    lines = [f"Prompt ablation, zero-shot on {path.name} ({len(y)} images, {len(classes)} classes), ranked by accuracy",
             f"{'Rank':>4}  {'Prompt set':<{ws}}  {'Template':<{w}}  "
             f"{'Accuracy':>8}  {'Macro-F1':>8}  {'Weighted-F1':>11}"]
    for r in rows:
        lines.append(f"{r['rank']:>4}  {r['prompt_set']:<{ws}}  {r['template']:<{w}}  {r['accuracy']:>8.{digits}f}  "
                     f"{r['macro_f1']:>8.{digits}f}  {r['weighted_f1']:>11.{digits}f}")
    if skipped:
        lines.append(f"skipped prompt sets without a prompt for every store class: {skipped}")
    lines.append(f"per_class.csv, confusion_matrix.csv and predictions.csv are those of rank 1 "
                 f"({top['prompt_set']}: {top['template']})")
    text = "\n".join(lines) + "\n"
    if "calibration" in best.metrics:
        text += f"\nRank 1 ({top['prompt_set']}: {top['template']}): " + format_calibration(best.metrics["calibration"])
    info = best.metrics["info"]
    run = {"command": "ablate-prompts", "store": os.path.abspath(path),
           "prompt_sets": list(prompt_sets) if prompt_sets else None}
    metrics = {"info": {"store": str(path), "model_id": info.get("model_id"), "n_samples": int(len(y)),
                        "classes": classes,
                        "prompt_sets": [ps.name for ps in usable], "skipped": skipped, "data": info["data"], "run": run},
               "rows": rows, "rank1": {k: v for k, v in best.metrics.items() if k != "info"}}
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        with results_dir(out, run, overwrite) as stage:
            write_section(stage, metrics["rank1"], best.text, best.predictions)
            write_json(stage / METRICS, metrics)
            (stage / REPORT).write_text(text)
            fields = ["rank", "prompt_set", "template_id", "template", "n_templates", "accuracy", "macro_f1",
                      "weighted_f1", "macro_precision", "macro_recall", "weighted_precision", "weighted_recall"]
            with open(stage / "ablation.csv", "w", newline="") as f:
                wr = csv.DictWriter(f, fieldnames=fields)
                wr.writeheader()
                wr.writerows({k: r[k] for k in fields} for r in rows)
            render(stage, plots, out)
    return Report("ablation", text, metrics, out, predictions=best.predictions)
