"""Every way a store file gets written besides the encode stream: from arrays, with added prompt
sets, and by joining shards (over the shard files, :mod:`clip_heads.virtual`, or copying them). None edits a store in place: each builds a new file beside its
destination in a child process (:func:`write_isolated`; HDF5 cannot survive its own failed writes)
and renames it over the old one, holding the destination's writer lock.

The encode stream itself is :mod:`clip_heads.journal`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import h5py
import numpy as np

from .fsutil import exclusive_lock, remove_stale_siblings
from .integrity import DIGEST_ATTR, digest_update, string_digest
from .schema import (
    LIBVER,
    PromptSet,
    StoreError,
    check_prompt_set,
    create_layout,
    extras_spec,
    library_versions,
    now,
    write_isolated,
    write_prompt_set,
)
from .store import FeatureStore

logger = logging.getLogger(__name__)

_BLOCK_ROWS = 8192


def add_prompt_sets(path: str | os.PathLike, prompt_sets: Iterable[PromptSet], overwrite: bool = False) -> None:
    """Add prompt sets to a complete store without touching its images.

    The sets are written into a copy that replaces the store in one rename, under the store's
    writer lock: a crash leaves the store as it was, a concurrent writer is refused at once."""
    path = Path(path)
    sets = list(prompt_sets)
    with exclusive_lock(path, "adding prompt sets", reentrant=True):
        with FeatureStore(path) as s:  # validates: exists, is a sound, complete store
            dim, existing = s.dim, set(s.prompt_sets())
        names = [ps.name for ps in sets]
        for ps in sets:
            check_prompt_set(ps, dim)
        dup = sorted({n for n in names if names.count(n) > 1})
        clash = sorted(existing & set(names)) if not overwrite else []
        if dup or clash:
            raise StoreError(f"prompt set {(dup or clash)[0]!r} already exists in {path}; pick another --name or pass --overwrite")
        remove_stale_siblings(path)
        write_isolated(_copy_with_prompts, path, path, sets, overwrite, what=f"adding prompt sets to {path}")


def _copy_with_prompts(tmp: Path, path: Path, sets: list[PromptSet], overwrite: bool) -> None:
    shutil.copyfile(path, tmp)
    with h5py.File(tmp, "a", locking=False) as f:
        for ps in sets:
            write_prompt_set(f, ps, overwrite=overwrite)


def write_store(
    path: str | os.PathLike,
    X: np.ndarray,
    y: Sequence[int] | None = None,
    classes: Sequence[str] | None = None,
    *,
    keys: Sequence[str] | None = None,
    model_id: str = "unknown",
    model_hash: str | None = None,
    normalized: bool | None = None,
    dtype: str = "float32",
    extras: Mapping[str, np.ndarray] | None = None,
    extras_columns: Mapping[str, list[str]] | None = None,
    prompt_sets: Iterable[PromptSet] = (),
    source: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a complete store from arrays a user already has.

    Parameters
    ----------
    X : (n_samples, dim) embeddings.
    y : (n_samples,) integer labels into ``classes`` (or -1 for unlabelled); default all -1.
    classes : class names; default ``class_0..`` up to ``max(y)``.
    keys : one stable string id per row; default ``"0", "1", ...``.
    normalized : whether rows are L2-normalised; detected from the data by default.
    model_hash : the weights' hash if known; by default ``"declared:<model_id>"``, which says the
        model is the writer's word, not a measured identity.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D (n_samples, dim); got shape {X.shape}")
    n = len(X)
    y = np.full(n, -1, np.int64) if y is None else np.asarray(y, np.int64)
    if y.shape != (n,):
        raise ValueError(f"y has shape {y.shape}; expected ({n},) to match X")
    if classes is None:
        classes = [f"class_{i}" for i in range(int(y.max()) + 1 if n and y.max() >= 0 else 0)]
    if n and (y.max() >= len(classes) or y.min() < -1):
        bad = int(y.max()) if y.max() >= len(classes) else int(y.min())
        raise ValueError(f"label {bad} is out of range for {len(classes)} classes (valid: -1..{len(classes) - 1})")
    keys = [str(i) for i in range(n)] if keys is None else [str(k) for k in keys]
    if len(keys) != n or len(set(keys)) != n:
        raise ValueError(f"keys must be {n} unique strings; got {len(keys)} with {len(set(keys))} unique")
    if normalized is None:
        normalized = bool(n) and bool(np.allclose(np.linalg.norm(X.astype(np.float32), axis=1), 1.0, atol=1e-3))
    extras = {k: np.asarray(v) for k, v in (extras or {}).items()}
    for k, v in extras.items():
        if len(v) != n:
            raise ValueError(f"extra column {k!r} has {len(v)} rows; expected {n}")
    sets = list(prompt_sets)
    for ps in sets:
        check_prompt_set(ps, X.shape[1])
    attrs = {
        "model_id": model_id,
        "model_hash": model_hash or f"declared:{model_id}",
        "normalized": bool(normalized),
        "preprocess": {},
        "versions": library_versions(),
        "source": dict(source or {"format": "arrays"}),
        "source_fingerprint": "",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(path, "write_store"):
        layout = dict(dim=X.shape[1], classes=list(classes), dtype=dtype, extras=extras_spec(extras, extras_columns), attrs=attrs)
        write_isolated(_write_arrays, path, layout, X, y, keys, extras, sets, what=f"writing {path}")
    return path


def _write_arrays(tmp: Path, layout: dict, X, y, keys, extras, sets) -> None:
    n = len(X)
    with h5py.File(tmp, "w", libver=LIBVER, locking=False) as f:
        create_layout(f, rows=n, **layout)
        g = f["images"]
        g["embeds"][:] = X.astype(layout["dtype"])
        g["keys"][:] = np.array(keys, dtype=object)
        g["keys"].attrs[DIGEST_ATTR] = string_digest(keys)
        g["labels"][:] = y
        for k, v in extras.items():
            d = g[f"extras/{k}"]
            if h5py.check_string_dtype(d.dtype):
                d[:] = np.asarray([str(s) for s in v], dtype=object)
                d.attrs[DIGEST_ATTR] = string_digest(str(s) for s in v)
            else:
                d[:] = v
        for name in ("keys", "reasons"):
            f[f"skipped/{name}"].attrs[DIGEST_ATTR] = string_digest([])
        f["progress"][:] = [n, n, 0]
        for ps in sets:
            write_prompt_set(f, ps)
        f.attrs["complete"] = True
        f.attrs["completed"] = now()

# ---------------------------------------------------------------------------------------
# Shards
# ---------------------------------------------------------------------------------------
def merge_stores(out: str | os.PathLike, shards: Sequence[str | os.PathLike], overwrite: bool = False,
                 copy: bool = False) -> Path:
    """Join the shard stores of one encode (``encode --shard I/N``) into one store.

    Shards must come from the same model, source and settings, and be ``0/N .. N-1/N`` each once;
    the result lists images in source order. By default the merged store's rows are HDF5 virtual
    datasets over the shard files (no vector is copied; :mod:`clip_heads.virtual`), named
    relative to ``out``'s folder so the set moves as a folder; ``copy=True`` copies every row
    into a self-contained file instead, a chunk at a time.
    """
    out = Path(out)
    for p in shards:
        if Path(p).resolve() == out.resolve() or (out.exists() and os.path.samefile(p, out)):
            raise ValueError(f"the merged store {out} is also one of the shards ({p}); write it to another path")
    with exclusive_lock(out, "merge"):
        if out.exists() and not overwrite:
            raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
        stores = [FeatureStore(p) for p in shards]
        try:
            first = stores[0].attrs if stores else {}
            n_total = first.get("shard_count")
            found = sorted(int(s.attrs.get("shard_index", -1)) for s in stores)
            if not stores or n_total is None or found != list(range(int(n_total))):
                raise StoreError(f"need every shard 0..N-1 of one encode exactly once; got shard indices {found} of {n_total}")
            # How the vectors were computed must be one thing for the whole store: a store from
            # before the decode paths decoded exact.
            how = {"decode": "exact"}
            for s in stores[1:]:
                for k in ("model_id", "model_hash", "source_fingerprint", "normalized", "dtype", "dim", "shard_count",
                          "features", "views", "precision", "decode"):
                    mine, theirs = s.attrs.get(k) or how.get(k), first.get(k) or how.get(k)
                    if str(mine) != str(theirs):
                        raise StoreError(f"{s.path} has {k}={mine!r} but {stores[0].path} has {theirs!r}")
            stores.sort(key=lambda s: int(s.attrs["shard_index"]))
            paths = [s.path for s in stores]
        finally:
            for s in stores:
                s.close()
        remove_stale_siblings(out)
        build = _merge_into if copy else _merge_virtual
        write_isolated(build, out, paths, out, what=f"merging into {out}")
        return out


def block_rows(f: h5py.File, names: list[str], budget: int = 64 << 20) -> int:
    """Rows copied per block: up to 8192, fewer when a row is wide (a row of K views), so a
    block of every column stays within ``budget`` bytes."""
    row = sum(int(np.prod(f[n].shape[1:], dtype=np.int64)) * max(1, f[n].dtype.itemsize) for n in names)
    return max(1, min(_BLOCK_ROWS, budget // max(1, row)))


def _merged_attrs(s0: FeatureStore) -> dict:
    out = {k: v for k, v in s0.attrs.items() if k not in ("shard_index", "shard_count", "complete", "completed", "store_id",
                                                        "schema_version", "dim", "dtype", "merged_from",
                                                        "virtual_sources", "virtual_shards")}
    proj = s0.projection()  # a dataset, not an attribute: create_layout writes it back as /projection
    if proj is not None:
        out["projection_weight"] = proj
    return out


def _finish_merge(f: h5py.File, s0: FeatureStore, paths: list[Path], rows: int, skipped: int) -> None:
    f["progress"][:] = [rows + skipped, rows, skipped]
    for name in s0.prompt_sets():
        write_prompt_set(f, s0.prompt_set(name))
    if s0.attrs.get("default_prompts"):
        f.attrs["default_prompts"] = s0.attrs["default_prompts"]
    f.attrs["merged_from"] = json.dumps([str(p) for p in paths])
    f.attrs["complete"] = True
    f.attrs["completed"] = now()


def _write_skips(f: h5py.File, stores: list[FeatureStore], hashes: dict) -> None:
    skips = [kr for s in stores for kr in s.skipped()]
    for i, name in enumerate(("skipped/keys", "skipped/reasons")):
        values = [kr[i] for kr in skips]
        if values:
            f[name][:] = np.array(values, dtype=object)
        hashes[name] = hashlib.sha256()
        digest_update(hashes[name], values)


def _merge_virtual(tmp: Path, paths: list[Path], out: Path) -> None:
    """The merged store as virtual datasets over the shards' rows (built at ``tmp``, a sibling of ``out``)."""
    from .virtual import PARTS_ATTR, SHARDS_ATTR, layout_over, relative_name

    stores = [FeatureStore(p) for p in paths]
    files = [h5py.File(p, "r", locking=False) for p in paths]
    try:
        s0 = stores[0]
        extras = s0.extras_layout()
        rows, skipped = sum(len(s) for s in stores), sum(s.progress["skipped"] for s in stores)
        # Virtual datasets where the rows lie (the pre-projection link stays a link to its new target)
        names = ["images/embeds", "images/keys", "images/labels"] + [FeatureStore.extra_dataset(e) for e in extras]
        for p, g in zip(paths, files, strict=True):
            if "virtual_sources" in g.attrs:  # a store over other files is not a shard
                raise StoreError(f"{p} is itself a merged store over shard files; merge the shards it lists")
        rels = [relative_name(p, out) for p in paths]
        with h5py.File(tmp, "w", libver=LIBVER, locking=False) as f:
            create_layout(f, dim=s0.dim, classes=s0.classes, dtype=str(s0.attrs["dtype"]), extras=extras,
                          attrs=_merged_attrs(s0), rows=0, skipped=skipped)
            for name in names:  # the empty row datasets create_layout made give way to virtual ones
                attrs = dict(f[name].attrs)
                del f[name]
                layout, parts = layout_over([(rel, g[name]) for rel, g in zip(rels, files, strict=True)], name)
                d = f.create_virtual_dataset(name, layout)
                for k, v in attrs.items():
                    d.attrs[k] = v
                if h5py.check_string_dtype(d.dtype):
                    d.attrs[PARTS_ATTR] = json.dumps([[n, str(h) if h is not None else None] for n, h in parts])
            hashes: dict = {}
            _write_skips(f, stores, hashes)
            for name, h in hashes.items():
                f[name].attrs[DIGEST_ATTR] = h.hexdigest()
            f.attrs["virtual_sources"] = json.dumps(rels)
            f.attrs[SHARDS_ATTR] = json.dumps([
                {"file": rel, "rows": len(s), "skipped": s.progress["skipped"], "created": str(s.attrs.get("created")),
                 "store_id": str(s.attrs.get("store_id", ""))}
                for rel, s in zip(rels, stores, strict=True)])
            _finish_merge(f, s0, paths, rows, skipped)
    finally:
        for s in stores:
            s.close()
        for g in files:
            g.close()


