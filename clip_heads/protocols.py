"""The evaluation protocols of the literature: which rows train and which rows test.

* :func:`store_split` - a dataset's official split from a store's ``split`` extra column
  (EmoSet's train/val/test lists, a source that records one), else a seeded stratified split
  that the caller records beside its results;
* :func:`fi_split` - the seeded 80/5/15 train/val/test split the FI papers use;
* :func:`sample_shots` - the few-shot protocol of CoOp / Tip-Adapter: K images per class drawn
  from the training rows, by seed alone, so every head at a (seed, K) sees the same images.

5-fold CV for the small art datasets is :func:`clip_heads.crossval.stratified_folds` with ``k=5``.
Nothing here ever looks at a test row's vector: splits and samples depend on labels, the split
column and the seed only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from clip_heads.errors import BadValueError

__all__ = ["Split", "store_split", "fi_split", "stratified_split", "sample_shots", "ShotsError", "SPLIT_COLUMN"]

SPLIT_COLUMN = "split"
TRAIN, VAL, TEST = "train", "val", "test"


class ShotsError(BadValueError):
    """More shots asked for than a class has training images (a bad value: exit 2)."""


@dataclass(frozen=True)
class Split:
    """Row indices of the training and test parts (and validation, when the protocol has one)."""

    train: np.ndarray
    test: np.ndarray
    val: np.ndarray
    source: str  # "store split column" or "seeded stratified split (test 30%, seed 0)"

    def labels(self, n: int) -> np.ndarray:
        """One of ``train``, ``val``, ``test`` or ``""`` per row: the split as a column to record."""
        out = np.full(n, "", dtype=object)
        out[self.train], out[self.val], out[self.test] = TRAIN, VAL, TEST
        return out


def stratified_split(y: np.ndarray, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Seeded stratified parts of the rows, one per fraction (they sum to 1): each class's rows
    are shuffled and cut at the cumulative fractions, so every part holds every class in
    proportion (a class too small for a part gives it nothing)."""
    y = np.asarray(y)
    if not np.isclose(sum(fractions), 1.0) or min(fractions) < 0:
        raise ValueError(f"split fractions must be non-negative and sum to 1, got {list(fractions)}")
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    for c in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == c))
        cuts = np.round(np.cumsum(fractions)[:-1] * len(rows)).astype(int)
        for i, chunk in enumerate(np.split(rows, cuts)):
            parts[i].append(chunk)
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, int) for p in parts]


def store_split(y: np.ndarray, split_column: np.ndarray | None, seed: int = 0,
                test_fraction: float = 0.3) -> Split:
    """The store's own split when it has one with training and test rows, else a seeded stratified one.

    ``split_column``: the store's ``split`` extra (strings ``train``/``val``/``test``), or None.
    """
    if not 0 < test_fraction < 1:
        raise BadValueError(f"test fraction must be in (0, 1), got {test_fraction}")
    if split_column is not None:
        col = np.asarray([str(v).strip().lower() for v in split_column])
        found = set(col.tolist())
        if TRAIN in found and TEST in found:
            return Split(np.flatnonzero(col == TRAIN), np.flatnonzero(col == TEST), np.flatnonzero(col == VAL),
                         "store split column")
        unknown = sorted(found - {TRAIN, VAL, TEST})
        raise BadValueError(f"the store's split column has {sorted(found)}; a protocol split needs both 'train' and "
                            f"'test' rows" + (f" (unknown values {unknown})" if unknown else ""))
    train, test = stratified_split(y, [1 - test_fraction, test_fraction], seed)
    return Split(train, test, np.zeros(0, int),
                 f"seeded stratified split (test {test_fraction:.0%}, seed {seed})")


def fi_split(y: np.ndarray, seed: int = 0) -> Split:
    """FI's protocol: a seeded stratified 80/5/15 train/val/test split."""
    train, val, test = stratified_split(y, [0.80, 0.05, 0.15], seed)
    return Split(train, test, val, f"seeded stratified 80/5/15 split (seed {seed})")


def sample_shots(y: np.ndarray, pool: np.ndarray, shots: int | str, seed: int,
                 class_names: Sequence[Any] | None = None) -> np.ndarray:
    """Sorted row indices of ``shots`` images per class drawn from rows ``pool`` (``"all"``: all of them).

    Depends only on ``(y[pool], shots, seed)``: every head at a (seed, shots) gets the same rows.
    Classes are drawn independently (class c from a generator seeded by ``(seed, c)``), so adding
    a class changes no other class's sample. :class:`ShotsError` names a class with fewer rows.
    """
    pool = np.asarray(pool)
    if isinstance(shots, str):
        if shots != "all":
            raise BadValueError(f"shots must be a positive integer or 'all', got {shots!r}")
        return np.sort(pool)
    if int(shots) < 1:
        raise BadValueError(f"shots must be a positive integer or 'all', got {shots!r}")
    y_pool = np.asarray(y)[pool]
    out = []
    for c in np.unique(y_pool):
        rows = pool[y_pool == c]
        if len(rows) < shots:
            name = class_names[c] if class_names is not None else c
            raise ShotsError(f"{shots} shots asked for, but class {name!r} has only {len(rows)} training images")
        out.append(np.random.default_rng([int(seed), int(c)]).choice(rows, int(shots), replace=False))
    return np.sort(np.concatenate(out))
