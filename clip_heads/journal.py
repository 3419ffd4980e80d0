"""The encode stream: a crash-safe journal of batches, turned into a store when complete.

An encode appends each committed batch to ``<store>.partial``, a journal of checksummed records
(not HDF5): a record is written at the end of the last good one and ``fdatasync``-ed before the
cursor moves, so a batch is in the journal whole or not at all. Whatever stops the run - Ctrl-C,
SIGKILL, power loss, a full disk, an I/O error - the journal up to its last whole record is the
committed prefix; a resume reads it, cuts off a torn tail and appends after it. Nothing ever
edits HDF5 in place, because HDF5 cannot promise that: a killed or out-of-space HDF5 writer can
leave a file that no longer opens, or whose columns no longer line up.

At the end, :meth:`StoreWriter.finish` seals the journal with the prompt sets, builds the HDF5
store beside its final path in a child process (HDF5 segfaults after its own failed writes;
the child keeps that away from the caller), syncs it, renames it into place (replacing an older
store only now) and deletes the journal. A kill at any point of that leaves the journal, and
rerunning the same command finishes from it.

Journal format: ``MAGIC``, then records ``kind(1) pad(3) length(u32) crc32(payload) crc32(header)``
+ payload, where payload is ``u32 json length, json, raw little-endian arrays``. Kinds: ``L`` the
layout (first), ``B`` one batch (rows, their extras, skips, the cursor after it), ``P`` the
prompt sets (the seal). No pickle: strings are json, arrays are raw bytes of a declared dtype.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import h5py
import numpy as np

from .fsutil import DiskFullError, fsync_dir, is_disk_full, remove_stale_siblings, temp_sibling
from .integrity import DIGEST_ATTR, Problem, digest_update
from .schema import (LIBVER, STR, PromptSet, StoreError, check_prompt_set, create_layout, new_store_id, now,
                     write_isolated, write_prompt_set)

logger = logging.getLogger(__name__)

MAGIC = b"clip-heads-log1\n"
_HEAD = struct.Struct("<c3xIII")
_MAX_RECORD = 1 << 31
_BLOCK_ROWS = 8192
_BUFFER_BYTES = 64 << 20


def _jsonable(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    raise TypeError(f"cannot record {type(v).__name__} {v!r} in the journal")


def _pack(kind: bytes, meta: dict, arrays: Sequence[np.ndarray] = ()) -> bytes:
    arrays = [np.ascontiguousarray(a) for a in arrays]
    meta = dict(meta, arrays=[[a.dtype.str, list(a.shape)] for a in arrays])
    js = json.dumps(meta, default=_jsonable, ensure_ascii=False).encode("utf-8")
    payload = b"".join([struct.pack("<I", len(js)), js] + [a.tobytes() for a in arrays])
    head = _HEAD.pack(kind, len(payload), zlib.crc32(payload), 0)[:12]
    return head + struct.pack("<I", zlib.crc32(head)) + payload


def _unpack(payload: bytes) -> tuple[dict, list[np.ndarray]]:
    (n,) = struct.unpack_from("<I", payload)
    meta = json.loads(payload[4:4 + n].decode("utf-8"))
    arrays, at = [], 4 + n
    for dt, shape in meta.pop("arrays"):
        dt = np.dtype(dt)
        if dt.kind not in "biuf":
            raise ValueError(f"journal array of type {dt} is not numeric")
        size = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        if at + size > len(payload):
            raise ValueError("journal array runs past its record")
        arrays.append(np.frombuffer(payload, dt, int(np.prod(shape, dtype=np.int64)), at).reshape(shape))
        at += size
    return meta, arrays


@dataclass
class _Journal:
    """What a scan of a journal found: its layout, where its good records are, the cursor."""

    layout: dict
    batches: list[tuple[int, int]]  # (offset, length) of each batch payload
    seal: tuple[int, int] | None  # the last record, when it is the prompt sets
    items: int
    rows: int
    skipped: int
    end: int  # end of the last good record
    size: int  # bytes in the file (more than end: a torn tail)


def is_journal(path: str | os.PathLike) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def _damaged(path: Path, why: str) -> StoreError:
    return StoreError(f"{path} is not a usable encode journal ({why}); rerun encode with --overwrite to start over")


def _scan(path: Path, layout_only: bool = False) -> _Journal:
    """Read a journal up to its last good record; never hangs and never trusts a length."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(len(MAGIC))
        if head != MAGIC:
            if head.startswith(b"\x89HDF"):
                raise StoreError(f"{path} is an unfinished encode by an older clip-heads (an HDF5 partial, which cannot be "
                                 "resumed safely); rerun encode with --overwrite to start over")
            raise _damaged(path, "it does not start like one")
        layout, batches, seal = None, [], None
        items = rows = skipped = 0
        at = len(MAGIC)
        while True:
            h = f.read(16)
            if len(h) < 16:
                break
            kind, length, crc, hcrc = _HEAD.unpack(h)
            if zlib.crc32(h[:12]) != hcrc or kind not in b"LBP" or length > min(_MAX_RECORD, size - at - 16):
                break
            payload = f.read(length)
            if len(payload) < length or zlib.crc32(payload) != crc:
                break
            try:
                meta, _ = _unpack(payload)
            except (ValueError, UnicodeDecodeError, struct.error):
                break
            if layout is None:
                if kind != b"L":
                    break
                layout = meta
                at += 16 + length
                if layout_only:
                    break
                continue
            if kind == b"B":
                n_rows, n_skip = len(meta.get("keys", [])), len(meta.get("skipped", []))
                if meta.get("items") != items + n_rows + n_skip:
                    break  # a record that does not continue the cursor is not ours to trust
                batches.append((at + 16, length))
                items, rows, skipped, seal = items + n_rows + n_skip, rows + n_rows, skipped + n_skip, None
            elif kind == b"P":
                seal = (at + 16, length)
            else:
                break
            at += 16 + length
    if layout is None:
        raise _damaged(path, "its layout record is missing or torn")
    return _Journal(layout, batches, seal, items, rows, skipped, at, size)


