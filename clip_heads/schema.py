"""How a feature store is laid out and written: the schema every writer and reader shares.

The layout itself is described in :mod:`clip_heads.store` (the reader). This module holds what
the writers need and the reader checks against: the schema version (2: the model family's
attributes, the optional pre-projection column and the projection written from an array
attribute) and chunking, a store's birth (``created`` and a random ``store_id``), the record of
a prompt set (:class:`PromptSet`), :func:`create_layout` (every dataset of a new store, chunked,
resizable, checksummed), string datasets with their digests, and prompt sets checked and
written. The encode stream (:mod:`clip_heads.journal`), the writers (:mod:`clip_heads.writer`)
and the reader (:mod:`clip_heads.store`) import it; it imports none of them.
"""
from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import h5py
import numpy as np

from .ensembling import class_vectors, l2_normalize  # noqa: F401  (l2_normalize: the store's readers import it from here)
from .errors import BadValueError
from .fsutil import DiskFullError, durable_replace, fsync_file, run_isolated, temp_sibling
from .integrity import DIGEST_ATTR, string_digest

SCHEMA_VERSION = 2  # 2: the model family's attributes and optional pre-projection features (issue 10)
STR = h5py.string_dtype()
JSON_ATTRS = ("preprocess", "versions", "source", "views")  # views: the augmented views' recipe (clip_heads.augment)
PRE_EMBEDS = "pre_embeds"  # the extra column of pre-projection features, stored at /images/pre_embeds
VIEWS = "views"  # encode --views K: (N, K, D) augmented views, stored at /images/views
PRE_VIEWS = "pre_views"  # their pre-projection features (N, K, D'), at /images/pre_views
# The image feature columns a writer carries as extras but that live beside /images/embeds
# (/images/<name>, with /images/extras/<name> a soft link to them), chunked like it.
FEATURE_COLUMNS = (PRE_EMBEDS, VIEWS, PRE_VIEWS)
# Attributes given to create_layout that are arrays, written as root datasets of that name: a
# record {"shape", "dtype": "<f4", "data": base64} (clip_heads.backbones.model.encode_array),
# which a journal's JSON layout can carry.
ARRAY_ATTRS = {"projection_weight": "projection"}
ROW_CHUNK = 1024
EMBED_CHUNK = 256
# HDF5 1.10 file format: checksummed metadata (superblock, object headers, chunk indexes),
# readable by any HDF5 >= 1.10.
LIBVER = ("v110", "v110")
# Prompt set names: a letter or digit, then letters, digits, '.', '_' or '-'; the names of the
# store's own groups are reserved so a path never reads as two things.
PROMPT_SET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
RESERVED_NAMES = frozenset({"classes", "images", "progress", "prompts", "skipped", "projection"})


class StoreError(ValueError):
    """A store is missing, malformed, damaged, incomplete, or does not match what was asked."""


class PromptSetNameError(StoreError, BadValueError):
    """A prompt set name that is not valid, or that names no set of the store (a bad value: exit 2)."""


# The store errors a child process building a store file (write_isolated) hands back as themselves.
ISOLATED_ERRORS = {"StoreError": StoreError, "PromptSetNameError": PromptSetNameError}


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def new_store_id() -> str:
    """A store's birth name: random, so a store rewritten within the same second is another store."""
    return uuid.uuid4().hex


def birth(attrs) -> str:
    """What tells one store file from another written at the same path: its ``created`` stamp
    and ``store_id`` (older stores have only the stamp)."""
    return f"{attrs.get('created')} {attrs.get('store_id', '')}".strip()


def library_versions() -> dict[str, str]:
    import sklearn
    import torch
    import transformers

    from .version import __version__

    return {
        "clip_heads": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "h5py": h5py.__version__,
        "numpy": np.__version__,
        "sklearn": sklearn.__version__,
    }


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
        """Per-class prompt vectors ``(C, D)`` over the chosen templates (all of them by default):
        the prompt ensemble (:func:`clip_heads.ensembling.class_vectors`, the zero-shot kernel's)."""
        try:
            return class_vectors(self, templates)
        except ValueError as e:  # a class without a prompt among those templates
            raise StoreError(str(e)) from None


