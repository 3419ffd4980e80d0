"""WebDataset tar shards as a map-style source: ``--format webdataset 'data/{00000..00127}.tar'``.

A webdataset is a set of plain tar files whose members are grouped into samples by name: the
part of a member's name up to the first dot of its file name is the sample key, the rest its
extension (``n01440764/0001.jpg`` and ``n01440764/0001.cls`` are sample ``n01440764/0001``). Here
each sample is one item: its image is the member with an image extension (jpg, jpeg, png,
webp, bmp, gif, tif, tiff), its label the ``.cls`` member (an integer or a class name, as text)
or the ``label_key`` field of its ``.json`` member.

Nothing is extracted. Opening the source reads each shard's tar headers once (the stdlib
``tarfile``, seeking over the data) and keeps, per sample, the shard, offset and size of its
image; :meth:`WebDatasetSource.load` reads those bytes with one ``pread`` and decodes them
through :func:`clip_heads.images.open_rgb` and the source's limits (a member larger than
``max_file_bytes`` is refused before it is read). Shards must be regular files inside the
pattern's folder (``allow_outside_root`` to read others); a compressed tar is refused, since it
cannot be read at an offset. Members that are not regular files (links, devices, sparse
files) are never read: a sample whose image is one is skipped with the reason.

Keys are the sample keys (unique across shards, or the source is refused naming both shards);
items keep shard order, then member order. Classes: the ``classes`` option (names, for integer
labels that index them), else the sorted label values as text. A sample without a label is
unlabelled (-1).
"""
from __future__ import annotations

import io
import itertools
import json
import logging
import os
import re
import stat
import tarfile
from typing import Any, Sequence

import numpy as np
from PIL import Image

from .folders import IMAGE_EXTENSIONS, check_listed_file
from .images import BadImage, file_kind, open_rgb
from .source import Source, is_inside

logger = logging.getLogger(__name__)

MAX_SHARDS = 1_000_000  # names a brace pattern may expand to
MAX_LABEL_BYTES = 1 << 16  # a .cls or .json member is read when the source is opened
IMAGE_EXTS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)
_BRACE = re.compile(r"\{([^{}]*)\}")


def has_braces(pattern: str) -> bool:
    return bool(_BRACE.search(pattern))


def expand_braces(pattern: str, limit: int = MAX_SHARDS) -> list[str]:
    """``data/{000..002}.tar`` -> ``data/000.tar``, ``data/001.tar``, ``data/002.tar``; also
    ``{a,b}`` lists, several braces (their product), and zero padding by the first bound's width."""
    parts = _BRACE.split(pattern)
    choices: list[list[str]] = []
    total = 1
    for k, part in enumerate(parts):
        if k % 2 == 0:
            choices.append([part])
            continue
        m = re.fullmatch(r"(\d+)\.\.(\d+)", part)
        if m:
            lo, hi = int(m[1]), int(m[2])
            if hi < lo:
                raise ValueError(f"brace range {{{part}}} in {pattern!r} runs backwards")
            width = len(m[1]) if m[1].startswith("0") else 0
            count = hi - lo + 1
            total *= count
            if total > limit:
                raise ValueError(f"{pattern!r} expands to more than {limit} names")
            choices.append([f"{v:0{width}d}" for v in range(lo, hi + 1)])
        elif "," in part:
            items = part.split(",")
            total *= len(items)
            choices.append(items)
        else:
            raise ValueError(f"{{{part}}} in {pattern!r} is neither a range {{000..127}} nor a list {{a,b}}")
        if total > limit:
            raise ValueError(f"{pattern!r} expands to more than {limit} names")
    return ["".join(c) for c in itertools.product(*choices)]


def pattern_root(pattern: str) -> str:
    """The folder a pattern's names lie in: the part before its first brace, up to a '/'."""
    head = pattern.split("{", 1)[0]
    return os.path.dirname(head) if "{" in pattern or not os.path.isdir(head) else head


