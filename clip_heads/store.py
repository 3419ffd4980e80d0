"""The HDF5 feature store: one file per (image source, model), self-describing.

Layout (schema version 2)::

    /                     attrs: schema_version, model_id, model_hash, dim, normalized, dtype,
                                 preprocess (json), versions (json), source (json),
                                 source_fingerprint, precision, batch_size, created, completed,
                                 complete, default_prompts, [virtual_sources (json)],
                                 family, scoring, logit_scale, [logit_bias], text_padding,
                                 text_max_length, text_lowercase, features, [pre_dim, projection]
    /classes              (C,) str
    /images/embeds        (N, D) float16|float32, chunked, maxshape (None, D)
    /images/keys          (N,) str      stable id: path relative to the source root, or the dataset's id
    /images/labels        (N,) int64    index into /classes, or -1 (unlabelled)
    /images/extras/<name> (N, ...)      optional per-image columns (soft labels, valence, split...)
    /images/pre_embeds    (N, D') optional: the image tower's pooled output before the projection
                                  (encode --features projected,pre-projection); writers carry it as
                                  the extra column ``pre_embeds`` (/images/extras/pre_embeds is a
                                  soft link to it)
    /projection           (D, D') float32, optional: the image projection, embeds = pre_embeds @ P.T
                                  (attr projection names it; "none" where the family has none: SigLIP)
    /skipped/keys, /skipped/reasons     images that could not be read, and why
    /progress             (3,) int64    items consumed, rows written, items skipped
    /prompts/<set>/texts, embeds (P, D), template_id (P,), class_id (P,), classes (C',), templates (T,)

The model family's attributes (schema 2) say how its vectors are scored: ``family`` (``clip``,
``siglip``, ``siglip2``, ...), ``scoring`` (softmax or sigmoid), the model's own learned
``logit_scale`` (a temperature) and ``logit_bias`` (sigmoid families), and how its prompts were
tokenized. A schema 1 store records none of them and reads as CLIP.

A prompt set carries its own class list, so prompts for another label set (FI's eight emotions
queried against an Emotion6 store, say) live beside the dataset's own. Zero-shot with one
template, an ensemble, or an ablation over all templates is a slice by ``template_id``.

Integrity: numeric datasets carry HDF5's Fletcher-32 checksum per chunk and string datasets a
``sha256`` attribute over their contents, so damage raises :class:`StoreError` naming the
dataset and rows instead of returning wrong values. Opening checks the structure: every row
dataset as long as the row count, labels and prompt ids in range, and no links to other files
(external links, virtual datasets, external storage) unless the root attribute
``virtual_sources`` lists the files allowed (:mod:`clip_heads.integrity`, whose
:func:`~clip_heads.integrity.verify_store` reads every chunk).

A store file is never changed in place: writers build a new file beside it and rename it over
the old one (:mod:`clip_heads.writer`; an encode streams through :mod:`clip_heads.journal`), so a file at
the final path that says ``complete`` is complete.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import h5py
import numpy as np

from .integrity import DIGEST_ATTR, bad_chunk_rows, string_digest, structure_problems

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # 2: the model family's attributes and optional pre-projection features (issue 10)
STR = h5py.string_dtype()
JSON_ATTRS = ("preprocess", "versions", "source")
PRE_EMBEDS = "pre_embeds"  # the extra column of pre-projection features, stored at /images/pre_embeds
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
_READ_BLOCK = 8192  # rows per block of a converting read (32 embedding chunks)


class StoreError(ValueError):
    """A store is missing, malformed, damaged, incomplete, or does not match what was asked."""


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


def damaged(path: Path, d: h5py.Dataset, err: Exception) -> StoreError:
    """The one-line error for a dataset whose stored bytes do not read back."""
    rows = bad_chunk_rows(d)
    where = ", ".join(f"{a}-{b - 1}" for a, b in rows[:5]) + (" ..." if len(rows) > 5 else "") if rows else "unknown rows"
    why = str(err).splitlines()[0] if str(err) else type(err).__name__
    return StoreError(f"{path}: {d.name} rows {where} are damaged ({why}); the file is corrupt: restore it or re-encode "
                      f"(`clip-heads verify {path}` lists every problem)")


def _parts_match(raw, parts) -> bool:
    from .virtual import parts_match

    return parts_match(raw, parts)


def _read_checked(path: Path, d: h5py.Dataset, sel=slice(None)):
    try:
        return d[sel]
    except OSError as e:
        raise damaged(path, d, e) from None


# ---------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------
class FeatureStore:
    """Read access to a feature store. Use as a context manager or call :meth:`close`.

    Parameters
    ----------
    path : store file.
    allow_incomplete : open a store whose encode has not finished (a warning is logged; an
        encode's ``<store>.partial`` journal is read into memory); by default refused.
    """

    def __init__(self, path: str | os.PathLike, allow_incomplete: bool = False):
        self.path = Path(path)
        if not self.path.exists():
            hint = f" (an unfinished encode is at {self.path}.partial; rerun encode to resume)" if Path(f"{self.path}.partial").exists() else ""
            raise FileNotFoundError(f"store not found: {self.path}{hint}")
        from .journal import is_journal, open_journal

        if is_journal(self.path):
            self._f = open_journal(self.path, allow_incomplete=allow_incomplete)
        else:
            try:
                self._f = h5py.File(self.path, "r", locking=False)
            except OSError as e:
                raise StoreError(f"not a readable HDF5 feature store: {self.path} ({str(e).splitlines()[0]})") from None
        try:
            self._check(allow_incomplete)
        except BaseException:
            self._f.close()
            raise

    def _check(self, allow_incomplete: bool) -> None:
        if "schema_version" not in self._f.attrs:
            raise StoreError(f"{self.path} is an HDF5 file but not a clip-heads store (no schema_version attribute)")
        version = int(self._f.attrs["schema_version"])
        if version > SCHEMA_VERSION:
            raise StoreError(f"{self.path} has store schema {version}; this clip-heads reads up to {SCHEMA_VERSION}: upgrade clip-heads")
        problems = structure_problems(self._f, self.path)
        if problems:
            more = f" (and {len(problems) - 1} more; `clip-heads verify {self.path}` lists them)" if len(problems) > 1 else ""
            raise StoreError(f"{self.path} is not a sound store: {problems[0]}{more}")
        if "virtual_sources" in self._f.attrs:  # a merged store over shard files: they must all be there
            from .virtual import check_sources

            check_sources(self._f, self.path)
        if not self.complete:
            msg = f"store {self.path} is incomplete ({self.progress['items']} items encoded so far)"
            if not allow_incomplete:
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

    # -- checked reads -----------------------------------------------------------------
    def _read(self, name: str, sel=slice(None)):
        return _read_checked(self.path, self._f[name], sel)

    def _strings(self, name: str, n: int | None = None) -> list[str]:
        """All values of a string dataset, checked against its recorded digest."""
        d = self._f[name]
        raw = _read_checked(self.path, d)
        want = d.attrs.get(DIGEST_ATTR)
        parts = d.attrs.get("sha256_parts")  # a virtual dataset: its shards' digests, shard by shard
        if (want is not None and string_digest(raw) != str(want)) or (parts is not None and not _parts_match(raw, parts)):
            raise StoreError(f"{self.path}: {d.name} does not match its sha256 checksum; the file is corrupt: restore it "
                             "or re-encode")
        return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in raw[:n]]

    # -- provenance --------------------------------------------------------------------
    @property
    def attrs(self) -> dict[str, Any]:
        out = {}
        for k, v in self._f.attrs.items():
            if k in JSON_ATTRS:
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
    def checksums(self) -> bool:
        """Whether the numeric row datasets carry per-chunk checksums (stores before 0.2 do not)."""
        d = self._f["images/embeds"]
        if d.is_virtual:
            from .virtual import sources_checksummed

            return sources_checksummed(self._f, self.path)
        return bool(d.fletcher32)

    @property
    def progress(self) -> dict[str, int]:
        if "progress" in self._f:
            items, rows, skipped = (int(v) for v in self._read("progress"))
        else:
            rows = int(self._f["images/embeds"].shape[0])
            skipped = int(self._f["skipped/keys"].shape[0]) if "skipped/keys" in self._f else 0
            items = rows + skipped
        return {"items": items, "rows": rows, "skipped": skipped}

    def backbone(self) -> dict[str, Any]:
        """What a head needs to check it is used with the model it was trained on."""
        return {"model_id": self.model_id, "model_hash": self.model_hash, "dim": self.dim}

    @property
    def family(self) -> str:
        """The model family that encoded the store (``clip`` for stores before schema 2)."""
        return str(self._f.attrs.get("family") or "clip")

    @property
    def has_pre_embeds(self) -> bool:
        return f"images/{PRE_EMBEDS}" in self._f

    def pre_embeddings(self, dtype=np.float32, rows: slice | np.ndarray | None = None) -> np.ndarray:
        """Pre-projection image features ``(n_samples, pre_dim)`` (never normalised), all rows or
        the selected ones; only in stores encoded with ``--features projected,pre-projection``."""
        if not self.has_pre_embeds:
            raise StoreError(f"store {self.path} has no pre-projection features; re-encode it with "
                             "--features projected,pre-projection")
        x = self._read(f"images/{PRE_EMBEDS}", slice(0, len(self)) if rows is None else rows)
        return x.astype(dtype, copy=False)

    def projection(self) -> np.ndarray | None:
        """The image projection ``(dim, pre_dim)`` float32 (``embeds = pre_embeds @ P.T``, before
        normalisation), or None: a family without one (SigLIP: the pooled output is the
        embedding), or a store without pre-projection features."""
        if "projection" not in self._f or not isinstance(self._f["projection"], h5py.Dataset):
            return None
        return self._read("projection").astype(np.float32)

    # -- image side --------------------------------------------------------------------
    def __len__(self) -> int:
        return self.progress["rows"]

    @property
    def classes(self) -> list[str]:
        return self._strings("classes")

    @property
    def keys(self) -> list[str]:
        return self._strings("images/keys", len(self))

    @property
    def labels(self) -> np.ndarray:
        return self._read("images/labels", slice(0, len(self))).astype(np.int64)

    def embeddings(self, dtype=np.float32, rows: slice | np.ndarray | None = None) -> np.ndarray:
        """Image embeddings ``(n_samples, dim)``, all rows or the selected ones."""
        d = self._f["images/embeds"]
        if rows is None and np.dtype(dtype) != d.dtype and len(self) > 2 * _READ_BLOCK:
            return self._read_converted(d, np.dtype(dtype))
        x = self._read("images/embeds", slice(0, len(self)) if rows is None else rows)
        return x.astype(dtype, copy=False)

    def _read_converted(self, d: h5py.Dataset, dtype: np.dtype) -> np.ndarray:
        # Read block k+1 (HDF5, verifying its checksums) while another thread converts block k:
        # the checksum work hides behind the float16 -> float32 conversion a reader pays anyway.
        from concurrent.futures import ThreadPoolExecutor

        n = len(self)
        out = np.empty((n, d.shape[1]), dtype)
        with ThreadPoolExecutor(1) as pool:
            pending = None
            for a in range(0, n, _READ_BLOCK):
                b = min(n, a + _READ_BLOCK)
                raw = _read_checked(self.path, d, slice(a, b))
                if pending is not None:
                    pending.result()
                pending = pool.submit(np.copyto, out[a:b], raw, casting="unsafe")
            pending.result()
        return out

    def arrays(self, dtype=np.float32) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """``(X, y, classes)``: embeddings ``(n_samples, dim)``, int labels, class names."""
        return self.embeddings(dtype), self.labels, self.classes

    def rows(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Stored values of row dataset ``name`` (``"images/embeds"``, ``"images/keys"``,
        ``"images/extras/valence"`` ...) for rows ``[start, stop)``, checksums checked; strings
        come back as utf-8 bytes. For copying a store's columns as they are."""
        return self._read(name, slice(start, len(self) if stop is None else stop))

    @staticmethod
    def extra_dataset(name: str) -> str:
        """Where an extra column's rows lie: ``images/extras/<name>``, but ``images/pre_embeds``
        for the pre-projection features (which /images/extras/pre_embeds only links to)."""
        return f"images/{PRE_EMBEDS}" if name == PRE_EMBEDS else f"images/extras/{name}"

    def extras_layout(self) -> dict[str, tuple[tuple[int, ...], Any, list[str] | None]]:
        """Shape tail, HDF5 dtype and column names of each extra, as :func:`create_layout` takes them."""
        return {n: (self._f[f"images/extras/{n}"].shape[1:], self._f[f"images/extras/{n}"].dtype, self.extra_columns(n))
                for n in self.extra_names()}

    def extra_names(self) -> list[str]:
        g = self._f.get("images/extras")
        return sorted(g.keys()) if g is not None else []

    def extra(self, name: str) -> np.ndarray:
        if name not in self.extra_names():
            raise KeyError(f"store {self.path} has no extra column {name!r}; it has {self.extra_names()}")
        key = f"images/extras/{name}"
        if h5py.check_string_dtype(self._f[key].dtype):
            return np.asarray(self._strings(key, len(self)), dtype=object)
        return self._read(key, slice(0, len(self)))

    def extra_columns(self, name: str) -> list[str] | None:
        """Column names of a 2-D extra (e.g. the emotions of a distribution), if recorded."""
        cols = self._f[f"images/extras/{name}"].attrs.get("columns")
        return json.loads(cols) if cols is not None else None

    def skipped(self) -> list[tuple[str, str]]:
        n = self.progress["skipped"]
        if "skipped/keys" not in self._f:
            return []
        return list(zip(self._strings("skipped/keys", n), self._strings("skipped/reasons", n)))

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
        p = f"prompts/{name}"
        return PromptSet(
            name=name,
            classes=self._strings(f"{p}/classes"),
            templates=self._strings(f"{p}/templates"),
            texts=self._strings(f"{p}/texts"),
            embeds=self._read(f"{p}/embeds").astype(np.float32),
            template_id=self._read(f"{p}/template_id").astype(np.int64),
            class_id=self._read(f"{p}/class_id").astype(np.int64),
            attrs={k: (v.item() if isinstance(v, np.generic) else v) for k, v in self._f[p].attrs.items()},
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
            "checksums": self.checksums,
            "n_images": len(self),
            "n_skipped": self.progress["skipped"],
            "skipped": self.skipped()[:20],
            "classes": counts,
            "extras": [n for n in self.extra_names() if n != PRE_EMBEDS],
            "family": self.family,
            "scoring": {k: a.get(k) for k in ("scoring", "logit_scale", "logit_bias") if a.get(k) is not None},
            "features": a.get("features") or "projected",
            "prompt_sets": {
                n: {
                    "templates": len(self._f[f"prompts/{n}/templates"]),
                    "classes": len(self._f[f"prompts/{n}/classes"]),
                    "prompts": len(self._f[f"prompts/{n}/texts"]),
                    "template_texts": self._strings(f"prompts/{n}/templates"),
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


def open_store(path: str | os.PathLike, allow_incomplete: bool = False) -> FeatureStore:
    """Open a feature store for reading (refuses an incomplete one unless asked)."""
    return FeatureStore(path, allow_incomplete=allow_incomplete)


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
        where, chunk = (g, EMBED_CHUNK) if name == PRE_EMBEDS else (ge, ROW_CHUNK)
        d = where.create_dataset(name, shape=(rows, *tail), maxshape=(None, *tail), chunks=(chunk, *tail), dtype=edtype,
                                 fletcher32=not is_str)
        if name == PRE_EMBEDS:
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
        raise StoreError(f"invalid prompt set name {name!r}: use a letter or digit followed by letters, digits, '.', '_' "
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


def __getattr__(name: str):
    # The writers live in clip_heads.writer (they read stores too); they stay importable from here.
    if name in ("write_store", "add_prompt_sets", "merge_stores"):
        from . import writer

        return getattr(writer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
