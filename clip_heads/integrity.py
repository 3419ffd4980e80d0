"""Whether a store can be trusted: the checks every open makes, and the checksums they rest on.

:func:`structure_problems` is what :class:`clip_heads.store.FeatureStore` checks on open: no link
to another file (external links, virtual datasets, external storage) unless the root attribute
``virtual_sources`` (a JSON list of file names) declares it, every row dataset as long as
``/progress`` says, counts that add up, labels and prompt ids in range. :func:`clip_heads.verify.verify_store`
(``clip-heads verify STORE``) also reads every chunk of every dataset, so damage anywhere (a
flipped bit under Fletcher-32, a string column whose sha256 no longer matches, vectors that are
not finite or not unit length where the store says normalised) is reported with its dataset and
rows before a reader meets it.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import h5py
import numpy as np

DIGEST_ATTR = "sha256"
_PROMPT_FIELDS = ("texts", "embeds", "template_id", "class_id", "classes", "templates")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a store: the dataset, the rows ``[start, stop)`` when known, what."""

    dataset: str
    message: str
    rows: tuple[int, int] | None = None

    def __str__(self) -> str:
        where = f"{self.dataset} rows {self.rows[0]}-{self.rows[1] - 1}" if self.rows else self.dataset
        return f"{where} {self.message}"


def digest_update(h, values: Iterable) -> None:
    """Feed string values (str or utf-8 bytes) to a sha256: each value's bytes and a NUL."""
    parts = [v if isinstance(v, bytes) else str(v).encode("utf-8") for v in values]
    if parts:
        h.update(b"\0".join(parts) + b"\0")


def string_digest(values: Iterable) -> str:
    h = hashlib.sha256()
    digest_update(h, values)
    return h.hexdigest()


def bad_chunk_rows(d: h5py.Dataset) -> list[tuple[int, int]]:
    """Row ranges ``[start, stop)`` of the chunks of ``d`` that cannot be read (a failed
    checksum, a broken chunk index), merged where adjacent."""
    bad: list[tuple[int, int]] = []
    if d.chunks is None or d.shape[0] == 0:
        try:
            d[...]
        except OSError:
            bad.append((0, int(d.shape[0])))
        return bad
    step = d.chunks[0]
    for a in range(0, d.shape[0], step):
        b = min(d.shape[0], a + step)
        try:
            d[a:b]
        except OSError:
            if bad and bad[-1][1] == a:
                bad[-1] = (bad[-1][0], b)
            else:
                bad.append((a, b))
    return bad


def _declared_sources(f: h5py.File) -> set[str]:
    raw = f.attrs.get("virtual_sources")
    if raw is None:
        return set()
    try:
        names = json.loads(raw)
    except (TypeError, ValueError):
        return set()
    return {str(n) for n in names} if isinstance(names, list) else set()


def _walk(g: h5py.Group, declared: set[str], problems: list[Problem], depth: int = 0) -> None:
    """Check every link under ``g`` without following any to another file."""
    if depth > 8:
        problems.append(Problem(g.name, "is nested deeper than any store layout"))
        return
    for name in g:
        link = g.get(name, getlink=True)
        full = f"{g.name.rstrip('/')}/{name}"
        if isinstance(link, h5py.ExternalLink):
            if link.filename not in declared:
                problems.append(Problem(full, f"is an external link to {link.filename}:{link.path}; a store reads no "
                                              "other file unless its virtual_sources attribute lists it"))
            continue
        if isinstance(link, h5py.SoftLink):
            continue  # stays inside this file; what it points to is checked where it lives
        if not isinstance(link, h5py.HardLink):
            problems.append(Problem(full, f"is a {type(link).__name__}; a store holds only its own groups and datasets"))
            continue
        obj = g[name]
        if isinstance(obj, h5py.Group):
            _walk(obj, declared, problems, depth + 1)
        elif isinstance(obj, h5py.Dataset):
            if obj.is_virtual:
                files = sorted({vs.file_name for vs in obj.virtual_sources()} - {"."} - declared)
                if files:
                    problems.append(Problem(full, f"is a virtual dataset reading {files}; a store reads no other file "
                                                  "unless its virtual_sources attribute lists it"))
            elif obj.external:
                problems.append(Problem(full, f"keeps its data in external files {[e[0] for e in obj.external]}; "
                                              "a store keeps its data inside itself"))


