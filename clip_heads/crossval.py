"""Folds and cross-validation: THE fold definition, and k-fold CV of any classifier.

:func:`stratified_folds` is the one place folds are defined, so the heads' CV
(``clip-heads train-head --cv K``) and the full fine-tune's (``clip-heads finetune --cv K``)
use identical splits for the same seed; :func:`write_folds` / :func:`read_folds` keep them
with the results.
"""
from __future__ import annotations

import csv
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
from sklearn.base import clone
from sklearn.model_selection import StratifiedKFold

from clip_heads.calibration import calibration_of
from clip_heads.metrics import classification_report, summarize_folds

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]


@dataclass
class CVResult:
    """Stratified k-fold cross-validation: folds, out-of-fold predictions, per-fold and summary metrics."""

    k: int
    seed: int
    classes: list[str]
    folds: np.ndarray  # (n_samples,) fold id 0..k-1 per sample (reports and files number them 1..k)
    y_true: np.ndarray  # (n_samples,) class indices
    y_pred: np.ndarray  # (n_samples,) out-of-fold predicted class indices
    y_score: np.ndarray | None  # (n_samples, n_classes) out-of-fold probabilities
    fold_reports: list[dict] = field(default_factory=list)
    report: dict = field(default_factory=dict)  # metrics.summarize_folds: mean, std, folds, pooled; calibration


def stratified_folds(y: Sequence[Any], k: int = 10, seed: int = 0) -> np.ndarray:
    """THE fold assignment: fold id ``0..k-1`` per sample, stratified by label, seeded.

    (Ids are 0-based in the API and in ``folds.csv``'s ``fold_id`` column; reports, logs and
    a CV's ``predictions.csv`` number the folds 1..k.)

    Every class is dealt out so that its count in each fold is within one of ``n_c / k``
    (scikit-learn's ``StratifiedKFold(shuffle=True, random_state=seed)``). Renaming the labels
    does not change the folds (classes are taken in order of first appearance).
    """
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"y must be 1-D; got shape {y.shape}")
    if not 2 <= int(k) <= len(y):
        raise ValueError(f"k must be between 2 and the number of samples ({len(y)}); got {k}")
    names, counts = np.unique(y, return_counts=True)
    small = [f"{c} ({n})" for c, n in zip(names.tolist(), counts.tolist(), strict=True) if n < k]
    if small:
        more = f" and {len(small) - 10} more" if len(small) > 10 else ""
        logger.warning("%d classes have fewer than k=%d samples and are missing from some test folds (their "
                       "per-class means use only the folds that hold them): %s%s",
                       len(small), k, ", ".join(small[:10]), more)
    folds = np.empty(len(y), np.int64)
    if counts.max() < k:
        # scikit-learn refuses when every class is smaller than k (a sample of a 100-class set,
        # say). Deal each class's shuffled members round-robin over the folds instead, carrying
        # the position on from class to class so the folds stay equal in size.
        _, first, codes = np.unique(y, return_index=True, return_inverse=True)
        rng = np.random.default_rng(seed)
        start = 0
        for c in np.argsort(first):
            members = rng.permutation(np.flatnonzero(codes == c))
            folds[members] = (start + np.arange(len(members))) % k
            start += len(members)
        return folds
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the same warning, logged above
        splits = StratifiedKFold(n_splits=int(k), shuffle=True, random_state=seed).split(np.zeros(len(y)), y)
        for f, (_, test) in enumerate(splits):
            folds[test] = f
    return folds


def write_folds(path: PathLike, keys: Sequence[str], labels: Sequence[str], folds: np.ndarray) -> Path:
    """Save the fold of every sample as ``key,label,fold_id`` CSV.

    ``fold_id`` is the API's 0-based id (:func:`stratified_folds`); reports, logs and the
    ``fold`` column of a CV's ``predictions.csv`` number the same folds 1..k (id + 1).
    """
    path = Path(path)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["key", "label", "fold_id"])
        w.writerows(zip(keys, labels, np.asarray(folds).tolist(), strict=True))
    return path