def _split_name(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is the name up to the first dot of its file name (a leading
    ``./``, as ``tar cf x.tar .`` writes, is not part of it)."""
    while name.startswith("./"):
        name = name[2:]
    folder, base = os.path.split(name)
    if "." not in base:
        return name, ""
    stem, ext = base.split(".", 1)
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _open_shard(path: str) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ValueError(f"webdataset shard '{path}' is not a regular file ({file_kind(st.st_mode)})")
    return fd


def _read_label(f, member: tarfile.TarInfo, ext: str, label_key: str, where: str):
    if not member.isreg() or member.size > MAX_LABEL_BYTES:
        why = "not a regular file" if not member.isreg() else f"{member.size} bytes > limit {MAX_LABEL_BYTES}"
        raise ValueError(f"{where}: label member '{member.name}' cannot be read ({why})")
    f.seek(member.offset_data)
    data = f.read(member.size)
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: label member '{member.name}' is not UTF-8 text") from e
    if ext == "cls":
        return int(text) if re.fullmatch(r"-?\d+", text) else (text or None)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: '{member.name}' is not valid JSON ({e})") from e
    value = obj.get(label_key) if isinstance(obj, dict) else None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{where}: '{member.name}' field {label_key!r} holds {type(value).__name__}; expected an "
                         "integer or a class name")
    return value


class WebDatasetSource(Source):
    """Samples of webdataset tar shards, read in place.

    Parameters
    ----------
    path : str
        A shard (``data/shard-000.tar``) or a brace pattern (``data/{00000..00127}.tar``).
    label_key : str
        The field of a sample's ``.json`` member holding its label (when it has no ``.cls``).
    classes : str or list of str, optional
        Class names, comma-separated or a list: integer labels index them, string labels must
        be among them. Default: the sorted label values as text.
    """

    format = "webdataset"

    def __init__(self, path: str, label_key: str = "label", classes: str | Sequence[str] | None = None,
                 allow_outside_root: bool = False) -> None:
        names = expand_braces(path)
        root = pattern_root(path) or "."
        self._set_root_policy(root, allow_outside_root)
        missing = [n for n in names if not os.path.lexists(n)]
        if missing:
            raise FileNotFoundError(f"webdataset: {len(missing)} of the {len(names)} shards of {path!r} do not exist, "
                                    f"e.g. '{missing[0]}'")
        self._tars = [os.path.relpath(n, root) for n in names]
        for n, rel in zip(names, self._tars, strict=True):
            check_listed_file(n, rel, root, f"webdataset shard '{rel}'", self._confine)
        keys: list[str] = []
        where_key: dict[str, int] = {}
        shard_of, offsets, sizes, kinds, raw_labels = [], [], [], [], []
        for s, name in enumerate(names):
            for key, member, label in self._index(name, label_key):
                if key in where_key:
                    raise ValueError(f"webdataset: sample key '{key}' is in both '{self._tars[where_key[key]]}' and "
                                     f"'{self._tars[s]}'; keys must be unique across shards")
                where_key[key] = s
                keys.append(key)
                shard_of.append(s)
                offsets.append(member.offset_data if member is not None else -1)
                sizes.append(member.size if member is not None else -1)
                kinds.append(_kind(member))
                raw_labels.append(label)
        self._shard = np.asarray(shard_of, np.int32)
        self._offset = np.asarray(offsets, np.int64)
        self._size = np.asarray(sizes, np.int64)
        self._kind = np.asarray(kinds, np.int8)
        names_list, y = _labels(raw_labels, classes, path)
        self._fds: dict[int, int] = {}
        self._finish(path, root, names_list, keys, y,
                     options={"label_key": label_key, "classes": ",".join(names_list) if classes else None})

    def _index(self, path: str, label_key: str):
        """``(key, image member or None, label)`` for each sample of one shard, in member order."""
        where = f"webdataset shard '{path}'"
        samples: dict[str, list] = {}
        with open(path, "rb", buffering=1 << 16) as f:
            magic = f.read(6)
            if magic[:2] == b"\x1f\x8b" or magic[:3] == b"BZh" or magic[:6] == b"\xfd7zXZ\x00":
                raise ValueError(f"{where} is compressed; a webdataset shard is read in place, so it must be a plain "
                                 "(uncompressed) tar")
            f.seek(0)
            try:
                tar = tarfile.open(fileobj=f, mode="r:")
                while True:
                    member = tar.next()
                    if member is None:
                        break
                    tar.members = []  # the index below is all we keep (10M TarInfos would not fit)
                    if member.isdir():
                        continue
                    key, ext = _split_name(member.name)
                    if not ext:
                        continue
                    rec = samples.setdefault(key, [None, None])
                    if ext in IMAGE_EXTS and rec[0] is None:
                        rec[0] = member
                    elif ext in ("cls", "json") and (rec[1] is None or ext == "cls"):
                        pos = f.tell()
                        rec[1] = _read_label(f, member, ext, label_key, where)
                        f.seek(pos)
            except (tarfile.TarError, EOFError, OSError) as e:
                raise ValueError(f"{where} is not a readable tar ({e})") from e
        for key, (member, label) in samples.items():
            yield key, member, label

    # -- items ----------------------------------------------------------------------------------
    def path(self, i: int) -> str:
        raise TypeError("webdataset items live inside tar shards; use load(i)")

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_fds"] = {}  # descriptors are reopened in each process
        return state

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass

    def _fd(self, s: int) -> int:
        fd = self._fds.get(s)
        if fd is None:
            full = os.path.join(self._base, self._tars[s])
            if self._confine is not None:
                real = os.path.realpath(full)
                if not is_inside(real, self._confine):
                    raise BadImage(f"shard outside the source root (resolves to {real})")
                full = real
            try:
                fd = self._fds[s] = _open_shard(full)
            except (OSError, ValueError) as e:
                raise BadImage(f"shard '{self._tars[s]}' cannot be read ({e})") from e
        return fd

    def load(self, i: int) -> Image.Image:
        """Decode sample ``i``'s image from its bytes inside its shard."""
        kind, size = int(self._kind[i]), int(self._size[i])
        if kind == _NO_IMAGE:
            raise BadImage("no image member in the sample")
        if kind == _NOT_REGULAR:
            raise BadImage("the image member is not a regular file (a link or a special member)")
        if size > self.limits.max_file_bytes:
            raise BadImage(f"file too large ({size} bytes > limit {self.limits.max_file_bytes})")
        fd = self._fd(int(self._shard[i]))
        try:
            data = os.pread(fd, size, int(self._offset[i]))
        except OSError as e:
            raise BadImage(f"unreadable shard ({e.strerror or e})") from e
        if len(data) < size:
            raise BadImage(f"truncated member ({len(data)} of {size} bytes: the shard ends early)")
        return open_rgb(io.BytesIO(data), self.limits)

    def _stamp(self, h: Any) -> None:
        h.update("\n".join(self.keys).encode())
        h.update(self.labels.tobytes())
        for rel in self._tars:
            try:
                st = os.stat(os.path.join(self._base, rel))
                stamp = f"{st.st_size}:{st.st_mtime_ns}"
            except OSError:
                stamp = "missing"
            h.update(f"{rel}\t{stamp}\n".encode())


_IMAGE, _NO_IMAGE, _NOT_REGULAR = 0, 1, 2


def _kind(member: tarfile.TarInfo | None) -> int:
    if member is None:
        return _NO_IMAGE
    return _IMAGE if member.isreg() and not member.issparse() else _NOT_REGULAR


def _labels(values: list, classes: str | Sequence[str] | None, path: str) -> tuple[list[str], np.ndarray]:
    given = None
    if classes is not None:
        given = [c.strip() for c in classes.split(",")] if isinstance(classes, str) else [str(c) for c in classes]
        if not all(given) or len(set(given)) != len(given):
            raise ValueError(f"webdataset: classes {given} must be distinct, non-empty names")
    present = [v for v in values if v is not None]
    kinds = {type(v) for v in present}
    if len(kinds) > 1:
        raise ValueError(f"webdataset {path!r} mixes integer and text labels; use one kind")
    y = np.full(len(values), -1, np.int64)
    if not present:
        return given or [], y
    if kinds == {int}:
        if given is not None:
            bad = [v for v in present if not 0 <= v < len(given)]
            if bad:
                raise ValueError(f"webdataset: label {bad[0]} does not index the {len(given)} classes given")
            names, index = given, {i: i for i in range(len(given))}
        else:
            uniq = sorted(set(present))
            names, index = [str(v) for v in uniq], {v: i for i, v in enumerate(uniq)}
    else:
        names = given or sorted(set(present))
        index = {c: i for i, c in enumerate(names)}
        bad = sorted(set(present) - set(index))
        if bad:
            raise ValueError(f"webdataset: label {bad[0]!r} is not among the classes given ({', '.join(names)})")
    for i, v in enumerate(values):
        if v is not None:
            y[i] = index[v]
    return names, y