def _read_payload(path: Path, where: tuple[int, int]) -> tuple[dict, list[np.ndarray]]:
    with open(path, "rb") as f:
        f.seek(where[0] - 16)
        head = f.read(16)
        payload = f.read(where[1])
    if len(payload) != where[1] or zlib.crc32(payload) != _HEAD.unpack(head)[2]:
        raise StoreError(f"{path} changed while it was being read; rerun the same command")
    return _unpack(payload)


def _spec_to_json(extras: Mapping[str, tuple]) -> dict:
    out = {}
    for name, (tail, edtype, columns) in extras.items():
        is_str = h5py.check_string_dtype(np.dtype(edtype)) is not None
        out[name] = {"tail": list(tail), "dtype": "str" if is_str else np.dtype(edtype).str, "columns": columns}
    return out


def _spec_from_json(extras: Mapping[str, dict]) -> dict:
    return {name: (tuple(e["tail"]), STR if e["dtype"] == "str" else np.dtype(e["dtype"]), e["columns"])
            for name, e in extras.items()}


class StoreWriter:
    """Streams rows into the journal ``<path>.partial``; :meth:`finish` turns it into ``path``.

    ``StoreWriter.create`` starts a new journal; ``StoreWriter.resume`` continues one left by an
    interrupted run. Rows are appended with :meth:`append`, unreadable items recorded with
    :meth:`skip`, and :meth:`commit` writes them as one record, syncs it and only then moves the
    cursor. Everything before the last commit survives SIGKILL, power loss and a full disk.
    ``progress`` is ``[items committed, rows appended, items skipped]``.
    """

    def __init__(self, path: Path, journal: _Journal):
        self.path = Path(path)
        self.part = self.partial_path(path)
        self.layout = journal.layout
        self._spec = self.layout["extras"]
        self._fd = os.open(self.part, os.O_RDWR)
        self._end = journal.end
        self._committed = [journal.items, journal.rows, journal.skipped]
        self.progress = list(self._committed)
        self.sealed = _read_payload(self.part, journal.seal) if journal.seal else None
        self._clear()

    def _clear(self) -> None:
        self._rows: list[tuple[np.ndarray, list[str], np.ndarray, dict]] = []
        self._skips: list[list[str]] = []

    @staticmethod
    def partial_path(path: str | os.PathLike) -> Path:
        return Path(f"{path}.partial")

    @classmethod
    def create(cls, path, *, dim, classes, dtype="float16", extras=None, attrs=None) -> "StoreWriter":
        """Start a new journal (replacing any at ``<path>.partial``) holding only the layout."""
        path = Path(path)
        part = cls.partial_path(path)
        part.parent.mkdir(parents=True, exist_ok=True)
        layout = {"dim": int(dim), "classes": [str(c) for c in classes], "dtype": str(dtype),
                  "extras": _spec_to_json(extras or {}), "attrs": dict(attrs or {}, created=now(), store_id=new_store_id())}
        tmp = temp_sibling(part, "new")
        try:
            with open(tmp, "wb") as f:
                f.write(MAGIC + _pack(b"L", layout))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, part)
            fsync_dir(part.parent)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise _write_error(part, e, 0) from e
        return cls(path, _scan(part))

    @classmethod
    def resume(cls, path) -> "StoreWriter":
        """Reopen an interrupted encode: its journal up to the last whole record, a torn tail
        (the record being written when it stopped) cut off."""
        path = Path(path)
        part = cls.partial_path(path)
        j = _scan(part)
        if j.size > j.end:
            logger.warning("%s: dropping %d bytes after the last whole record (a write that was cut short)", part, j.size - j.end)
            os.truncate(part, j.end)
        logger.info("resuming %s after %d items (%d rows, %d skipped)", part, j.items, j.rows, j.skipped)
        return cls(path, j)

    @staticmethod
    def read_partial_attrs(path) -> dict[str, Any]:
        """The root attributes the store will have (what a resume is checked against)."""
        lay = _scan(StoreWriter.partial_path(path), layout_only=True).layout
        return dict(lay["attrs"], dim=lay["dim"], dtype=lay["dtype"])

    @staticmethod
    def discard(path) -> None:
        """Delete an unfinished encode's journal."""
        StoreWriter.partial_path(path).unlink(missing_ok=True)

    # -- streaming -----------------------------------------------------------------------
    def append(self, embeds: np.ndarray, keys: Sequence[str], labels: Sequence[int], extras: Mapping[str, np.ndarray] | None = None) -> None:
        embeds = np.asarray(embeds).astype(self.layout["dtype"])
        keys, labels, extras = [str(k) for k in keys], np.asarray(labels, np.int64), dict(extras or {})
        n, dim, n_classes = len(keys), self.layout["dim"], len(self.layout["classes"])
        if embeds.shape != (n, dim) or labels.shape != (n,):
            raise ValueError(f"append: {n} keys with embeddings {embeds.shape} and labels {labels.shape}; expected ({n}, {dim}) and ({n},)")
        if n and (labels.min() < -1 or labels.max() >= n_classes):
            raise ValueError(f"append: labels {int(labels.min())}..{int(labels.max())} out of range -1..{n_classes - 1}")
        if set(extras) != set(self._spec):
            raise ValueError(f"append: extras {sorted(extras)} but the store has columns {sorted(self._spec)}; every row needs every column")
        cols = {}
        for name, spec in self._spec.items():
            v = np.asarray(extras[name])
            if v.shape[:1] != (n,) or list(v.shape[1:]) != spec["tail"]:
                raise ValueError(f"append: extra {name!r} has shape {v.shape}; expected ({n}, *{spec['tail']})")
            cols[name] = [str(s) for s in v] if spec["dtype"] == "str" else v.astype(spec["dtype"])
        self._rows.append((embeds, keys, labels, cols))
        self.progress[1] += n

    def skip(self, key: str, reason: str) -> None:
        self._skips.append([str(key), str(reason)])
        self.progress[2] += 1

    def commit(self, items_done: int) -> None:
        """Write everything appended since the last commit as one record, sync it, then move the
        cursor to ``items_done``."""
        rows = [r for r in self._rows]
        n = sum(len(r[1]) for r in rows)
        if items_done != self._committed[0] + n + len(self._skips):
            raise ValueError(f"commit: cursor {items_done} does not count the {n} rows and {len(self._skips)} skips "
                             f"since {self._committed[0]}")
        names = sorted(self._spec)
        embeds = np.concatenate([r[0] for r in rows]) if rows else np.zeros((0, self.layout["dim"]), self.layout["dtype"])
        labels = np.concatenate([r[2] for r in rows]) if rows else np.zeros(0, np.int64)
        meta = {"items": int(items_done), "keys": [k for r in rows for k in r[1]], "labels": labels.tolist(),
                "skipped": self._skips, "strs": {m: [s for r in rows for s in r[3][m]] for m in names if self._spec[m]["dtype"] == "str"}}
        numeric = [m for m in names if self._spec[m]["dtype"] != "str"]
        arrays = [embeds] + [np.concatenate([r[3][m] for r in rows]) if rows else np.zeros((0, *self._spec[m]["tail"]), self._spec[m]["dtype"])
                             for m in numeric]
        self._write(b"B", meta, arrays)
        self._committed = [int(items_done), self._committed[1] + n, self._committed[2] + len(self._skips)]
        self.progress = list(self._committed)
        self._clear()

    def _write(self, kind: bytes, meta: dict, arrays: Sequence[np.ndarray] = ()) -> None:
        record = _pack(kind, meta, arrays)
        try:
            _write_at(self._fd, record, self._end)
            _sync(self._fd)
        except OSError as e:
            try:  # leave no torn tail if we can; a resume cuts it off if we cannot
                os.ftruncate(self._fd, self._end)
            except OSError:
                pass
            raise _write_error(self.part, e, self._committed[0]) from e
        self._end += len(record)

    # -- the end -------------------------------------------------------------------------
    def finish(self, prompt_sets: Iterable[PromptSet] = (), default_prompts: str | None = None,
               sources: Sequence[str] | None = None) -> Path:
        """Seal the journal with the prompt sets, build the store and move it into place.

        ``sources`` (the template sets asked for) is kept with the seal, so a rerun after a kill
        here reuses the sealed prompt sets instead of encoding them again."""
        if self._rows or self._skips:
            raise ValueError("finish: rows were appended after the last commit")
        sets = list(prompt_sets)
        for ps in sets:
            check_prompt_set(ps, self.layout["dim"])
        meta = {"default_prompts": default_prompts, "sources": list(sources) if sources is not None else None,
                "sets": [{"name": ps.name, "classes": list(ps.classes), "templates": list(ps.templates), "texts": list(ps.texts),
                          "attrs": dict(ps.attrs)} for ps in sets]}
        arrays = [a for ps in sets for a in (np.asarray(ps.embeds, np.float32), np.asarray(ps.template_id, np.int64),
                                             np.asarray(ps.class_id, np.int64))]
        if not self._same_seal(meta, arrays):
            self._write(b"P", meta, arrays)
        remove_stale_siblings(self.path)
        items = self._committed[0]
        try:
            write_isolated(_build_store, self.path, self.part, what=f"writing {self.path}")
        except DiskFullError:
            raise DiskFullError(f"disk full writing {self.path}: {items} images are safe in {self.part}; free space and "
                                "rerun the same command") from None
        self.close()
        self.part.unlink(missing_ok=True)
        fsync_dir(self.part.parent)
        return self.path

    def _same_seal(self, meta: dict, arrays: list[np.ndarray]) -> bool:
        if self.sealed is None:
            return False
        old_meta, old_arrays = self.sealed
        return json.loads(json.dumps(meta, default=_jsonable)) == old_meta and len(arrays) == len(old_arrays) and all(
            a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(arrays, old_arrays, strict=True))

    def sealed_prompt_sets(self, sources: Sequence[str]) -> tuple[list[PromptSet], str | None] | None:
        """The prompt sets of the seal, when it was made for these ``sources``; else None."""
        if self.sealed is None or self.sealed[0].get("sources") != list(sources):
            return None
        return _seal_sets(*self.sealed), self.sealed[0].get("default_prompts")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _write_at(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _sync(fd: int) -> None:
    (getattr(os, "fdatasync", None) or os.fsync)(fd)


def _write_error(part: Path, e: OSError, items: int) -> OSError:
    if is_disk_full(e):
        return DiskFullError(f"disk full writing {part}: {items} images are safe; free space and rerun the same command",
                             e.errno or 28)
    return OSError(f"cannot write {part} ({e.strerror or e}): {items} images are safe; rerun the same command")


def _seal_sets(meta: dict, arrays: list[np.ndarray]) -> list[PromptSet]:
    out = []
    for i, s in enumerate(meta["sets"]):
        emb, tid, cid = arrays[3 * i:3 * i + 3]
        out.append(PromptSet(s["name"], s["classes"], s["templates"], s["texts"], emb.copy(), tid.copy(), cid.copy(), s["attrs"]))
    return out


def _fill(f: h5py.File, part: Path, j: _Journal, complete: bool) -> None:
    """Write a store's whole content from journal ``part`` into the empty HDF5 file ``f``."""
    lay = j.layout
    spec = _spec_from_json(lay["extras"])
    create_layout(f, dim=lay["dim"], classes=lay["classes"], dtype=lay["dtype"], extras=spec, attrs=lay["attrs"],
                  rows=j.rows, skipped=j.skipped)
    names = sorted(spec)
    numeric = [m for m in names if lay["extras"][m]["dtype"] != "str"]
    strs = [m for m in names if lay["extras"][m]["dtype"] == "str"]
    columns = {"images/keys": [], "images/labels": [], "images/embeds": [], **{f"images/extras/{m}": [] for m in names}}
    hashes = {k: hashlib.sha256() for k in ["images/keys", "skipped/keys", "skipped/reasons"] + [f"images/extras/{m}" for m in strs]}
    skipped: list[list[str]] = []
    state = {"at": 0, "buffered": 0}
    # Rows held before a write: 8192, fewer when a row is wide (K views), so memory stays bounded
    # by _BUFFER_BYTES whatever K is.
    row_bytes = int(np.dtype(lay["dtype"]).itemsize) * lay["dim"] + sum(
        int(np.prod(lay["extras"][m]["tail"], dtype=np.int64)) * np.dtype(lay["extras"][m]["dtype"]).itemsize for m in numeric)
    limit = max(1, min(_BLOCK_ROWS, _BUFFER_BYTES // max(1, row_bytes)))

    def flush() -> None:
        a, b = state["at"], state["at"] + state["buffered"]
        for name, parts in columns.items():
            if not parts:
                continue
            d = f[name]
            if h5py.check_string_dtype(d.dtype):
                values = [v for p in parts for v in p]
                d[a:b] = np.array(values, dtype=object)
                digest_update(hashes[name], values)
            else:
                d[a:b] = np.concatenate(parts)
            parts.clear()
        state["at"], state["buffered"] = b, 0

    for where in j.batches:
        meta, arrays = _read_payload(part, where)
        n = len(meta["keys"])
        if n:
            columns["images/keys"].append(meta["keys"])
            columns["images/labels"].append(np.asarray(meta["labels"], np.int64))
            columns["images/embeds"].append(arrays[0])
            for m, arr in zip(numeric, arrays[1:], strict=True):
                columns[f"images/extras/{m}"].append(arr)
            for m in strs:
                columns[f"images/extras/{m}"].append(meta["strs"][m])
            state["buffered"] += n
        skipped += meta["skipped"]
        if state["buffered"] >= limit:
            flush()
    flush()
    for i, name in enumerate(("skipped/keys", "skipped/reasons")):
        values = [s[i] for s in skipped]
        if values:
            f[name][:] = np.array(values, dtype=object)
        digest_update(hashes[name], values)
    for name, h in hashes.items():
        f[name].attrs[DIGEST_ATTR] = h.hexdigest()
    f["progress"][:] = [j.items, j.rows, j.skipped]
    if j.seal is not None:
        meta, arrays = _read_payload(part, j.seal)
        for ps in _seal_sets(meta, arrays):
            write_prompt_set(f, ps)
        if meta.get("default_prompts"):
            f.attrs["default_prompts"] = meta["default_prompts"]
    if complete:
        f.attrs["complete"] = True
        f.attrs["completed"] = now()


def _build_store(tmp: Path, part: Path) -> None:
    j = _scan(part)
    with h5py.File(tmp, "w", libver=LIBVER, locking=False) as f:
        _fill(f, part, j, complete=True)


def open_journal(path: str | os.PathLike, allow_incomplete: bool = False) -> h5py.File:
    """An unfinished encode's journal as an in-memory HDF5 store (for ``open_store(...,
    allow_incomplete=True)``); refused with the cursor otherwise."""
    path = Path(path)
    j = _scan(path)
    if not allow_incomplete:
        raise StoreError(f"store {path} is incomplete ({j.items} items encoded so far); rerun the same encode command to finish it")
    f = h5py.File(f"journal-{uuid.uuid4().hex}.h5", "w", driver="core", backing_store=False)
    _fill(f, path, j, complete=False)
    return f


def journal_problems(path: str | os.PathLike) -> tuple[int, list, list[str]]:
    """For `verify`: rows committed in an encode journal, its problems, and notes."""
    path = Path(path)
    try:
        j = _scan(path)
    except StoreError as e:
        return 0, [Problem(str(path), f"cannot be resumed: {str(e).removeprefix(str(path)).strip()}")], []
    notes = [f"an unfinished encode: {j.items} items committed ({j.rows} rows, {j.skipped} skipped)"
             + ("; the prompt sets are sealed" if j.seal else "") + "; rerun the same encode command to finish it"]
    if j.size > j.end:
        notes.append(f"{j.size - j.end} bytes after the last whole record (a write cut short) are cut off on resume")
    return j.rows, [], notes


def journal_progress(path: str | os.PathLike) -> dict[str, int]:
    """Items, rows and skips committed so far in the journal of an encode to ``path``."""
    j = _scan(StoreWriter.partial_path(path))
    return {"items": j.items, "rows": j.rows, "skipped": j.skipped}
