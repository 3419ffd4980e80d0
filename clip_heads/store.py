"""The HDF5 feature store: one file per (image source, model), self-describing.

Layout (schema version 2)::

    /                     attrs: schema_version, model_id, model_hash, dim, normalized, dtype,
                                 preprocess (json), versions (json), source (json),
                                 source_fingerprint, precision, batch_size, created, store_id, completed,
                                 complete, default_prompts, [virtual_sources (json)],
                                 family, scoring, logit_scale, [logit_bias], text_padding,
                                 text_max_length, text_lowercase, features, [pre_dim, projection],
                                 [views (json: the augmented views' recipe)]
    /classes              (C,) str
    /images/embeds        (N, D) float16|float32, chunked, maxshape (None, D)
    /images/keys          (N,) str      stable id: path relative to the source root, or the dataset's id
    /images/labels        (N,) int64    index into /classes, or -1 (unlabelled)
    /images/extras/<name> (N, ...)      optional per-image columns (soft labels, valence, split...)
    /images/pre_embeds    (N, D') optional: the image tower's pooled output before the projection
                                  (encode --features projected,pre-projection); writers carry it as
                                  the extra column ``pre_embeds`` (/images/extras/pre_embeds is a
                                  soft link to it)
    /images/views         (N, K, D) optional: K augmented views of each image (encode --views K), the
                                  store dtype, normalised like embeds; the recipe in the root attr
                                  ``views`` (json); the extra column ``views`` (/images/extras/views links)
    /images/pre_views     (N, K, D') optional: their pre-projection features (--views with
                                  --features projected,pre-projection); the extra column ``pre_views``
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
``virtual_sources`` lists the files allowed (:mod:`clip_heads.integrity`;
:func:`clip_heads.verify.verify_store` reads every chunk).

A store file is never changed in place: writers build a new file beside it and rename it over
the old one (:mod:`clip_heads.writer`; an encode streams through :mod:`clip_heads.journal`), so a file at
the final path that says ``complete`` is complete.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .integrity import DIGEST_ATTR, bad_chunk_rows, string_digest, structure_problems
from .journal import is_journal, open_journal
# The schema's names stay importable from here, where readers have always found them.
from .schema import (  # noqa: F401
    ARRAY_ATTRS,
    EMBED_CHUNK,
    JSON_ATTRS,
    LIBVER,
    FEATURE_COLUMNS,
    PRE_EMBEDS,
    PRE_VIEWS,
    PROMPT_SET_NAME,
    RESERVED_NAMES,
    ROW_CHUNK,
    SCHEMA_VERSION,
    STR,
    VIEWS,
    PromptSet,
    PromptSetNameError,
    StoreError,
    birth,
    check_prompt_set,
    create_layout,
    extras_spec,
    l2_normalize,
    library_versions,
    new_store_id,
    now,
    validate_prompt_set_name,
    write_prompt_set,
    write_strings,
)
from .virtual import check_sources, parts_match, sources_checksummed

logger = logging.getLogger(__name__)

_READ_BLOCK = 8192  # rows per block of a converting read (32 embedding chunks)


def damaged(path: Path, d: h5py.Dataset, err: Exception) -> StoreError:
    """The one-line error for a dataset whose stored bytes do not read back."""
    rows = bad_chunk_rows(d)
    where = ", ".join(f"{a}-{b - 1}" for a, b in rows[:5]) + (" ..." if len(rows) > 5 else "") if rows else "unknown rows"
    why = str(err).splitlines()[0] if str(err) else type(err).__name__
    return StoreError(f"{path}: {d.name} rows {where} are damaged ({why}); the file is corrupt: restore it or re-encode "
                      f"(`clip-heads verify {path}` lists every problem)")


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
        if (want is not None and string_digest(raw) != str(want)) or (parts is not None and not parts_match(raw, parts)):
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

    @property
    def n_views(self) -> int:
        """Augmented views per image (``encode --views K``); 0 when the store has none."""
        return int(self._f[f"images/{VIEWS}"].shape[1]) if f"images/{VIEWS}" in self._f else 0

    @property
    def views_recipe(self) -> dict | None:
        """The recipe the views were drawn with (:func:`clip_heads.augment.recipe`), or None."""
        return self.attrs.get("views") if self.n_views else None

    def views(self, dtype=np.float32, rows: slice | np.ndarray | None = None, pre_projection: bool = False) -> np.ndarray:
        """Augmented views ``(n_samples, K, dim)`` (``pre_projection``: their pre-projection
        features ``(n_samples, K, pre_dim)``), all rows or the selected ones; only in stores
        encoded with ``--views K`` (and ``--features projected,pre-projection``)."""
        name = PRE_VIEWS if pre_projection else VIEWS
        if f"images/{name}" not in self._f:
            need = "--views K --features projected,pre-projection" if pre_projection else "--views K"
            raise StoreError(f"store {self.path} has no {'pre-projection ' if pre_projection else ''}augmented views; "
                             f"re-encode it with {need}")
        return self._read(f"images/{name}", slice(0, len(self)) if rows is None else rows).astype(dtype, copy=False)

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
        """Where an extra column's rows lie: ``images/extras/<name>``, but ``images/<name>`` for
        the feature columns (pre-projection features, views: /images/extras/<name> only links to them)."""
        return f"images/{name}" if name in FEATURE_COLUMNS else f"images/extras/{name}"

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
        return list(zip(self._strings("skipped/keys", n), self._strings("skipped/reasons", n), strict=True))

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
            raise PromptSetNameError(f"store {self.path} has no prompt set {name!r}; it has {names or 'none'} (add one with `clip-heads prompts`)")
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
            "extras": [n for n in self.extra_names() if n not in FEATURE_COLUMNS],
            "views": dict(self.views_recipe or {}, count=self.n_views,
                          pre_projection=f"images/{PRE_VIEWS}" in self._f) if self.n_views else None,
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


def __getattr__(name: str):
    # The writers moved to clip_heads.writer (they read stores, so the reader cannot import them).
    if name in ("write_store", "add_prompt_sets", "merge_stores"):
        raise AttributeError(f"clip_heads.store.{name} is now clip_heads.writer.{name} (or clip_heads.{name})")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
