"""CIFAR-100 in its official python format: ``cifar-100-python`` pickles, as the ``.tar.gz``
or the extracted folder, read with a restricted unpickler that admits only numpy arrays and
plain containers.
"""
from __future__ import annotations

import codecs
import io
import math
import os
import pickle
import struct
import tarfile
import zlib
from typing import Any

import numpy as np
from PIL import Image

from .errors import BadValueError
from .images import DEFAULT_LIMITS, RefusedFile, open_regular, read_regular
from .source import Source, outside_root


def _latin1(text: str, encoding: str = "latin1") -> bytes:
    # Protocol-2 pickles spell bytes as _codecs.encode(text, "latin1"); nothing else is needed.
    if encoding.replace("-", "").lower() != "latin1":
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, "latin1")


def _plain_dtype(*args: Any) -> np.dtype:
    dt = np.dtype(*args)
    if dt.hasobject:  # object arrays would unpickle arbitrary Python objects
        raise pickle.UnpicklingError(f"refusing numpy object dtype {dt}")
    return dt


_RECONSTRUCT = np.ndarray((0,)).__reduce__()[0]  # numpy's own array rebuilder, version-proof
_UNPICKLE_ERRORS = (pickle.UnpicklingError, ValueError, TypeError, EOFError, AttributeError, IndexError, KeyError,
                    OverflowError, struct.error)


