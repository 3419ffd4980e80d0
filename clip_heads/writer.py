"""Writing stores as a stream: the crash-safe encode writer, and joining shard stores.

:class:`StoreWriter` appends batches to ``<store>.partial`` in HDF5's SWMR mode, where the file
stays readable up to its last flush even if the process is SIGKILLed; :meth:`StoreWriter.resume`
copies that committed prefix into a fresh partial file (a killed SWMR writer leaves the file
flagged as open) and writing goes on. :func:`merge_stores` joins the shards of one encode.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import h5py
import numpy as np

from .store import (
    _JSON_ATTRS,
    STR,
    FeatureStore,
    PromptSet,
    StoreError,
    _append,
    _create_layout,
    _write_prompt_set,
    now,
)

logger = logging.getLogger(__name__)


class StoreWriter:
    """Streams rows into ``<path>.partial`` and renames it to ``path`` once complete.

    ``StoreWriter.create`` starts a new partial file; ``StoreWriter.resume`` continues one left
    by an interrupted run. Rows are appended with :meth:`append`, unreadable items recorded with
    :meth:`skip`, and :meth:`commit` advances the resume cursor after a flush. Everything before
    the last commit survives SIGKILL.
    """

    def __init__(self, path: Path, f: h5py.File):
        self.path, self._f = path, f
        self.progress = [int(v) for v in f["progress"][:]]
        self._f.swmr_mode = True

    @staticmethod
    def partial_path(path: str | os.PathLike) -> Path:
        return Path(f"{path}.partial")

    @classmethod
    def create(cls, path, *, dim, classes, dtype="float16", extras=None, attrs=None) -> "StoreWriter":
        path = Path(path)
        part = cls.partial_path(path)
        part.parent.mkdir(parents=True, exist_ok=True)
        f = h5py.File(part, "w", libver="latest", locking=False)
        _create_layout(f, dim=dim, classes=classes, dtype=dtype, extras=extras or {}, attrs=attrs or {})
        f.flush()
        return cls(path, f)

    @classmethod
    def resume(cls, path) -> "StoreWriter":
        """Reopen an interrupted encode. A killed SWMR writer leaves the file flagged as open,
        so the committed prefix is copied into a fresh partial file and writing goes on there."""
        path = Path(path)
        part = cls.partial_path(path)
        fresh = Path(f"{part}.resume")
        with h5py.File(part, "r", swmr=True, libver="latest", locking=False) as old, h5py.File(
            fresh, "w", libver="latest", locking=False
        ) as new:
            items, rows, skipped = (int(v) for v in old["progress"][:])
            for k, v in old.attrs.items():
                new.attrs[k] = v
            new.create_dataset("classes", data=old["classes"][:], dtype=STR)
            for name in ("images/embeds", "images/keys", "images/labels", "skipped/keys", "skipped/reasons") + tuple(
                f"images/extras/{e}" for e in old.get("images/extras", {})
            ):
                d = old[name]
                n = skipped if name.startswith("skipped") else rows
                nd = new.create_dataset(name, data=d[:n], maxshape=d.maxshape, chunks=d.chunks, dtype=d.dtype)
                for k, v in d.attrs.items():
                    nd.attrs[k] = v
            new.require_group("images/extras")
            new.create_dataset("progress", data=np.array([items, rows, skipped], np.int64))
        os.replace(fresh, part)
        logger.info("resuming %s after %d items (%d rows, %d skipped)", part, items, rows, skipped)
        return cls(path, h5py.File(part, "a", libver="latest", locking=False))

    @staticmethod
    def read_partial_attrs(path) -> dict[str, Any]:
        with h5py.File(StoreWriter.partial_path(path), "r", swmr=True, libver="latest", locking=False) as f:
            return {k: (json.loads(v) if k in _JSON_ATTRS else v) for k, v in f.attrs.items()}

    def append(self, embeds: np.ndarray, keys: Sequence[str], labels: Sequence[int], extras: Mapping[str, np.ndarray] | None = None) -> None:
        g = self._f["images"]
        _append(g["embeds"], np.asarray(embeds).astype(g["embeds"].dtype))
        _append(g["keys"], list(keys))
        _append(g["labels"], np.asarray(labels, np.int64))
        for name, values in (extras or {}).items():
            _append(g[f"extras/{name}"], values)
        self.progress[1] += len(keys)

    def skip(self, key: str, reason: str) -> None:
        _append(self._f["skipped/keys"], [key])
        _append(self._f["skipped/reasons"], [reason])
        self.progress[2] += 1

    def commit(self, items_done: int) -> None:
        """Make everything appended so far durable, then move the resume cursor."""
        self._f.flush()
        self.progress[0] = items_done
        self._f["progress"][:] = np.array(self.progress, np.int64)
        self._f.flush()

    def finish(self, prompt_sets: Iterable[PromptSet] = (), default_prompts: str | None = None) -> Path:
        """Close the stream, add the prompt sets, mark complete and move into place."""
        self._f.close()
        part = self.partial_path(self.path)
        with h5py.File(part, "a", libver="latest", locking=False) as f:
            for ps in prompt_sets:
                _write_prompt_set(f, ps)
            if default_prompts:
                f.attrs["default_prompts"] = default_prompts
            f.attrs["complete"] = True
            f.attrs["completed"] = now()
        os.replace(part, self.path)
        return self.path

    def close(self) -> None:
        if self._f.id.valid:
            self._f.close()


def merge_stores(out: str | os.PathLike, shards: Sequence[str | os.PathLike], overwrite: bool = False) -> Path:
    """Concatenate the shard stores of one encode (``encode --shard I/N``) into one store.

    Shards must come from the same model, source and settings, and be ``0/N .. N-1/N`` each once;
    rows are copied in shard order, a chunk at a time, so the result lists images in source order.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    stores = [FeatureStore(p) for p in shards]
    try:
        first = stores[0].attrs if stores else {}
        n_total = first.get("shard_count")
        found = sorted(int(s.attrs.get("shard_index", -1)) for s in stores)
        if not stores or n_total is None or found != list(range(int(n_total))):
            raise StoreError(f"need every shard 0..N-1 of one encode exactly once; got shard indices {found} of {n_total}")
        for s in stores[1:]:
            for k in ("model_id", "model_hash", "source_fingerprint", "normalized", "dtype", "dim", "shard_count"):
                if str(s.attrs.get(k)) != str(first.get(k)):
                    raise StoreError(f"{s.path} has {k}={s.attrs.get(k)!r} but {stores[0].path} has {first.get(k)!r}")
        stores.sort(key=lambda s: int(s.attrs["shard_index"]))
        attrs = {k: v for k, v in stores[0].attrs.items() if k not in ("shard_index", "shard_count", "complete", "completed", "schema_version", "dim", "dtype")}
        extras = {name: (stores[0]._f[f"images/extras/{name}"].shape[1:], stores[0]._f[f"images/extras/{name}"].dtype,
                         stores[0].extra_columns(name)) for name in stores[0].extra_names()}
        tmp = Path(f"{out}.tmp")
        with h5py.File(tmp, "w", locking=False) as f:
            _create_layout(f, dim=stores[0].dim, classes=stores[0].classes, dtype=str(first["dtype"]), extras=extras, attrs=attrs)
            rows = skipped = 0
            for s in stores:
                n = len(s)
                for a in range(0, n, 8192):
                    b = min(n, a + 8192)
                    _append(f["images/embeds"], s._f["images/embeds"][a:b])
                    _append(f["images/keys"], s._f["images/keys"].asstr()[a:b])
                    _append(f["images/labels"], s._f["images/labels"][a:b])
                    for name in extras:
                        _append(f[f"images/extras/{name}"], s._f[f"images/extras/{name}"][a:b])
                for key, reason in s.skipped():
                    _append(f["skipped/keys"], [key])
                    _append(f["skipped/reasons"], [reason])
                rows, skipped = rows + n, skipped + s.progress["skipped"]
            f["progress"][:] = [rows + skipped, rows, skipped]
            for name in stores[0].prompt_sets():
                _write_prompt_set(f, stores[0].prompt_set(name))
            f.attrs["merged_from"] = json.dumps([str(s.path) for s in stores])
            f.attrs["complete"] = True
            f.attrs["completed"] = now()
        os.replace(tmp, out)
        return out
    finally:
        for s in stores:
            s.close()
