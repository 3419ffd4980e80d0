"""Figures of results: confusion matrix, per-class bars, fold spread, ablation, WiSE-FT curve,
a fine-tune's training curve, soft labels, reliability diagram.

Each ``*_figure`` function takes the dicts the rest of clip-heads already writes to
``metrics.json`` (:func:`clip_heads.metrics.classification_report`,
:func:`~clip_heads.metrics.summarize_folds`, an ablation's ranked rows, a generalisation
result, :func:`clip_heads.calibration.calibration_report`) and returns a matplotlib
``Figure`` to restyle for a paper; :func:`save_figure` writes it as PNG (150 dpi, exactly
``figsize * 150`` pixels: figure sizes are whole half inches, and no tight bbox) and SVG beside it. :func:`write_run_plots` draws
every figure one evaluation has.

matplotlib is imported inside the functions (``import clip_heads`` stays light) and pyplot is
never used: figures are built on an Agg canvas directly, so a notebook's backend is left as
the user set it and no figure outlives its call.
"""
from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Sequence, Union

import numpy as np

from clip_heads.metrics import soft_label_breakdown  # noqa: F401  (the numbers soft_label_figure draws)
from clip_heads.paper import PAPER_CURVES, paper_points  # noqa: F401  (the paper's points, drawn as stars)

PathLike = Union[str, "os.PathLike[str]"]
DPI = 150
CELL_TEXT_MAX = 30  # past this many classes the confusion matrix drops its cell counts
COLORS = {"precision": "#4c72b0", "recall": "#dd8452", "f1": "#55a868", "support": "#8c8c8c",
          "a": "#4c72b0", "b": "#c44e52", "ensemble": "#dd8452", "template": "#4c72b0"}


def _figure(width: float, height: float, layout: str | None = "constrained"):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # Half inches are exact in binary and whole pixels at 150 dpi, so a PNG is exactly
    # figsize * 150 pixels (matplotlib truncates a fractional pixel size).
    width, height = math.ceil(width * 2) / 2, math.ceil(height * 2) / 2
    fig = Figure(figsize=(width, height), dpi=DPI, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, out_dir: PathLike, stem: str) -> list[Path]:
    """Write ``stem.png`` (150 dpi) and ``stem.svg`` into ``out_dir``, each replaced atomically.

    The PNG is ``fig.get_size_inches() * 150`` pixels. The figure's layout is computed once and
    then frozen (its layout engine set to none). Returns ``[png, svg]``.
    """
    import matplotlib

    from clip_heads.fsutil import atomic_write_bytes

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if fig.get_layout_engine() is not None:
        # Lay out once and freeze it: each savefig would otherwise redo the layout (a full draw,
        # ~1 s for 100 classes' tick labels), and PNG and SVG get identical positions.
        fig.draw_without_rendering()
        fig.set_layout_engine("none")
    paths = []
    with matplotlib.rc_context({"svg.hashsalt": "clip-heads"}):  # the same figure gives the same SVG
        for fmt, meta in (("png", {"Software": None}), ("svg", {"Date": None})):
            buf = io.BytesIO()
            fig.savefig(buf, format=fmt, dpi=DPI, metadata=meta)
            paths.append(atomic_write_bytes(out / f"{stem}.{fmt}", buf.getvalue()))
    return paths


def _short(name: str, limit: int = 28) -> str:
    name = str(name)
    return name if len(name) <= limit else name[: limit - 1] + "…"


def _label_inches(labels: Sequence[str], fontsize: float) -> float:
    # DejaVu Sans averages ~0.6 em per character; a little slack for the widest glyphs.
    return max((len(s) for s in labels), default=1) * fontsize * 0.62 / 72 + 0.15


def _is_cv(report: dict) -> bool:
    return report.get("kind") == "cv"


