"""``clip-heads verify STORE``: read every chunk of a store and check it whole.

:func:`verify_store` checks what opening checks (:func:`clip_heads.integrity.structure_problems`)
and reads every chunk of every dataset, so damage anywhere - a flipped bit under Fletcher-32, a
string column whose sha256 no longer matches, vectors that are not finite or not unit length
where the store says normalised - is reported with its dataset and rows before a reader meets
it. An encode's ``.partial`` journal is checked record by record (:mod:`clip_heads.journal`), a
merged store over shard files shard by shard (:mod:`clip_heads.virtual`).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from .integrity import DIGEST_ATTR, Problem, bad_chunk_rows, digest_update, structure_problems
from .journal import is_journal, journal_problems
from .virtual import shard_file, shards_of, source_problems

__all__ = ["VerifyReport", "verify_store"]


@dataclass
class VerifyReport:
    """What :func:`verify_store` found. ``ok`` when there is no problem."""

    path: Path
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checksums: bool = False
    datasets: int = 0
    rows: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def text(self) -> str:
        lines = [f"{self.path}: {'ok' if self.ok else f'{len(self.problems)} problem(s)'} "
                 f"({self.rows} rows, {self.datasets} datasets read, "
                 f"{'checksums: Fletcher-32 + sha256' if self.checksums else 'no checksums'})"]
        lines += [f"  {p}" for p in self.problems] + [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def verify_store(path: str | os.PathLike) -> VerifyReport:
    """Read every chunk of a store (or an encode's ``.partial`` journal) and check it whole."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"store not found: {path}")
    rep = VerifyReport(path)
    if is_journal(path):
        rows, problems, notes = journal_problems(path)
        rep.rows, rep.problems, rep.notes, rep.checksums, rep.datasets = rows, problems, notes, True, 1
        return rep
    try:
        f = h5py.File(path, "r", locking=False)
    except OSError as e:
        rep.problems.append(Problem(str(path), f"cannot be opened as HDF5 ({str(e).splitlines()[0]})"))
        return rep
    with f:
        if "schema_version" not in f.attrs:
            rep.problems.append(Problem("/", "has no schema_version attribute: not a clip-heads store"))
            return rep
        rep.problems += structure_problems(f, path)
        if any("external" in p.message or "virtual" in p.message for p in rep.problems):
            return rep  # nothing is read from a file that points elsewhere
        virtual = "virtual_shards" in f.attrs  # a merged store over shard files: each shard is verified whole
        if "virtual_sources" in f.attrs:
            missing = source_problems(f, path)
            if missing:
                rep.problems += [Problem("/", m) for m in missing]
                return rep
            for r in shards_of(f):
                with h5py.File(shard_file(path, r), "r", locking=False) as g:
                    nested = "virtual_sources" in g.attrs
                if nested:  # merges refuse to build these; one made by hand could loop forever
                    rep.problems.append(Problem(r["file"], "is itself a store over other files; a shard holds its own rows"))
                    continue
                sub = verify_store(shard_file(path, r))
                rep.problems += [Problem(f"{r['file']}:{p.dataset}", p.message, p.rows) for p in sub.problems]
                rep.notes += [f"{r['file']}: {n}" for n in sub.notes]
                rep.datasets += sub.datasets
            if virtual:
                rep.notes.append(f"a merged store over {len(shards_of(f))} shard files, each verified")
        if not f.attrs.get("complete", False):
            rep.notes.append("the store is marked incomplete")
        datasets: list[h5py.Dataset] = []
        f.visititems(lambda _, obj: datasets.append(obj) if isinstance(obj, h5py.Dataset) else None)
        unchecked = []
        for d in datasets:
            if d.is_virtual and virtual:
                continue  # its rows are the shards', verified above
            rep.datasets += 1
            rep.problems += _read_all(d)
            if h5py.check_string_dtype(d.dtype) is None and not d.fletcher32 and d.name != "/progress":
                unchecked.append(d.name)
            if h5py.check_string_dtype(d.dtype) is not None and DIGEST_ATTR not in d.attrs:
                unchecked.append(d.name)
        if "images/embeds" in f:
            rep.rows = int(f["images/embeds"].shape[0])
            if not virtual:
                rep.problems += _vector_problems(f)
        rep.checksums = not unchecked
        if unchecked:
            rep.notes.append(f"{len(unchecked)} datasets carry no checksum (written by an older clip-heads), e.g. "
                             f"{unchecked[0]}: damage there is found only where it breaks a count, a range or a norm")
    return rep


def _read_all(d: h5py.Dataset) -> list[Problem]:
    out = [Problem(d.name, "fails its checksum or cannot be read", rows) for rows in bad_chunk_rows(d)]
    if not out and h5py.check_string_dtype(d.dtype) is not None and DIGEST_ATTR in d.attrs:
        h = hashlib.sha256()
        step = d.chunks[0] if d.chunks else max(1, d.shape[0])
        for a in range(0, d.shape[0], step):
            digest_update(h, d[a:a + step])
        if h.hexdigest() != str(d.attrs[DIGEST_ATTR]):
            out.append(Problem(d.name, "does not match its sha256 checksum (a string was changed)"))
    return out


def _vector_problems(f: h5py.File) -> list[Problem]:
    out = _rows_problems(f["images/embeds"], bool(f.attrs.get("normalized", False)))
    if isinstance(f.get("images/pre_embeds"), h5py.Dataset):  # never normalised
        out += _rows_problems(f["images/pre_embeds"], False)
    views, pre_views = f.get("images/views"), f.get("images/pre_views")
    if isinstance(views, h5py.Dataset):  # (N, K, D): normalised like the embeds, every view of a row checked
        out += _views_shape(views, f["images/embeds"].shape[1], "the store's dim")
        out += _rows_problems(views, bool(f.attrs.get("normalized", False)))
    if isinstance(pre_views, h5py.Dataset):
        pre = f.get("images/pre_embeds")
        out += _views_shape(pre_views, pre.shape[1] if isinstance(pre, h5py.Dataset) else None, "pre_embeds' width")
        if isinstance(views, h5py.Dataset) and views.ndim == 3 and pre_views.ndim == 3 and pre_views.shape[1] != views.shape[1]:
            out.append(Problem(pre_views.name, f"has {pre_views.shape[1]} views per image but /images/views has "
                                               f"{views.shape[1]}"))
        out += _rows_problems(pre_views, False)
    return out


def _views_shape(d: h5py.Dataset, dim: int | None, what: str) -> list[Problem]:
    if d.ndim != 3 or d.shape[1] < 1 or (dim is not None and d.shape[2] != dim):
        return [Problem(d.name, f"has shape {d.shape}; expected (rows, K >= 1, {dim if dim is not None else 'dim'}) "
                                f"with {what}")]
    return []


def _rows_problems(d: h5py.Dataset, normalized: bool) -> list[Problem]:
    out: list[Problem] = []
    step = d.chunks[0] if d.chunks else max(1, d.shape[0])
    for a in range(0, d.shape[0], step):
        try:
            x = d[a:a + step].astype(np.float32)
        except OSError:
            continue  # reported as unreadable already
        x = x.reshape(len(x), -1, x.shape[-1])  # (rows, vectors per row, dim): embeds have one, views K
        bad = ~np.isfinite(x).all(axis=(1, 2))
        if normalized:
            bad |= (np.abs(np.linalg.norm(np.nan_to_num(x), axis=2) - 1.0) > 1e-2).any(axis=1)
        if bad.any():
            i = np.flatnonzero(bad)
            out.append(Problem(d.name, f"has {len(i)} vectors that are {'not finite or not unit length' if normalized else 'not finite'} "
                                       f"(first at row {a + int(i[0])})", (a + int(i[0]), a + int(i[-1]) + 1)))
    return out