# ---------------------------------------------------------------------------------------
# Writing the layout: shared by every writer (clip_heads.writer: write_store, add_prompt_sets,
# merge_stores; clip_heads.journal: the encode stream's builder).
# ---------------------------------------------------------------------------------------
def create_layout(
    f: h5py.File,
    *,
    dim: int,
    classes: Sequence[str],
    dtype: str,
    extras: Mapping[str, tuple[tuple[int, ...], Any, list[str] | None]],
    attrs: Mapping[str, Any],
    rows: int = 0,
    skipped: int = 0,
) -> None:
    """Create every dataset of a store with ``rows`` image rows and ``skipped`` skip records:
    chunked, resizable, numeric ones with Fletcher-32 checksums. Rows are filled by the caller,
    then :func:`write_strings` digests and ``progress`` are set."""
    f.attrs["schema_version"] = SCHEMA_VERSION
    for k, v in attrs.items():
        if k in ARRAY_ATTRS:
            if v is not None:
                f.create_dataset(ARRAY_ATTRS[k], data=_array_record(v, k), fletcher32=True)
        elif v is not None:
            f.attrs[k] = json.dumps(v, sort_keys=True) if k in JSON_ATTRS else v
    f.attrs["dim"] = int(dim)
    f.attrs["dtype"] = dtype
    f.attrs["complete"] = False
    if "created" not in f.attrs:
        f.attrs["created"] = now()
    if "store_id" not in f.attrs:  # `created` has one-second resolution: two stores may share it
        f.attrs["store_id"] = new_store_id()
    write_strings(f, "classes", list(classes))
    g = f.create_group("images")
    g.create_dataset("embeds", shape=(rows, dim), maxshape=(None, dim), chunks=(EMBED_CHUNK, dim), dtype=dtype, fletcher32=True)
    g.create_dataset("keys", shape=(rows,), maxshape=(None,), chunks=(ROW_CHUNK,), dtype=STR)
    g.create_dataset("labels", shape=(rows,), maxshape=(None,), chunks=(ROW_CHUNK,), dtype="i8", fletcher32=True)
    ge = g.create_group("extras")
    for name, (tail, edtype, columns) in extras.items():
        is_str = h5py.check_string_dtype(np.dtype(edtype)) is not None
        feature = name in FEATURE_COLUMNS
        # A feature column's chunk holds about as many vectors as one of /images/embeds (a row of
        # views is K vectors), so a reader of a few rows never decodes much more than it asked for.
        chunk = max(1, EMBED_CHUNK // max(1, int(np.prod(tail[:-1], dtype=np.int64)))) if feature else ROW_CHUNK
        d = (g if feature else ge).create_dataset(name, shape=(rows, *tail), maxshape=(None, *tail), chunks=(chunk, *tail),
                                                  dtype=edtype, fletcher32=not is_str)
        if feature:
            # Writers fill every extra column by its path under /images/extras: the link takes them there.
            ge[name] = h5py.SoftLink(d.name)
        if columns:
            d.attrs["columns"] = json.dumps(list(columns))
    s = f.create_group("skipped")
    for name in ("keys", "reasons"):
        s.create_dataset(name, shape=(skipped,), maxshape=(None,), chunks=(256,), dtype=STR)
    f.create_dataset("progress", data=np.zeros(3, np.int64))


def _array_record(v: Any, name: str) -> np.ndarray:
    """An array from its JSON record (``shape``, ``dtype`` "<f4", base64 ``data``) or as given."""
    import base64

    if isinstance(v, Mapping):
        try:
            a = np.frombuffer(base64.b64decode(v["data"]), dtype=np.dtype(v["dtype"])).reshape(v["shape"])
        except (KeyError, TypeError, ValueError) as e:
            raise StoreError(f"attribute {name} is not an array record ({type(e).__name__}: {e})") from e
        return a.astype(np.float32)
    return np.asarray(v, np.float32)


def write_strings(g: h5py.Group, name: str, values: Sequence[str]) -> h5py.Dataset:
    """A string dataset with its sha256 digest (readers check it)."""
    values = [str(v) for v in values]
    d = g.create_dataset(name, data=np.array(values, dtype=object), dtype=STR)
    d.attrs[DIGEST_ATTR] = string_digest(values)
    return d


def extras_spec(extras: Mapping[str, np.ndarray], columns: Mapping[str, list[str]] | None = None):
    """Shape tail, HDF5 dtype and column names of each extra column, from example arrays."""
    spec = {}
    for name, arr in extras.items():
        arr = np.asarray(arr)
        edtype = STR if arr.dtype.kind in "OUS" else arr.dtype
        spec[name] = (tuple(arr.shape[1:]), edtype, (columns or {}).get(name))
    return spec


def validate_prompt_set_name(name: str) -> str:
    """A prompt set name, or ValueError quoting the rule."""
    if not isinstance(name, str) or not PROMPT_SET_NAME.fullmatch(name) or name in RESERVED_NAMES:
        raise PromptSetNameError(f"invalid prompt set name {name!r}: use a letter or digit followed by letters, digits, '.', '_' "
                         f"or '-' (at most 128), other than {', '.join(sorted(RESERVED_NAMES))}")
    return name


def check_prompt_set(ps: PromptSet, dim: int) -> None:
    """Refuse a prompt set that cannot be stored as it is, before anything is written."""
    validate_prompt_set_name(ps.name)
    emb = np.asarray(ps.embeds)
    n = len(ps.texts)
    if emb.ndim != 2 or emb.shape[1] != dim:
        raise StoreError(f"prompt embeddings of shape {emb.shape} do not fit a store of dim {dim}")
    tid, cid = np.asarray(ps.template_id), np.asarray(ps.class_id)
    if len(emb) != n or tid.shape != (n,) or cid.shape != (n,):
        raise StoreError(f"prompt set {ps.name!r}: {n} texts but {len(emb)} embeddings, {tid.shape} template ids, {cid.shape} class ids")
    for what, ids, limit in (("class_id", cid, len(ps.classes)), ("template_id", tid, len(ps.templates))):
        if n and (ids.min() < 0 or ids.max() >= limit):
            raise StoreError(f"prompt set {ps.name!r}: {what} values {int(ids.min())}..{int(ids.max())} out of range 0..{limit - 1}")


def write_prompt_set(f: h5py.File, ps: PromptSet, overwrite: bool = False) -> None:
    check_prompt_set(ps, int(f.attrs["dim"]))
    name = ps.name
    if f"prompts/{name}" in f:
        if not overwrite:
            raise StoreError(f"prompt set {name!r} already exists in {f.filename}; pick another --name or pass --overwrite")
        del f[f"prompts/{name}"]
    g = f.create_group(f"prompts/{name}")
    write_strings(g, "texts", ps.texts)
    g.create_dataset("embeds", data=np.asarray(ps.embeds, np.float32).astype(f["images/embeds"].dtype), fletcher32=True)
    g.create_dataset("template_id", data=np.asarray(ps.template_id, np.int32), fletcher32=True)
    g.create_dataset("class_id", data=np.asarray(ps.class_id, np.int32), fletcher32=True)
    write_strings(g, "classes", ps.classes)
    write_strings(g, "templates", ps.templates)
    for k, v in ps.attrs.items():
        g.attrs[k] = v
    g.attrs["created"] = now()


def write_isolated(fn: Callable[..., Any], path: Path, *args: Any, what: str) -> None:
    """Run ``fn(tmp, *args)`` that builds a store file at a fresh sibling ``tmp`` of ``path`` in a
    child process (:func:`clip_heads.fsutil.run_isolated`: HDF5 cannot survive its own failed
    writes), then sync it and rename it over ``path``. On any failure ``path`` is untouched
    and the sibling is removed; a full disk raises :class:`DiskFullError` naming ``path``.
    Every store file but an encode's journal is written this way (:mod:`clip_heads.writer`,
    and the journal's final build)."""
    tmp = temp_sibling(path, "build")
    try:
        def build() -> None:
            fn(tmp, *args)
            fsync_file(tmp)

        try:
            run_isolated(build, what=what, errors=ISOLATED_ERRORS)
        except DiskFullError:
            raise DiskFullError(f"disk full writing {path}: it was left as it was; free space and rerun") from None
        durable_replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