# ---------------------------------------------------------------------------------------
# One evaluation: confusion matrix, per-class bars, fold spread
# ---------------------------------------------------------------------------------------
def confusion_matrix_figure(report: dict, title: str | None = None):
    """Row-normalised heatmap of the confusion matrix, counts in the cells.

    A CV report draws its pooled out-of-fold matrix. Up to :data:`CELL_TEXT_MAX` classes each
    cell shows its count; past that the cells stay bare and the figure grows with the class
    count (tick labels never overlap: the cell pitch is set from the font size). A true class
    with no sample is a grey row.
    """
    cv = _is_cv(report)
    base = report["pooled"] if cv and "pooled" in report else report
    if "confusion_matrix" not in base:
        raise ValueError("the report has no confusion matrix to draw")
    cm = np.asarray(base["confusion_matrix"], np.int64)
    classes = [_short(c) for c in report["classes"]]
    C = len(classes)
    text = C <= CELL_TEXT_MAX
    font = 9 if C <= 12 else 8 if text else max(5.0, min(7.0, 640 / C))
    cell = 0.55 if C <= 12 else 0.36 if text else font * 1.45 / 72
    lab = _label_inches(classes, font)
    width = lab + 0.5 + C * cell + 1.3
    height = 0.8 + C * cell + lab + 0.5
    fig = _figure(max(width, 4.5), max(height, 3.8))
    ax = fig.add_subplot()
    support = cm.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = np.where(support > 0, cm / np.maximum(support, 1), np.nan)
    import matplotlib

    cmap = matplotlib.colormaps["Blues"].with_extremes(bad="#dddddd")
    im = ax.imshow(norm, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    flat = C <= 6 and max(len(c) for c in classes) <= 10  # a few short names read best level
    ax.set_xticks(range(C), classes, rotation=0 if flat else 90, fontsize=font)
    ax.set_yticks(range(C), classes, fontsize=font)
    ax.set_xlabel("Predicted class")
    ax.set_ylabel("True class")
    if text:
        for i in range(C):
            for j in range(C):
                v = norm[i, j]
                color = "white" if np.isfinite(v) and v > 0.55 else "#222222" if cm[i, j] else "#aaaaaa"
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=font - 1, color=color)
    bar = fig.colorbar(im, ax=ax, shrink=min(1.0, 4 / max(C * cell, 1)) if C * cell > 4 else 1.0, pad=0.02)
    bar.set_label("fraction of the true class (row)")
    default = "Confusion matrix" + (f", pooled out-of-fold ({report['k']} folds)" if cv else "")
    n = int(cm.sum())
    ax.set_title(f"{title or default}\nrows: true class, colour normalised per row\n"
                 f"{'cells: counts, ' if text else ''}{n} samples", fontsize=10)
    return fig


def per_class_figure(report: dict, title: str | None = None):
    """Precision, recall and F1 per class as grouped horizontal bars, support beside them.

    A CV report draws the per-class means with their std over folds as error bars; a metric no
    fold defines has no bar.
    """
    cv = _is_cv(report)
    mean = report["mean"] if cv else report
    std = report["std"] if cv else None
    classes = list(report["classes"])
    C = len(classes)
    font = 9 if C <= 30 else 7
    pitch = 0.5 if C <= 12 else 0.36 if C <= 30 else 0.2
    lab = _label_inches([_short(c) for c in classes], font)
    fig = _figure(lab + 8.5, 1.4 + C * pitch + 0.5)
    ax, ax_s = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [4, 1]})
    y = np.arange(C)
    h = 0.27
    for off, m in zip((-h, 0, h), ("precision", "recall", "f1"), strict=True):
        vals = np.array([np.nan if mean["per_class"][c][m] is None else mean["per_class"][c][m] for c in classes])
        err = None
        if std is not None:
            err = np.array([np.nan if std["per_class"][c][m] is None else std["per_class"][c][m] for c in classes])
        ax.barh(y + off, np.nan_to_num(vals, nan=0.0), height=h, color=COLORS[m], label=m.capitalize() if m != "f1" else "F1",
                xerr=err, error_kw={"elinewidth": 0.8, "capsize": 1.5, "ecolor": "#333333"})
    ax.set_yticks(y, [_short(c) for c in classes], fontsize=font)
    ax.set_xlim(0, 1.02)
    ax.set_xlabel("mean ± std over folds" if cv else "score")
    ax.grid(axis="x", alpha=0.3)
    ax.set_ylim(C - 0.5, -0.5)  # no autoscale margin: it is 5 empty rows at 100 classes
    ax.legend(loc="lower left", bbox_to_anchor=(0, 1.0), fontsize=8, ncols=3, frameon=False)
    support = [mean["per_class"][c]["support"] for c in classes]
    ax_s.barh(y, support, height=0.6, color=COLORS["support"])
    ax_s.set_xlabel("support" + (" (all folds)" if cv else ""))
    ax_s.tick_params(axis="y", left=False)
    if C <= 30:
        for yi, s in zip(y, support, strict=True):
            ax_s.text(s, yi, f" {s}", va="center", fontsize=font - 1)
        ax_s.set_xlim(0, max(support + [1]) * 1.3)
    default = "Per-class precision, recall, F1" + (f" (mean ± std over {report['k']} folds)" if cv else "")
    fig.suptitle(title or default, fontsize=11)
    return fig