def structure_problems(f: h5py.File, path: Path) -> list[Problem]:
    """What is wrong with the structure of an open store: links to other files, missing or
    misshapen datasets, row datasets whose length disagrees with the row count, counts that do
    not add up, labels and prompt ids out of range. Reads labels and prompt ids (small)."""
    problems: list[Problem] = []
    _walk(f, _declared_sources(f), problems)
    if problems:
        return problems  # nothing else is read from a file that points elsewhere
    complete = bool(f.attrs.get("complete", False))
    for name in ("classes", "images/embeds", "images/keys", "images/labels"):
        if name not in f or not isinstance(f[name], h5py.Dataset):
            problems.append(Problem(f"/{name}", "is missing"))
    if problems:
        return problems
    emb = f["images/embeds"]
    dim = f.attrs.get("dim")
    if emb.ndim != 2 or dim is None or emb.shape[1] != int(dim):
        problems.append(Problem("/images/embeds", f"has shape {emb.shape}; the store's dim attribute is {dim}"))
    if "progress" in f:
        prog = f["progress"]
        if prog.shape != (3,) or prog.dtype.kind not in "iu":
            return problems + [Problem("/progress", f"has shape {prog.shape} and type {prog.dtype}; expected 3 integers")]
        try:
            items, rows, skipped = (int(v) for v in prog[:])
        except OSError as e:
            return problems + [Problem("/progress", f"cannot be read ({e})")]
    else:  # stores written before the cursor existed: the datasets are the truth
        rows, skipped = int(emb.shape[0]), int(f["skipped/keys"].shape[0]) if "skipped/keys" in f else 0
        items = rows + skipped
    if min(items, rows, skipped) < 0 or (complete and items != rows + skipped):
        problems.append(Problem("/progress", f"says {items} items = {rows} rows + {skipped} skipped, which does not add up"))
    row_sets = ["images/embeds", "images/keys", "images/labels"]
    if isinstance(f.get("images/extras"), h5py.Group):
        row_sets += [f"images/extras/{n}" for n in f["images/extras"]]
    for name in ("images/pre_embeds", "images/views", "images/pre_views"):  # checked where their rows lie,
        if name in f:  # whatever /images/extras links to (schema 2: pre-projection features; views)
            row_sets.append(name)
    for name, want in [(n, rows) for n in row_sets] + [(n, skipped) for n in ("skipped/keys", "skipped/reasons") if n in f]:
        d = f[name]
        if not isinstance(d, h5py.Dataset) or d.ndim < 1:
            problems.append(Problem(f"/{name}", "is not a row dataset"))
            continue
        n = int(d.shape[0])
        if n != want if complete else n < want:
            problems.append(Problem(f"/{name}", f"has {n} rows but the store records {want}: its columns do not line up"))
    if problems:
        return problems
    n_classes = int(f["classes"].shape[0])
    try:
        labels = np.asarray(f["images/labels"][:rows])
    except OSError as e:
        return [Problem("/images/labels", f"cannot be read ({str(e).splitlines()[0]})")]
    bad = np.flatnonzero((labels < -1) | (labels >= n_classes))
    if len(bad):
        i = int(bad[0])
        problems.append(Problem("/images/labels", f"has value {int(labels[i])} at row {i} ({len(bad)} rows out of range); "
                                                  f"valid: -1 (unlabelled) or 0..{n_classes - 1} for the {n_classes} classes"))
    g = f.get("prompts")
    for set_name in (g if isinstance(g, h5py.Group) else []):
        problems += _prompt_problems(g[set_name], f"/prompts/{set_name}", int(emb.shape[1]))
    if "projection" in f:
        proj, pre = f["projection"], f.get("images/pre_embeds")
        want = (int(emb.shape[1]), int(pre.shape[1]) if isinstance(pre, h5py.Dataset) and pre.ndim == 2 else None)
        if not isinstance(proj, h5py.Dataset) or proj.ndim != 2 or proj.shape[0] != want[0] or (
                want[1] is not None and proj.shape[1] != want[1]):
            problems.append(Problem("/projection", f"has shape {getattr(proj, 'shape', None)}; the store's vectors need "
                                                   f"({want[0]}, {want[1] if want[1] is not None else 'pre_dim'})"))
    return problems


def _prompt_problems(g, where: str, dim: int) -> list[Problem]:
    if not isinstance(g, h5py.Group):
        return [Problem(where, "is not a prompt set group")]
    missing = [k for k in _PROMPT_FIELDS if k not in g]
    if missing:
        return [Problem(where, f"lacks {missing}")]
    n = int(g["texts"].shape[0])
    out = []
    for k in ("embeds", "template_id", "class_id"):
        if g[k].shape[0] != n:
            out.append(Problem(f"{where}/{k}", f"has {g[k].shape[0]} rows for {n} texts"))
    if g["embeds"].ndim != 2 or g["embeds"].shape[1] != dim:
        out.append(Problem(f"{where}/embeds", f"has shape {g['embeds'].shape}; the store's dim is {dim}"))
    if out:
        return out
    for k, limit in (("class_id", int(g["classes"].shape[0])), ("template_id", int(g["templates"].shape[0]))):
        try:
            ids = np.asarray(g[k][:])
        except OSError as e:
            out.append(Problem(f"{where}/{k}", f"cannot be read ({str(e).splitlines()[0]})"))
            continue
        bad = np.flatnonzero((ids < 0) | (ids >= limit))
        if len(bad):
            i = int(bad[0])
            out.append(Problem(f"{where}/{k}", f"has value {int(ids[i])} at row {i}; valid: 0..{limit - 1}"))
    return out
