"""The HDF5 feature store: one file per (image source, model), self-describing.

Layout (schema version 1)::

    /                     attrs: schema_version, model_id, model_hash, dim, normalized, dtype,
                                 preprocess (json), versions (json), source (json),
                                 source_fingerprint, created, completed, complete
    /classes              (C,) str
    /images/embeds        (N, D) float16|float32, chunked, maxshape (None, D)
    /images/keys          (N,) str      stable id: path relative to the source root, or the dataset's id
    /images/labels        (N,) int64
    /images/extras/<name> (N, ...)      optional per-image columns (soft labels, valence, split...)
    /skipped/keys, /skipped/reasons     images that could not be read, and why
    /progress             (3,) int64    items consumed, rows written, items skipped (resume cursor)
    /prompts/<set>/texts, embeds (P, D), template_id (P,), class_id (P,), classes (C',), templates (T,)

A prompt set carries its own class list, so prompts for another label set (FI's eight emotions
queried against an Emotion6 store, say) live beside the dataset's own. Zero-shot with one
template, an ensemble, or an ablation over all templates is a slice by ``template_id``.

Encoding streams into ``<store>.partial`` in SWMR mode (:mod:`clip_heads.writer`) (always readable up to the last flush,
even after SIGKILL) and is renamed to the final path only when complete, so a file at the final
path that says ``complete`` is complete.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import h5py
import numpy as np

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
STR = h5py.string_dtype()
_JSON_ATTRS = ("preprocess", "versions", "source")
ROW_CHUNK = 1024


class StoreError(ValueError):
    """A store is missing, malformed, incomplete, or does not match what was asked."""


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def library_versions() -> dict[str, str]:
    import sklearn
    import torch
    import transformers

    from . import __version__

    return {
        "clip_heads": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "h5py": h5py.__version__,
        "numpy": np.__version__,
        "sklearn": sklearn.__version__,
    }


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


@dataclass
class PromptSet:
    """Prompt texts of one named set and their embeddings, by the store's own model."""

    name: str
    classes: list[str]
    templates: list[str]
    texts: list[str]
    embeds: np.ndarray  # (P, D) float32
    template_id: np.ndarray  # (P,) index into templates
    class_id: np.ndarray  # (P,) index into classes
    attrs: dict = field(default_factory=dict)

    def class_vectors(self, templates: Sequence[int] | None = None) -> np.ndarray:
        """Per-class prompt vectors ``(C, D)``: the renormalised mean of the normalised prompt
        vectors of each class over the chosen templates (all of them by default)."""
        keep = np.ones(len(self.texts), bool) if templates is None else np.isin(self.template_id, list(templates))
        E = l2_normalize(self.embeds[keep])
        cid = self.class_id[keep]
        out = np.zeros((len(self.classes), E.shape[1]), np.float32)
        np.add.at(out, cid, E)
        missing = [self.classes[c] for c in range(len(self.classes)) if not (cid == c).any()]
        if missing:
            raise StoreError(f"prompt set {self.name!r} has no prompt for classes {missing} with templates {templates}")
        return l2_normalize(out)