FOLD_METRICS = (("accuracy", "Accuracy"), ("balanced_accuracy", "Balanced\naccuracy"),
                ("macro.precision", "Macro\nprecision"), ("macro.recall", "Macro\nrecall"),
                ("macro.f1", "Macro-F1"), ("weighted.f1", "Weighted-F1"))


def _value(r: dict, path: str) -> float:
    for p in path.split("."):
        r = r[p]
    return float(r)


def fold_spread_figure(cv_report: dict, title: str | None = None):
    """Box and strip plot of each headline metric over the folds of a CV report."""
    if not _is_cv(cv_report) or not cv_report.get("folds"):
        raise ValueError("fold spread needs a CV report with its per-fold reports (metrics.summarize_folds)")
    folds = cv_report["folds"]
    data = [[_value(f, p) for f in folds] for p, _ in FOLD_METRICS]
    fig = _figure(8.0, 4.6)
    ax = fig.add_subplot()
    pos = np.arange(len(FOLD_METRICS))
    ax.boxplot(data, positions=pos, widths=0.5, showfliers=False, medianprops={"color": "#333333"},
               boxprops={"color": "#888888"}, whiskerprops={"color": "#888888"}, capprops={"color": "#888888"})
    rng = np.random.default_rng(0)  # jitter only: the same figure every time
    for i, vals in enumerate(data):
        ax.scatter(i + rng.uniform(-0.12, 0.12, len(vals)), vals, s=18, color=COLORS["precision"], zorder=3,
                   label="one fold" if i == 0 else None)
        ax.scatter([i], [np.mean(vals)], marker="D", s=40, color=COLORS["b"], zorder=4,
                   label="mean" if i == 0 else None)
    ax.set_xticks(pos, [label for _, label in FOLD_METRICS], fontsize=9)
    ax.set_ylabel("score on the held-out fold")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="lower left", bbox_to_anchor=(0, 1.0), ncols=2, frameon=False)
    fig.suptitle(title or f"Spread over the {cv_report['k']} folds", fontsize=11)
    return fig