class _CifarUnpickler(pickle.Unpickler):
    """Admits only numpy arrays and plain containers: a CIFAR pickle needs nothing else.

    Every admitted constructor is bounded by the pickle's own size: a real file carries the
    bytes of every array it builds, so anything larger (``bytearray(5_000_000_000)`` in a
    40-byte file, an ``ndarray`` of a huge shape) is a forgery, refused before it allocates.
    """

    def __init__(self, blob: bytes) -> None:
        super().__init__(io.BytesIO(blob), encoding="bytes")
        self.cap = len(blob)
        self.allowed = {
            ("_codecs", "encode"): _latin1,
            ("builtins", "bytearray"): self._bytearray,
            ("numpy", "ndarray"): self._ndarray,
            ("numpy", "dtype"): self._dtype,
            ("numpy.core.multiarray", "_reconstruct"): self._reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): self._reconstruct,
            ("numpy.core.numeric", "_frombuffer"): self._frombuffer,
            ("numpy._core.numeric", "_frombuffer"): self._frombuffer,
        }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"pickle wants {module}.{name}, which a CIFAR-100 file never needs") from None

    def _bounded(self, nbytes: int, what: str) -> None:
        if nbytes > self.cap:
            raise pickle.UnpicklingError(f"refusing {what} of {nbytes} bytes from a pickle of {self.cap} bytes")

    def _bytearray(self, *args: Any) -> bytearray:
        # Pickles rebuild a bytearray from bytes or text they carry; a count would allocate.
        if args and not isinstance(args[0], (bytes, bytearray, str)):
            raise pickle.UnpicklingError(f"refusing bytearray({type(args[0]).__name__})")
        return bytearray(*args)

    def _dtype(self, *args: Any) -> np.dtype:
        dt = _plain_dtype(*args)
        self._bounded(dt.itemsize, f"numpy dtype {dt}")
        return dt

    def _nbytes(self, shape: Any, dtype: Any) -> int:
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        if any(not isinstance(d, int) or d < 0 for d in shape):
            raise pickle.UnpicklingError(f"refusing numpy shape {shape!r}")
        return math.prod(shape) * _plain_dtype(dtype).itemsize

    def _ndarray(self, shape: Any, dtype: Any = float, *args: Any) -> np.ndarray:
        if not args:  # no buffer given: ndarray() would allocate the whole shape
            self._bounded(self._nbytes(shape, dtype), "numpy array")
        return np.ndarray(shape, _plain_dtype(dtype), *args)

    def _reconstruct(self, subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
        if subtype != self._ndarray:  # a bound method: equal, not identical, on each access
            raise pickle.UnpicklingError(f"refusing to rebuild {subtype!r} as a numpy array")
        self._bounded(self._nbytes(shape, dtype), "numpy array")
        return _RECONSTRUCT(np.ndarray, shape, dtype)

    def _frombuffer(self, buf: Any, dtype: Any, shape: Any, order: str) -> np.ndarray:
        return np.frombuffer(buf, dtype=_plain_dtype(dtype)).reshape(shape, order=order)


def _unpickle(blob: bytes, what: str) -> dict:
    try:
        obj = _CifarUnpickler(blob).load()
    except _UNPICKLE_ERRORS as e:
        raise ValueError(f"refusing to load CIFAR-100 '{what}': {e}") from e
    if not isinstance(obj, dict):
        raise ValueError(f"CIFAR-100 '{what}' holds a {type(obj).__name__}, expected a dict")
    return {k.decode() if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def find_cifar_dir(path: str) -> str | None:
    """The folder holding ``train``, ``test`` and ``meta`` at ``path`` or below it, else ``None``."""
    for d in (path, os.path.join(path, "cifar-100-python")):
        if all(os.path.isfile(os.path.join(d, m)) for m in ("train", "test", "meta")):
            return d
    return None


_MAX_TAR_MEMBERS = 1000  # tarfile keeps every member it walks past


def _read_cifar_members(path: str, names: list[str], confine: str | None) -> dict[str, bytes]:
    max_bytes = DEFAULT_LIMITS.max_file_bytes
    if os.path.isdir(path):
        d = find_cifar_dir(path)
        if d is None:
            raise ValueError(f"cifar100 folder '{path}' lacks the files train, test, meta")
        out = {}
        for n in names:
            file = os.path.join(d, n)
            target = outside_root(file, confine) if confine is not None else None
            if target is not None:
                raise ValueError(f"cifar100 file '{file}' resolves outside the source root '{path}' (to '{target}'); "
                                 "open it with allow_outside_root=True (--allow-outside-root) to read it anyway")
            try:
                out[n] = read_regular(file, max_bytes)
            except RefusedFile as e:
                raise ValueError(f"cannot read cifar100 file '{file}': {e}") from e
        return out
    out = {}
    try:
        with open_regular(path, max_bytes=2**63) as f, tarfile.open(fileobj=f, mode="r:*") as tar:
            walked = 0
            for count, m in enumerate(tar, 1):  # stream once; never extract to disk
                # Every member is decompressed to be passed over, so each is bounded, and so are
                # their number and total (the official archive: 5 members, 185 MB).
                walked += m.size
                if m.size > max_bytes or walked > 4 * max_bytes or count > _MAX_TAR_MEMBERS:
                    raise ValueError(f"cifar100 archive '{path}': member '{m.name}' declares {m.size} bytes "
                                     f"(member {count}, {walked} bytes so far); a cifar-100-python archive "
                                     f"has members of at most {max_bytes} bytes, {4 * max_bytes} in all, "
                                     f"and at most {_MAX_TAR_MEMBERS} of them")
                parts = m.name.strip("/").split("/")
                if m.isfile() and parts[-1] in names and len(parts) <= 2 and parts[-1] not in out:
                    out[parts[-1]] = _read_member(tar, m, path)
                if len(out) == len(names):
                    break
    except RefusedFile as e:
        raise ValueError(f"cannot read cifar100 archive '{path}': {e}") from e
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise ValueError(f"cannot read cifar100 archive '{path}': {e}") from e
    lacking = [n for n in names if n not in out]
    if lacking:
        raise ValueError(f"cifar100 archive '{path}' lacks member(s) {['cifar-100-python/' + n for n in lacking]}")
    return out


def _read_member(tar: tarfile.TarFile, m: tarfile.TarInfo, path: str) -> bytes:
    """A member's bytes (its declared size already bounded), checked to hold exactly that many."""
    f = tar.extractfile(m)
    if f is None:
        raise ValueError(f"cifar100 archive '{path}': member '{m.name}' has no data")
    data = f.read(m.size)
    if len(data) != m.size:
        raise ValueError(f"cifar100 archive '{path}': member '{m.name}' declares {m.size} bytes "
                         f"but holds {len(data)}")
    return data


class Cifar100Source(Source):
    """The official ``cifar-100-python`` pickles, as a ``.tar.gz`` or the extracted folder.

    Pickles are read with a restricted unpickler (no arbitrary code, no allocation larger than
    the pickle); tar members are read only when their declared size is within the file limit,
    and must hold exactly that many bytes. A folder's files must resolve inside it unless
    ``allow_outside_root=True``. Pixels are kept in
    memory as uint8 (n, 32, 32, 3). Keys are ``"<split>/<index:05d>"``; classes keep the
    official label ids (meta order, not sorted); ``split="all"`` is train then test.
    """

    format = "cifar100"
    SPLITS = ("test", "train", "all")
    LABEL_LEVELS = ("fine", "coarse")

    def __init__(self, path: str, split: str = "test", label_level: str = "fine",
                 allow_outside_root: bool = False) -> None:
        if split not in self.SPLITS:
            raise BadValueError(f"cifar100 split must be one of {', '.join(self.SPLITS)}; got {split!r}")
        if label_level not in self.LABEL_LEVELS:
            raise BadValueError(f"cifar100 label_level must be one of {', '.join(self.LABEL_LEVELS)}; "
                             f"got {label_level!r}")
        splits = ["train", "test"] if split == "all" else [split]
        if os.path.isdir(path):
            self._set_root_policy(path, allow_outside_root)
        blobs = _read_cifar_members(path, ["meta"] + splits, self._confine)
        meta = _unpickle(blobs["meta"], "meta")
        names = meta.get(f"{label_level}_label_names")
        if not isinstance(names, list):
            raise ValueError(f"CIFAR-100 meta in '{path}' lacks '{label_level}_label_names'")
        classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
        arrays, keys, labels, split_col = [], [], [], []
        for s in splits:
            d = _unpickle(blobs[s], s)
            try:
                data = np.asarray(d["data"], dtype=np.uint8)
                lab = np.asarray(d[f"{label_level}_labels"], dtype=np.int64)
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"CIFAR-100 '{s}' in '{path}' is malformed: {e!r}") from e
            if data.ndim != 2 or data.shape[1] != 3072 or len(lab) != len(data):
                raise ValueError(f"CIFAR-100 '{s}' in '{path}': data {data.shape} / labels {lab.shape}, "
                                 f"expected (n, 3072) / (n,)")
            if len(lab) and (lab.min() < 0 or lab.max() >= len(classes)):
                raise ValueError(f"CIFAR-100 '{s}' in '{path}' has labels outside 0..{len(classes) - 1}")
            # Rows are channel-planar (1024 R, 1024 G, 1024 B), each plane row-major.
            arrays.append(np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)))
            keys += [f"{s}/{i:05d}" for i in range(len(data))]
            labels.append(lab)
            split_col += [s] * len(data)
        self.images = np.concatenate(arrays)
        self._finish(path, os.path.dirname(path), classes, keys, np.concatenate(labels),
                     {"split": np.asarray(split_col, dtype=str)},
                     options={"split": split, "label_level": label_level})

    def path(self, i: int) -> str:
        raise TypeError("cifar100 items live inside pickles; use load(i)")

    def load(self, i: int) -> Image.Image:
        return Image.fromarray(self.images[i], "RGB")

    def _stamp(self, h: Any) -> None:
        h.update("\n".join(self.keys).encode())
        h.update(self.labels.tobytes())
        h.update(self.images.tobytes())