class FeatureStore:
    """Read access to a feature store. Use as a context manager or call :meth:`close`.

    Parameters
    ----------
    path : store file.
    allow_incomplete : open a store whose encode has not finished (a warning is logged);
        by default an incomplete store is refused.
    """

    def __init__(self, path: str | os.PathLike, allow_incomplete: bool = False):
        self.path = Path(path)
        if not self.path.exists():
            hint = f" (an unfinished encode is at {self.path}.partial; rerun encode to resume)" if Path(f"{self.path}.partial").exists() else ""
            raise FileNotFoundError(f"store not found: {self.path}{hint}")
        try:
            self._f = _open_read(self.path)
        except OSError as e:
            raise StoreError(f"not a readable HDF5 feature store: {self.path} ({e})") from e
        if "schema_version" not in self._f.attrs:
            self._f.close()
            raise StoreError(f"{self.path} is an HDF5 file but not a clip-heads store (no schema_version attribute)")
        version = int(self._f.attrs["schema_version"])
        if version > SCHEMA_VERSION:
            self._f.close()
            raise StoreError(f"{self.path} has store schema {version}; this clip-heads reads up to {SCHEMA_VERSION}: upgrade clip-heads")
        if not self.complete:
            msg = f"store {self.path} is incomplete ({self.progress['items']} items encoded so far)"
            if not allow_incomplete:
                self._f.close()
                raise StoreError(msg + "; rerun the same encode command to finish it")
            logger.warning(msg)

    # -- context management ------------------------------------------------------------
    def __enter__(self) -> "FeatureStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._f.id.valid:
            self._f.close()

    # -- provenance --------------------------------------------------------------------
    @property
    def attrs(self) -> dict[str, Any]:
        out = {}
        for k, v in self._f.attrs.items():
            if k in _JSON_ATTRS:
                v = json.loads(v)
            elif isinstance(v, np.generic):
                v = v.item()
            out[k] = v
        return out

    @property
    def model_id(self) -> str:
        return str(self._f.attrs["model_id"])

    @property
    def model_hash(self) -> str:
        return str(self._f.attrs.get("model_hash", ""))

    @property
    def dim(self) -> int:
        return int(self._f.attrs["dim"])

    @property
    def normalized(self) -> bool:
        return bool(self._f.attrs["normalized"])

    @property
    def complete(self) -> bool:
        return bool(self._f.attrs.get("complete", False))

    @property
    def progress(self) -> dict[str, int]:
        items, rows, skipped = (int(v) for v in self._f["progress"][:]) if "progress" in self._f else (0, 0, 0)
        return {"items": items, "rows": rows, "skipped": skipped}

    def backbone(self) -> dict[str, Any]:
        """What a head needs to check it is used with the model it was trained on."""
        return {"model_id": self.model_id, "model_hash": self.model_hash, "dim": self.dim}

    # -- image side --------------------------------------------------------------------
    def __len__(self) -> int:
        return self.progress["rows"] if not self.complete else int(self._f["images/embeds"].shape[0])

    @property
    def classes(self) -> list[str]:
        return list(self._f["classes"].asstr()[:])

    @property
    def keys(self) -> list[str]:
        return list(self._f["images/keys"].asstr()[: len(self)])

    @property
    def labels(self) -> np.ndarray:
        return self._f["images/labels"][: len(self)].astype(np.int64)

    def embeddings(self, dtype=np.float32, rows: slice | np.ndarray | None = None) -> np.ndarray:
        """Image embeddings ``(n_samples, dim)``, all rows or the selected ones."""
        d = self._f["images/embeds"]
        x = d[: len(self)] if rows is None else d[rows]
        return x.astype(dtype, copy=False)

    def arrays(self, dtype=np.float32) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """``(X, y, classes)``: embeddings ``(n_samples, dim)``, int labels, class names."""
        return self.embeddings(dtype), self.labels, self.classes

    def extra_names(self) -> list[str]:
        g = self._f.get("images/extras")
        return sorted(g.keys()) if g is not None else []

    def extra(self, name: str) -> np.ndarray:
        if name not in self.extra_names():
            raise KeyError(f"store {self.path} has no extra column {name!r}; it has {self.extra_names()}")
        d = self._f[f"images/extras/{name}"]
        x = d[: len(self)]
        return d.asstr()[: len(self)] if h5py.check_string_dtype(d.dtype) else x

    def extra_columns(self, name: str) -> list[str] | None:
        """Column names of a 2-D extra (e.g. the emotions of a distribution), if recorded."""
        cols = self._f[f"images/extras/{name}"].attrs.get("columns")
        return json.loads(cols) if cols is not None else None

    def skipped(self) -> list[tuple[str, str]]:
        n = self.progress["skipped"]
        keys = self._f["skipped/keys"].asstr()[:n]
        reasons = self._f["skipped/reasons"].asstr()[:n]
        return list(zip(keys, reasons))

    # -- prompt side -------------------------------------------------------------------
    def prompt_sets(self) -> list[str]:
        g = self._f.get("prompts")
        return sorted(g.keys()) if g is not None else []

    def prompt_set(self, name: str | None = None) -> PromptSet:
        """A named prompt set; with no name, the store's default set."""
        names = self.prompt_sets()
        if name is None:
            name = str(self._f.attrs.get("default_prompts", names[0] if names else ""))
        if name not in names:
            raise StoreError(f"store {self.path} has no prompt set {name!r}; it has {names or 'none'} (add one with `clip-heads prompts`)")
        g = self._f[f"prompts/{name}"]
        return PromptSet(
            name=name,
            classes=list(g["classes"].asstr()[:]),
            templates=list(g["templates"].asstr()[:]),
            texts=list(g["texts"].asstr()[:]),
            embeds=g["embeds"][:].astype(np.float32),
            template_id=g["template_id"][:].astype(np.int64),
            class_id=g["class_id"][:].astype(np.int64),
            attrs={k: (v.item() if isinstance(v, np.generic) else v) for k, v in g.attrs.items()},
        )

    # -- summary -----------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """Everything `clip-heads info` prints, as a json-able dict."""
        classes = self.classes
        labels = self.labels
        counts = {c: int((labels == i).sum()) for i, c in enumerate(classes)}
        a = self.attrs
        return {
            "path": str(self.path),
            "schema_version": a.get("schema_version"),
            "complete": self.complete,
            "model_id": self.model_id,
            "model_hash": self.model_hash,
            "dim": self.dim,
            "dtype": str(self._f["images/embeds"].dtype),
            "normalized": self.normalized,
            "n_images": len(self),
            "n_skipped": self.progress["skipped"],
            "skipped": self.skipped()[:20],
            "classes": counts,
            "extras": self.extra_names(),
            "prompt_sets": {
                n: {
                    "templates": len(self._f[f"prompts/{n}/templates"]),
                    "classes": len(self._f[f"prompts/{n}/classes"]),
                    "prompts": len(self._f[f"prompts/{n}/texts"]),
                    "template_texts": list(self._f[f"prompts/{n}/templates"].asstr()[:]),
                }
                for n in self.prompt_sets()
            },
            "source": a.get("source"),
            "source_fingerprint": a.get("source_fingerprint"),
            "preprocess": a.get("preprocess"),
            "versions": a.get("versions"),
            "created": a.get("created"),
            "completed": a.get("completed"),
        }