# ---------------------------------------------------------------------------------------
# Prompt ablation, WiSE-FT
# ---------------------------------------------------------------------------------------
def ablation_figure(rows: Sequence[dict], title: str | None = None):
    """Ranked horizontal bars of accuracy and macro-F1, one row per template and ensemble.

    ``rows`` are :func:`clip_heads.ablation.ablate`'s (``prompt_set, template, template_id,
    accuracy, macro_f1, rank``); ensembles are drawn in their own colour.
    """
    if not rows:
        raise ValueError("no ablation rows to draw")
    rows = sorted(rows, key=lambda r: r.get("rank", 0))
    n = len(rows)
    font = 8 if n <= 40 else 6.5
    pitch = 0.3 if n <= 40 else 0.17
    labels = [_short(f"{r['prompt_set']}: {r['template']}", 60) for r in rows]
    lab = _label_inches(labels, font)
    fig = _figure(lab + 8.0, 1.3 + n * pitch + 0.5)
    axes = fig.subplots(1, 2, sharey=True)
    y = np.arange(n)
    colors = [COLORS["ensemble"] if r.get("template_id") is None else COLORS["template"] for r in rows]
    for ax, (key, name) in zip(axes, (("accuracy", "Accuracy"), ("macro_f1", "Macro-F1")), strict=True):
        vals = [r[key] for r in rows]
        ax.barh(y, vals, color=colors, height=0.7)
        if n <= 40:
            for yi, v in zip(y, vals, strict=True):
                ax.text(v, yi, f" {v:.3f}", va="center", fontsize=font - 0.5)
        ax.set_xlim(0, min(1.0, max(vals) * 1.18 + 0.02))
        ax.set_xlabel(name)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, labels, fontsize=font)
    axes[0].invert_yaxis()
    axes[1].tick_params(axis="y", left=False)
    from matplotlib.patches import Patch

    axes[1].legend(handles=[Patch(color=COLORS["template"], label="one template"),
                            Patch(color=COLORS["ensemble"], label="ensemble of a set")], fontsize=8, loc="lower right",
                   bbox_to_anchor=(1.0, 1.0), ncols=2, frameon=False)  # above the bars, never over one
    fig.suptitle(title or "Prompt ablation, zero-shot, ranked by accuracy", fontsize=11)
    return fig


def wise_ft_figure(result: dict, points: Sequence[dict] | None = None, title: str | None = None,
                   names: tuple[str, str] = ("A", "B")):
    """Accuracy (solid) and macro-F1 (dashed) on A and on B versus alpha.

    ``result`` is :func:`clip_heads.wise_ft.generalisation`'s (or its ``generalisation.json``):
    ``rows`` of ``alpha, a_accuracy, a_macro_f1, b_accuracy, b_macro_f1`` (A empty when nothing
    was held out). ``points`` (:func:`paper_points`) are drawn as stars with their label, on
    the sides that have a curve.
    """
    rows = sorted(result["rows"], key=lambda r: r["alpha"])
    if not rows:
        raise ValueError("no WiSE-FT rows to draw")
    fig = _figure(7.5, 4.8)
    ax = fig.add_subplot()
    alpha = [r["alpha"] for r in rows]
    drawn = set()
    for side, name in zip(("a", "b"), names, strict=True):
        for metric, style in (("accuracy", "-"), ("macro_f1", "--")):
            vals = [r.get(f"{side}_{metric}") for r in rows]
            if all(v is None for v in vals):
                continue
            v = np.array([np.nan if x is None else x for x in vals])
            drawn.add(side)
            ax.plot(alpha, v, style, marker="o" if metric == "accuracy" else None, color=COLORS[side],
                    alpha=1.0 if metric == "accuracy" else 0.6,
                    label=f"{name}: {'accuracy' if metric == 'accuracy' else 'macro-F1'}")
    for p in (p for p in points or () if p["side"] in drawn):  # no curve on A (nothing held out): no A points
        ax.scatter([p["alpha"]], [p["accuracy"]], marker="*", s=160, color=COLORS[p["side"]], edgecolor="black",
                   linewidth=0.6, zorder=5)
        ax.annotate(f"{p['label']}\n({names[p['side'] == 'b']} {p['accuracy']:.2f})", (p["alpha"], p["accuracy"]),
                    textcoords="offset points", xytext=(-8 if p["alpha"] > 0.5 else 8, 8), fontsize=7,
                    ha="right" if p["alpha"] > 0.5 else "left")
    ax.set_xlabel("alpha  (0 = zero-shot CLIP, 1 = fine-tuned)")
    ax.set_ylabel("score")
    ax.set_xlim(-0.05, 1.05)
    ax.margins(y=0.15)  # room for the stars' labels
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(title or "WiSE-FT: zero-shot on held-out A and on B along the blend"
                 + ("\nstars: the paper's published numbers (its model and data)" if points else ""), fontsize=10)
    return fig