def read_folds(path: PathLike, keys: Sequence[str] | None = None) -> np.ndarray:
    """Fold ids ``0..k-1`` from a ``folds.csv``, in file order or in the order of ``keys``
    (files written before the column was named ``fold_id`` call it ``fold``, also 0-based)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    col = next((c for c in ("fold_id", "fold") if rows and c in rows[0]), None)
    if col is None or "key" not in rows[0]:
        raise ValueError(f"{path} is not a folds file: expected the columns key,label,fold_id")
    try:
        fold = {r["key"]: int(r[col]) for r in rows}
    except ValueError as e:
        raise ValueError(f"{path} has a fold id that is not an integer: {e}") from e
    if keys is None:
        return np.array([int(r[col]) for r in rows], np.int64)
    missing = [k for k in keys if k not in fold]
    if missing:
        raise ValueError(f"{path} has no fold for {len(missing)} keys, e.g. {missing[:3]}: "
                         f"it was written for another store")
    return np.array([fold[k] for k in keys], np.int64)


def cross_validate(
    estimator: Any,
    X: np.ndarray,
    y: Sequence[Any],
    k: int = 10,
    seed: int = 0,
    classes: Sequence[Any] | None = None,
    folds: np.ndarray | None = None,
    progress: bool = False,
    views: np.ndarray | None = None,
) -> CVResult:
    """Stratified k-fold CV of an estimator (a head or any scikit-learn classifier).

    Parameters
    ----------
    estimator : an unfitted estimator (cloned per fold) or a zero-argument factory returning one.
        Each fold's estimator sees only that fold's training rows; a head that selects
        hyper-parameters carves its validation split from them, never from the test fold.
    X : (n_samples, dim) vectors. y : (n_samples,) labels (ints or names), passed to ``fit`` as is.
    classes : every label in report order (default: sorted unique ``y``).
    folds : (n_samples,) fold ids to reuse; default :func:`stratified_folds(y, k, seed)`.
    progress : show a progress bar over folds.
    views : (n_samples, K, dim) augmented views (``encode --views K``): each fold's estimator is
        fitted with ``views=`` its training rows' views (a head with ``use_views=True``); the test
        fold is scored on its plain vectors only.
    """
    X, y = np.asarray(X), np.asarray(y)
    classes = list(np.unique(y)) if classes is None else list(classes)
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({str(v) for v in y if v not in index})
    if unknown:
        raise ValueError(f"labels {unknown} are not in classes {classes}")
    y_idx = np.array([index[v] for v in y], np.int64)
    folds = stratified_folds(y, k, seed) if folds is None else np.asarray(folds, np.int64)
    if folds.shape != y.shape:
        raise ValueError(f"folds has shape {folds.shape}; expected {y.shape}, one fold id per sample")
    k = int(folds.max()) + 1
    make = estimator if callable(estimator) and (isinstance(estimator, type) or not hasattr(estimator, "fit")) \
        else (lambda: clone(estimator))
    y_pred = np.empty(len(y), np.int64)
    y_score = np.zeros((len(y), len(classes)))
    has_proba, reports = True, []
    from tqdm.auto import tqdm

    for f in tqdm(range(k), desc=f"{k}-fold CV", unit="fold", disable=not progress):
        train, test = folds != f, folds == f
        est = make().fit(X[train], y[train]) if views is None else make().fit(X[train], y[train], views=views[train])
        y_pred[test] = [index[v] for v in est.predict(X[test])]
        if has_proba and hasattr(est, "predict_proba"):
            y_score[np.ix_(test, [index[c] for c in est.classes_])] = est.predict_proba(X[test])
        else:
            has_proba = False
        reports.append(classification_report(y_idx[test], y_pred[test], [str(c) for c in classes],
                                             y_score[test] if has_proba else None))
        logger.info("fold %d/%d: accuracy %.4f", f + 1, k, reports[-1]["accuracy"])
    names = [str(c) for c in classes]
    pooled = classification_report(y_idx, y_pred, names, y_score if has_proba else None)
    summary = summarize_folds(reports, pooled)
    summary["seed"] = seed
    if has_proba:  # how far the out-of-fold probabilities are from what they claim
        cal = calibration_of(y_idx, y_score, names, probabilities="each fold model's predict_proba",
                             computed="out of fold")
        if cal is not None:
            summary["calibration"] = cal
    return CVResult(k, seed, names, folds, y_idx, y_pred, y_score if has_proba else None, reports, summary)