def _open_read(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r", locking=False)
    except OSError as e:
        if "already open" not in str(e):
            raise
        # A partial file whose SWMR writer is running or was killed: readable up to its last flush.
        return h5py.File(path, "r", swmr=True, libver="latest", locking=False)


def open_store(path: str | os.PathLike, allow_incomplete: bool = False) -> FeatureStore:
    """Open a feature store for reading (refuses an incomplete one unless asked)."""
    return FeatureStore(path, allow_incomplete=allow_incomplete)


# ---------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------
def _create_layout(
    f: h5py.File,
    *,
    dim: int,
    classes: Sequence[str],
    dtype: str,
    extras: Mapping[str, tuple[tuple[int, ...], Any, list[str] | None]],
    attrs: Mapping[str, Any],
) -> None:
    """Create every dataset up front: SWMR writers may not create datasets later."""
    f.attrs["schema_version"] = SCHEMA_VERSION
    for k, v in attrs.items():
        f.attrs[k] = json.dumps(v, sort_keys=True) if k in _JSON_ATTRS else v
    f.attrs["dim"] = int(dim)
    f.attrs["dtype"] = dtype
    f.attrs["complete"] = False
    f.attrs.setdefault("created", now())
    f.create_dataset("classes", data=np.array(list(classes), dtype=object), dtype=STR)
    g = f.create_group("images")
    g.create_dataset("embeds", shape=(0, dim), maxshape=(None, dim), chunks=(min(ROW_CHUNK, 256), dim), dtype=dtype)
    g.create_dataset("keys", shape=(0,), maxshape=(None,), chunks=(ROW_CHUNK,), dtype=STR)
    g.create_dataset("labels", shape=(0,), maxshape=(None,), chunks=(ROW_CHUNK,), dtype="i8")
    ge = g.create_group("extras")
    for name, (tail, edtype, columns) in extras.items():
        d = ge.create_dataset(name, shape=(0, *tail), maxshape=(None, *tail), chunks=(ROW_CHUNK, *tail), dtype=edtype)
        if columns:
            d.attrs["columns"] = json.dumps(list(columns))
    s = f.create_group("skipped")
    s.create_dataset("keys", shape=(0,), maxshape=(None,), chunks=(256,), dtype=STR)
    s.create_dataset("reasons", shape=(0,), maxshape=(None,), chunks=(256,), dtype=STR)
    f.create_dataset("progress", data=np.zeros(3, np.int64))


def _append(d: h5py.Dataset, values) -> None:
    n = d.shape[0]
    values = np.asarray(values, dtype=object) if h5py.check_string_dtype(d.dtype) else np.asarray(values)
    d.resize(n + len(values), axis=0)
    d[n:] = values


def extras_spec(extras: Mapping[str, np.ndarray], columns: Mapping[str, list[str]] | None = None):
    """Shape tail, HDF5 dtype and column names of each extra column, from example arrays."""
    spec = {}
    for name, arr in extras.items():
        arr = np.asarray(arr)
        edtype = STR if arr.dtype.kind in "OUS" else arr.dtype
        spec[name] = (tuple(arr.shape[1:]), edtype, (columns or {}).get(name))
    return spec


def _write_prompt_set(f: h5py.File, ps: PromptSet, overwrite: bool = False) -> None:
    name = ps.name
    if not name or "/" in name:
        raise StoreError(f"invalid prompt set name {name!r}: use a non-empty name without '/'")
    if f"prompts/{name}" in f:
        if not overwrite:
            raise StoreError(f"prompt set {name!r} already exists in {f.filename}; pick another --name or pass --overwrite")
        del f[f"prompts/{name}"]
    emb = np.asarray(ps.embeds, np.float32)
    if emb.ndim != 2 or emb.shape[1] != int(f.attrs["dim"]):
        raise StoreError(f"prompt embeddings of shape {emb.shape} do not fit a store of dim {int(f.attrs['dim'])}")
    g = f.create_group(f"prompts/{name}")
    g.create_dataset("texts", data=np.array(ps.texts, dtype=object), dtype=STR)
    g.create_dataset("embeds", data=emb.astype(f["images/embeds"].dtype))
    g.create_dataset("template_id", data=np.asarray(ps.template_id, np.int32))
    g.create_dataset("class_id", data=np.asarray(ps.class_id, np.int32))
    g.create_dataset("classes", data=np.array(ps.classes, dtype=object), dtype=STR)
    g.create_dataset("templates", data=np.array(ps.templates, dtype=object), dtype=STR)
    for k, v in ps.attrs.items():
        g.attrs[k] = v
    g.attrs["created"] = now()


def add_prompt_sets(path: str | os.PathLike, prompt_sets: Iterable[PromptSet], overwrite: bool = False) -> None:
    """Add prompt sets to a complete store without touching its images.

    The change is made on a copy that replaces the store only once written, so a crash
    mid-write leaves the store as it was."""
    path = Path(path)
    with FeatureStore(path):
        pass  # validates: exists, is a store, is complete
    tmp = Path(f"{path}.tmp-prompts")
    shutil.copyfile(path, tmp)
    try:
        with h5py.File(tmp, "a", locking=False) as f:
            for ps in prompt_sets:
                _write_prompt_set(f, ps, overwrite=overwrite)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
    if n and y.max() >= len(classes):
        raise ValueError(f"label {int(y.max())} is out of range for {len(classes)} classes")
    keys = [str(i) for i in range(n)] if keys is None else [str(k) for k in keys]
    if len(keys) != n or len(set(keys)) != n:
        raise ValueError(f"keys must be {n} unique strings; got {len(keys)} with {len(set(keys))} unique")
    if normalized is None:
        normalized = bool(n) and bool(np.allclose(np.linalg.norm(X.astype(np.float32), axis=1), 1.0, atol=1e-3))
    extras = {k: np.asarray(v) for k, v in (extras or {}).items()}
    for k, v in extras.items():
        if len(v) != n:
            raise ValueError(f"extra column {k!r} has {len(v)} rows; expected {n}")
    attrs = {
        "model_id": model_id,
        "model_hash": model_hash or f"declared:{model_id}",
        "normalized": bool(normalized),
        "preprocess": {},
        "versions": library_versions(),
        "source": dict(source or {"format": "arrays"}),
        "source_fingerprint": "",
    }
    tmp = Path(f"{path}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(tmp, "w", locking=False) as f:
        _create_layout(f, dim=X.shape[1], classes=classes, dtype=dtype, extras=extras_spec(extras, extras_columns), attrs=attrs)
        g = f["images"]
        _append(g["embeds"], X.astype(dtype))
        _append(g["keys"], keys)
        _append(g["labels"], y)
        for k, v in extras.items():
            _append(g[f"extras/{k}"], v)
        f["progress"][:] = [n, n, 0]
        for ps in prompt_sets:
            _write_prompt_set(f, ps)
        f.attrs["complete"] = True
        f.attrs["completed"] = now()
    os.replace(tmp, path)
    return path