def wise_ft_calibration_figure(result: dict, title: str | None = None, names: tuple[str, str] = ("A", "B")):
    """ECE (left) and NLL (right) of every blend's probabilities on A and on B versus alpha, from
    a generalisation's rows (``a_ece``, ``a_nll``, ``b_ece``, ``b_nll``)."""
    rows = sorted(result["rows"], key=lambda r: r["alpha"])
    if not any(r.get("b_ece") is not None or r.get("a_ece") is not None for r in rows):
        raise ValueError("the WiSE-FT rows have no calibration to draw")
    fig = _figure(9.0, 4.0)
    axes = fig.subplots(1, 2)
    alpha = [r["alpha"] for r in rows]
    for ax, (metric, label) in zip(axes, (("ece", "ECE (15 bins)"), ("nll", "NLL (natural log)")), strict=True):
        for side, name in zip(("a", "b"), names, strict=True):
            vals = [r.get(f"{side}_{metric}") for r in rows]
            if all(v is None for v in vals):
                continue
            ax.plot(alpha, [np.nan if v is None else v for v in vals], "-o", color=COLORS[side], label=name)
        ax.set_xlabel("alpha  (0 = zero-shot, 1 = fine-tuned)")
        ax.set_ylabel(label)
        ax.set_xlim(-0.05, 1.05)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or "Calibration along the WiSE-FT curve (lower is better)", fontsize=10)
    return fig


def training_figure(metrics: dict, title: str | None = None):
    """A fine-tune's training curve from its metrics.json (:func:`clip_heads.finetune.finetune`):
    the loss of every optimiser step with each epoch's mean marked, and the learning rate below."""
    curve = metrics.get("loss_curve") or {}
    steps = [s for s, v in zip(curve.get("step", []), curve.get("loss", []), strict=True) if v is not None]
    if not steps:
        raise ValueError("the fine-tune recorded no training step to draw")
    step = np.asarray(curve["step"], np.float64)
    loss = np.array([np.nan if v is None else v for v in curve["loss"]], np.float64)
    fig = _figure(7.5, 5.5)
    ax, ax_lr = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot(step, loss, "-", color=COLORS["precision"], linewidth=1, alpha=0.8, label="loss per step")
    epochs = [e for e in metrics.get("epochs") or [] if e.get("loss") is not None]
    ep = np.asarray(curve.get("epoch") or [], np.int64)
    for i, e in enumerate(epochs):  # each epoch's mean, drawn at its last step
        last = step[ep == e["epoch"]]
        if len(last):
            ax.scatter([last.max()], [e["loss"]], marker="D", s=36, color=COLORS["b"], zorder=3,
                       label="epoch mean" if i == 0 else None)
            ax.annotate(f"epoch {e['epoch']}: {e['loss']:.3f}", (last.max(), e["loss"]), textcoords="offset points",
                        xytext=(-6, 8), ha="right", fontsize=7)
    ax.set_ylabel("contrastive loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    lr = np.array([np.nan if v is None else v for v in curve.get("lr") or [None] * len(step)], np.float64)
    ax_lr.plot(step, lr, "-", color=COLORS["f1"], linewidth=1.2)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("optimiser step")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax_lr.grid(alpha=0.3)
    n, skipped = metrics.get("n_train"), len(metrics.get("skipped") or {})
    on = f" on {n} images" + (f" ({skipped} unreadable, skipped)" if skipped else "") if n else ""
    ax.set_title(title or f"Fine-tune: {len(step)} steps{on}", fontsize=10)
    return fig


# ---------------------------------------------------------------------------------------
# Soft labels and calibration
# ---------------------------------------------------------------------------------------
def soft_label_figure(breakdown: dict, title: str | None = None):
    """Three panels from :func:`clip_heads.metrics.soft_label_breakdown` (or the ``soft_labels``
    entry of a metrics.json, :func:`~clip_heads.metrics.soft_label_metrics`): the mean vote and predicted distributions,
    mean KL(votes || predicted) per dominant voted class, and top-1 / top-k agreement per class."""
    if "by_dominant_class" in breakdown:  # the soft_labels entry of a metrics.json (metrics.soft_label_metrics)
        breakdown = {"columns": breakdown["columns"], "mean_true": breakdown["mean_true"],
                     "mean_pred": breakdown["mean_pred"], "overall": breakdown,
                     "per_class": breakdown["by_dominant_class"], "k": breakdown["k"]}
    cols, k = breakdown["columns"], breakdown["k"]
    C = len(cols)
    fig = _figure(max(12.0, 3 * (1.2 + 0.45 * C)), 4.6)
    ax_d, ax_kl, ax_a = fig.subplots(1, 3)
    x = np.arange(C)
    ax_d.bar(x - 0.2, breakdown["mean_true"], 0.4, color=COLORS["support"], label="votes (mean)")
    ax_d.bar(x + 0.2, breakdown["mean_pred"], 0.4, color=COLORS["precision"], label="predicted (mean)")
    ax_d.set_xticks(x, cols, rotation=45, ha="right", fontsize=8)
    ax_d.set_ylabel("probability")
    ax_d.legend(fontsize=8)
    ax_d.set_title("Mean distributions", fontsize=10)
    per = breakdown["per_class"]
    names = [c for c in cols if c in per]
    xs = np.arange(len(names))
    ax_kl.bar(xs, [per[c]["kl"] for c in names], color=COLORS["b"])
    ax_kl.set_xticks(xs, [f"{c}\n(n={per[c]['n']})" for c in names], rotation=45, ha="right", fontsize=8)
    ax_kl.set_ylabel("mean KL(votes || predicted)")
    ax_kl.set_title(f"KL per dominant voted class (all: {breakdown['overall']['kl']:.3f})", fontsize=10)
    ax_a.bar(xs - 0.2, [per[c]["top1_agreement"] for c in names], 0.4, color=COLORS["precision"], label="top-1")
    ax_a.bar(xs + 0.2, [per[c][f"top{k}_agreement"] for c in names], 0.4, color=COLORS["f1"], label=f"top-{k}")
    ax_a.set_xticks(xs, names, rotation=45, ha="right", fontsize=8)
    ax_a.set_ylim(0, 1.05)
    ax_a.set_ylabel("agreement with the votes")
    ax_a.legend(fontsize=8)
    ax_a.set_title("Agreement per dominant voted class", fontsize=10)
    for ax in (ax_d, ax_kl, ax_a):
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title or f"Predicted versus voted emotion distributions ({breakdown['overall']['n_samples']} images)",
                 fontsize=11)
    return fig


