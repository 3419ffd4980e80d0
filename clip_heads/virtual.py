"""Stores over shard files: a merged store whose rows are HDF5 virtual datasets, no vector copied.

``merge_stores(out, shards)`` (:mod:`clip_heads.writer`) writes ``/images/embeds``, ``keys``,
``labels`` and every extra as virtual datasets mapping each shard's rows in shard order; the
small datasets (classes, skipped images, prompt sets, progress) are copied. The shards are named
by their paths relative to the merged file's folder, so the folder can be moved or copied as a
whole. Two root attributes describe them:

* ``virtual_sources``: the JSON list of those file names, the only files the store may read
  (:func:`clip_heads.integrity.structure_problems` refuses a link to any other);
* ``virtual_shards``: per shard its file, rows, skipped count, ``created`` stamp and keys digest.

Opening such a store checks the shards are all there and are the ones merged (their ``created``
stamps and row counts), and refuses otherwise naming them: HDF5 itself would read a missing
shard's rows as zeros and empty strings. A string column's digest is kept per shard
(``sha256_parts``, the shards' own digests), so reading keys checks them without the merge ever
reading them. ``verify`` verifies every shard in full.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

import h5py

from .integrity import DIGEST_ATTR, string_digest
from .schema import StoreError

PARTS_ATTR = "sha256_parts"  # JSON [[rows, digest or null], ...] of a virtual string dataset
SHARDS_ATTR = "virtual_shards"


class MissingShardsError(StoreError):
    """A virtual store's shard files are missing or are not the ones merged."""


def is_virtual(f: h5py.File) -> bool:
    return "virtual_sources" in f.attrs


def shards_of(f: h5py.File) -> list[dict[str, Any]]:
    """The shard records of a virtual store (``[]`` for any other)."""
    raw = f.attrs.get(SHARDS_ATTR)
    if raw is None:
        return []
    try:
        rec = json.loads(raw)
    except (TypeError, ValueError):
        return []
    return [r for r in rec if isinstance(r, dict) and isinstance(r.get("file"), str)] if isinstance(rec, list) else []


def shard_file(store: Path, rec: dict) -> Path:
    """Where a shard lies: its name is relative to the merged store's folder (as HDF5 reads it)."""
    return Path(store).parent / rec["file"]


def source_problems(f: h5py.File, path: Path) -> list[str]:
    """What is wrong with the shards of a virtual store: missing files, files that are not the
    shard merged (another ``created`` stamp, another row count), each naming the file."""
    declared = set()
    try:
        declared = set(json.loads(f.attrs["virtual_sources"]))
    except (TypeError, ValueError):
        return ["its virtual_sources attribute is not a JSON list of file names"]
    recs = shards_of(f)
    if SHARDS_ATTR not in f.attrs:  # declared by hand, not by a merge: the files must be there
        recs = [{"file": str(n)} for n in sorted(declared)]
    elif {r["file"] for r in recs} != declared:
        return [f"its {SHARDS_ATTR} attribute does not describe the files virtual_sources declares"]
    missing, changed = [], []
    for r in recs:
        p = shard_file(path, r)
        if not p.is_file():
            missing.append(str(p))
            continue
        if "created" not in r:
            continue
        try:
            with h5py.File(p, "r", locking=False) as g:
                created = str(g.attrs.get("created"))
                store_id = str(g.attrs.get("store_id", ""))
                rows = int(g["images/embeds"].shape[0]) if "images/embeds" in g else -1
        except OSError as e:
            changed.append(f"{p} (cannot be opened: {str(e).splitlines()[0]})")
            continue
        if created != str(r.get("created")) or rows != int(r.get("rows", -1)) or (
                "store_id" in r and store_id != str(r["store_id"])):
            changed.append(f"{p} (created {created}, id {store_id or '-'}, {rows} rows; the merge read created "
                           f"{r.get('created')}, id {r.get('store_id') or '-'}, {r.get('rows')} rows)")
    out = []
    if missing:
        out.append(f"{len(missing)} of its {len(recs)} shard files are missing: {', '.join(missing[:5])}"
                   + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    if changed:
        out.append(f"{len(changed)} shard files are not the ones merged: {'; '.join(changed[:3])}"
                   + (" ..." if len(changed) > 3 else ""))
    return out


def check_sources(f: h5py.File, path: Path) -> None:
    """Refuse a virtual store whose shards are missing or changed, naming them."""
    problems = source_problems(f, path)
    if problems:
        raise MissingShardsError(f"{path} is a merged store over shard files, and {'; '.join(problems)}; put the shards "
                                 f"back beside it (they move with it as a folder) or merge again")


def sources_checksummed(f: h5py.File, path: Path) -> bool:
    """Whether every shard's vectors carry per-chunk checksums (read through the virtual rows)."""
    for r in shards_of(f):
        try:
            with h5py.File(shard_file(path, r), "r", locking=False) as g:
                if not g["images/embeds"].fletcher32:
                    return False
        except (OSError, KeyError):
            return False
    return bool(shards_of(f))


def parts_match(values: Iterable, parts_attr: Any) -> bool:
    """Whether the values of a virtual string dataset match its shards' digests, part by part."""
    values = list(values)
    try:
        parts = json.loads(parts_attr)
    except (TypeError, ValueError):
        return False
    at = 0
    for rows, digest in parts:
        rows = int(rows)
        if digest is not None and string_digest(values[at:at + rows]) != str(digest):
            return False
        at += rows
    return at == len(values)


def layout_over(shards: list[tuple[str, h5py.Dataset]], name: str) -> tuple[h5py.VirtualLayout, list]:
    """A virtual layout of dataset ``name`` concatenating each shard's rows, and its parts digest."""
    first = shards[0][1]
    tail, dtype = first.shape[1:], first.dtype
    total = sum(d.shape[0] for _, d in shards)
    layout = h5py.VirtualLayout(shape=(total, *tail), dtype=dtype, maxshape=(total, *tail))
    at, parts = 0, []
    for rel, d in shards:
        n = int(d.shape[0])
        if d.shape[1:] != tail or d.dtype != dtype:
            raise ValueError(f"{rel}: {name} has shape {d.shape} and type {d.dtype}; the first shard has "
                             f"(N, *{tail}) {dtype}")
        if n:
            layout[at:at + n] = h5py.VirtualSource(rel, name, shape=d.shape, dtype=dtype)
        parts.append([n, d.attrs.get(DIGEST_ATTR)])
        at += n
    return layout, parts


def relative_name(shard: Path, out: Path) -> str:
    """A shard's name relative to the merged store's folder, '/'-separated."""
    return Path(os.path.relpath(Path(shard).resolve(), Path(out).resolve().parent)).as_posix()