def _merge_into(tmp: Path, paths: list[Path], out: Path) -> None:
    """The merged store with every row copied, a block at a time."""
    stores = [FeatureStore(p) for p in paths]
    try:
        s0 = stores[0]
        attrs = _merged_attrs(s0)
        extras = s0.extras_layout()
        rows, skipped = sum(len(s) for s in stores), sum(s.progress["skipped"] for s in stores)
        with h5py.File(tmp, "w", libver=LIBVER, locking=False) as f:
            create_layout(f, dim=s0.dim, classes=s0.classes, dtype=str(s0.attrs["dtype"]), extras=extras,
                          attrs=attrs, rows=rows, skipped=skipped)
            names = ["images/embeds", "images/keys", "images/labels"] + [f"images/extras/{e}" for e in extras]
            hashes = {n: hashlib.sha256() for n in names if h5py.check_string_dtype(f[n].dtype)}
            at, step = 0, block_rows(f, names)
            for s in stores:
                n = len(s)
                for a in range(0, n, step):
                    b = min(n, a + step)
                    for name in names:
                        values = s.rows(name, a, b)
                        f[name][at + a:at + b] = values
                        if name in hashes:
                            digest_update(hashes[name], values)
                at += n
            _write_skips(f, stores, hashes)
            for name, h in hashes.items():
                f[name].attrs[DIGEST_ATTR] = h.hexdigest()
            _finish_merge(f, s0, paths, rows, skipped)
    finally:
        for s in stores:
            s.close()