def reliability_figure(cal: dict, title: str | None = None):
    """Reliability diagram from :func:`clip_heads.calibration.calibration_report`: accuracy per
    confidence bin against the diagonal, the gap shaded, and the confidence histogram below."""
    bins = cal["bins"]
    fig = _figure(5.8, 6.4)
    ax, ax_h = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    width = 1 / len(bins)
    lo = np.array([b["lower"] for b in bins])
    full = [b for b in bins if b["count"]]
    ax.bar([b["lower"] for b in full], [b["accuracy"] for b in full], width=width, align="edge",
           color=COLORS["precision"], edgecolor="white", label="accuracy in bin")
    for i, b in enumerate(full):  # the gap between what was said and what happened
        a, c = b["accuracy"], b["confidence"]
        # Hatched, unfilled: where accuracy exceeds confidence the gap lies over the accuracy bar,
        # and a tinted fill there would read as a shorter bar.
        ax.bar(b["lower"], abs(c - a), bottom=min(a, c), width=width, align="edge", facecolor="none",
               hatch="///", edgecolor=COLORS["b"], linewidth=0.8, label="gap" if i == 0 else None)
        ax.plot([b["lower"], b["lower"] + width], [c, c], color=COLORS["b"], linewidth=1.2)  # the confidence level
    ax.plot([0, 1], [0, 1], "--", color="#444444", linewidth=1, label="perfect calibration")
    ax.scatter([b["confidence"] for b in full], [b["accuracy"] for b in full], s=12, color="black", zorder=3,
               label="(mean confidence, accuracy)")
    ax.plot([], [], color=COLORS["b"], linewidth=1.2, label="mean confidence in bin")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(title or f"Reliability: ECE {cal['ece']:.3f}, Brier {cal['brier']:.3f}, NLL {cal['nll']:.3f}\n"
                 f"{cal['n_samples']} samples, {len(bins)} equal-width bins of top-label confidence", fontsize=10)
    ax_h.bar(lo, [b["count"] for b in bins], width=width, align="edge", color=COLORS["support"], edgecolor="white")
    ax_h.set_xlabel("confidence (top-label probability)")
    ax_h.set_ylabel("samples")
    return fig


