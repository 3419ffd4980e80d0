"""Calibration of predicted probabilities: ECE, Brier score, NLL and the reliability diagram's data.

Emotion labels are subjective; a head that says 0.9 should be right nine times in ten. For any
head that predicts probabilities, :func:`calibration_report` measures how far it is from that,
as a JSON-able dict for ``metrics.json``, and :func:`format_calibration` is its block for
``report.txt``. :func:`clip_heads.plots.reliability_figure` draws the diagram from the same dict.

Conventions (stated in the report as well, so a number is never read with another's):

* **ECE** (Guo et al. 2017): top-label confidence ``max_k p_k`` in ``n_bins`` (15) equal-width
  bins over [0, 1], bin ``b`` holding confidences in ``(b/B, (b+1)/B]`` (a confidence of exactly
  0 goes to the first); ``ECE = sum_b n_b / n * |accuracy_b - confidence_b|``. MCE is the
  largest gap over non-empty bins.
* **Brier score**, multiclass: ``mean_i sum_k (p_ik - y_ik)^2`` with ``y`` one-hot; range
  [0, 2]. For two classes this is twice scikit-learn's binary ``brier_score_loss`` (which
  scores the positive class only, range [0, 1]); ``brier_binary`` gives that one too.
* **NLL**: ``-mean_i log p_i,y_i`` (natural log), scikit-learn's ``log_loss`` with every class
  as a label, which clips probabilities to [eps, 1 - eps] of their float type.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["N_BINS", "reliability_bins", "calibration_report", "calibration_of", "format_calibration"]

N_BINS = 15
BRIER_CONVENTION = "mean over samples of sum_k (p_k - y_k)^2, y one-hot; range [0, 2]"
ECE_CONVENTION = "top-label confidence, {n} equal-width bins (b/{n}, (b+1)/{n}], weighted by bin count"


def _validated(y_true: Sequence[int], proba: np.ndarray, atol: float) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    P = np.asarray(proba, np.float64)
    if P.ndim != 2 or y.ndim != 1 or len(y) != len(P):
        raise ValueError(f"proba must be (n_samples, n_classes) and y_true (n_samples,); got {P.shape} and {y.shape}")
    if not len(y):
        raise ValueError("no samples to calibrate")
    if P.shape[1] < 2:
        raise ValueError(f"calibration needs at least 2 classes; proba has {P.shape[1]} column")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"y_true must hold class indices (integers); got dtype {y.dtype}")
    bad = sorted({int(v) for v in y if not 0 <= v < P.shape[1]})
    if bad:
        raise ValueError(f"y_true holds {bad[:5]}, out of range for {P.shape[1]} classes")
    if not np.isfinite(P).all() or (P < 0).any():
        raise ValueError("proba holds negative, NaN or infinite values: these are not probabilities")
    sums = P.sum(1)
    worst = int(np.argmax(np.abs(sums - 1)))
    if abs(sums[worst] - 1) > atol:
        raise ValueError(f"proba rows must sum to 1 (within {atol}); row {worst} sums to {sums[worst]:.6g}: "
                         f"pass probabilities, not scores or logits")
    return y.astype(np.int64), P


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, n_bins: int = N_BINS) -> list[dict[str, Any]]:
    """Per-bin ``lower, upper, count, confidence, accuracy`` (the last two None where empty)."""
    if int(n_bins) < 1:
        raise ValueError(f"n_bins must be a positive integer; got {n_bins!r}")
    conf = np.asarray(confidence, np.float64)
    ok = np.asarray(correct, np.float64)
    # ceil(c * B) - 1 puts c in (b/B, (b+1)/B]; 0 goes to bin 0.
    idx = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    conf_sum = np.bincount(idx, conf, minlength=n_bins)
    ok_sum = np.bincount(idx, ok, minlength=n_bins)
    return [{"lower": b / n_bins, "upper": (b + 1) / n_bins, "count": int(count[b]),
             "confidence": float(conf_sum[b] / count[b]) if count[b] else None,
             "accuracy": float(ok_sum[b] / count[b]) if count[b] else None} for b in range(n_bins)]


def calibration_report(y_true: Sequence[int], proba: np.ndarray, classes: Sequence[str] | None = None,
                       n_bins: int = N_BINS, atol: float = 1e-3) -> dict[str, Any]:
    """ECE, MCE, Brier score and NLL of probabilities ``proba`` against labels ``y_true``.

    Parameters
    ----------
    y_true : (n_samples,) class indices into the columns of ``proba``.
    proba : (n_samples, n_classes) probabilities; each row must sum to 1 within ``atol``.
    classes : column names, recorded in the report.
    n_bins : equal-width confidence bins for ECE and the reliability diagram (15).

    Returns
    -------
    dict with ``ece``, ``mce``, ``brier``, ``nll``, ``accuracy`` and ``mean_confidence`` (of the
    argmax prediction), ``brier_binary`` for two classes (scikit-learn's convention, class 1
    positive), ``bins`` (per-bin count, mean confidence, accuracy), ``n_bins``, ``n_samples``,
    ``classes`` and ``conventions`` (what each number means).
    """
    from sklearn.metrics import log_loss

    y, P = _validated(y_true, proba, atol)
    n, C = P.shape
    conf, pred = P.max(1), P.argmax(1)
    correct = pred == y
    bins = reliability_bins(conf, correct, n_bins)
    gaps = [abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"]]
    ece = float(sum(b["count"] / n * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"]))
    onehot = np.zeros_like(P)
    onehot[np.arange(n), y] = 1.0
    brier = float(((P - onehot) ** 2).sum(1).mean())
    report: dict[str, Any] = {
        "ece": ece,
        "mce": float(max(gaps)),
        "brier": brier,
        # Rows are checked to sum to 1 within atol; log_loss wants them exact (float32 softmax is not).
        "nll": float(log_loss(y, P / P.sum(1, keepdims=True), labels=list(range(C)))),
        "accuracy": float(correct.mean()),
        "mean_confidence": float(conf.mean()),
        "n_samples": int(n),
        "n_bins": int(n_bins),
        "bins": bins,
        "conventions": {"ece": ECE_CONVENTION.format(n=int(n_bins)), "brier": BRIER_CONVENTION,
                        "nll": "mean negative natural log of the true class's probability (sklearn log_loss)"},
    }
    if C == 2:
        report["brier_binary"] = float(((P[:, 1] - y) ** 2).mean())
        report["conventions"]["brier_binary"] = "scikit-learn brier_score_loss of class 1: mean (p_1 - y)^2, range [0, 1]"
    if classes is not None:
        if len(classes) != C:
            raise ValueError(f"{len(classes)} class names for {C} probability columns")
        report["classes"] = [str(c) for c in classes]
    return report


def calibration_of(y_true: Sequence[int], proba: np.ndarray | None, classes: Sequence[str] | None = None,
                   probabilities: str = "", **notes: Any) -> dict[str, Any] | None:
    """:func:`calibration_report` of an evaluation's probabilities, or None where there are none
    to calibrate: no probabilities, or rows that do not sum to 1 (a label map that drops some of
    a head's classes leaves them short; logged). ``probabilities`` says which they are (``"softmax
    over 100 * cos"``, ``"the head's predict_proba"``), ``notes`` are added as they are
    (``computed="out of fold"``)."""
    if proba is None:
        return None
    try:
        cal = calibration_report(y_true, proba, classes)
    except ValueError as e:
        logger.info("calibration skipped: %s", e)
        return None
    if probabilities:
        cal["probabilities"] = probabilities
    cal.update(notes)
    return cal


def format_calibration(cal: dict[str, Any], digits: int = 4) -> str:
    """The report.txt block: ECE, MCE, Brier, NLL, and what each means."""
    how = "".join(f", {cal[k]}" for k in ("computed",) if cal.get(k))
    lines = [f"Calibration ({cal['n_samples']} samples{how}, top-label confidence in {cal['n_bins']} equal-width bins)"]
    if cal.get("probabilities"):
        lines.append(f"  probabilities    {cal['probabilities']}")
    lines += [f"  ECE              {cal['ece']:.{digits}f}   (0 = a confidence of 0.9 is right 90% of the time)",
              f"  MCE              {cal['mce']:.{digits}f}   (largest bin gap)",
              f"  Brier            {cal['brier']:.{digits}f}   ({cal['conventions']['brier']})"]
    if "brier_binary" in cal:
        lines.append(f"  Brier (binary)   {cal['brier_binary']:.{digits}f}   ({cal['conventions']['brier_binary']})")
    lines += [f"  NLL              {cal['nll']:.{digits}f}   (natural log)",
              f"  mean confidence  {cal['mean_confidence']:.{digits}f}   vs accuracy {cal['accuracy']:.{digits}f}"]
    return "\n".join(lines) + "\n"