# ---------------------------------------------------------------------------------------
# Many runs
# ---------------------------------------------------------------------------------------
def grouped_bars_figure(groups: Sequence[str], series: dict[str, Sequence[float | None]],
                        errors: dict[str, Sequence[float | None]] | None = None, title: str = "",
                        ylabel: str = "score"):
    """Bars per group (x) and series (colour), with optional error bars (std). None = no bar."""
    G, S = len(groups), len(series)
    if not G or not S:
        raise ValueError("nothing to draw: no groups or no series")
    labels = ["\n".join(_short(line, 28) for line in str(g).split("\n")) for g in groups]
    lines = [line for g in labels for line in g.split("\n")]
    n_lines = max(g.count("\n") + 1 for g in labels)
    rot = 0 if G <= 8 else 35
    per_group = max(0.35 * S + 0.4, _label_inches(lines, 8) + 0.1 if rot == 0 else 0)
    fig = _figure(max(6.0, 1.2 + G * per_group),
                  4.6 + (n_lines * 8 * 1.3 / 72 if rot == 0 else _label_inches(lines, 8) * 0.6 + n_lines * 0.15))
    ax = fig.add_subplot()
    x = np.arange(G)
    w = 0.8 / S
    palette = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c"]
    for i, (name, vals) in enumerate(series.items()):
        v = np.array([np.nan if a is None else a for a in vals], np.float64)
        e = None
        if errors and name in errors:
            e = np.array([np.nan if a is None else a for a in errors[name]], np.float64)
        ax.bar(x - 0.4 + w * (i + 0.5), np.nan_to_num(v), w, yerr=e, label=name, color=palette[i % len(palette)],
               error_kw={"elinewidth": 0.9, "capsize": 2})
    ax.set_xticks(x, labels, rotation=rot, ha="right" if rot else "center", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncols=min(S, 4))
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def write_run_plots(report: dict, out_dir: PathLike, *, calibration: dict | None = None,
                    soft: dict | None = None, title: str | None = None) -> list[Path]:
    """Every figure of one evaluation, into ``out_dir``; returns the files written (PNG, SVG).

    ``report`` is a :func:`clip_heads.metrics.classification_report` or a
    :func:`~clip_heads.metrics.summarize_folds` dict (as in metrics.json): the confusion matrix
    (``confusion_matrix.png``), the per-class bars (``per_class.png``) and, for CV, the fold
    spread (``fold_spread.png``). ``calibration`` (or the report's own ``calibration`` entry)
    adds ``reliability.png``; ``soft`` (:func:`soft_label_breakdown`, or the report's own
    ``soft_labels`` entry where it has the per-class numbers) adds ``soft_labels.png``.
    """
    figures = [("confusion_matrix", confusion_matrix_figure(report, title=None)),
               ("per_class", per_class_figure(report, title=None))]
    if _is_cv(report) and report.get("folds"):
        figures.append(("fold_spread", fold_spread_figure(report)))
    cal = calibration if calibration is not None else report.get("calibration")
    if cal is not None:
        figures.append(("reliability", reliability_figure(cal)))
    if soft is None and "by_dominant_class" in (report.get("soft_labels") or {}):
        soft = report["soft_labels"]
    if soft is not None:
        figures.append(("soft_labels", soft_label_figure(soft)))
    paths: list[Path] = []
    for stem, fig in figures:
        if title:  # the run's context above the figure's own title
            own = fig.get_suptitle()
            fig.suptitle(f"{title}\n{own}" if own else title, fontsize=11)
        paths += save_figure(fig, out_dir, stem)
    return paths
