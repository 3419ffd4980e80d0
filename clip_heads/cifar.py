"""CIFAR-100 in its official python format: ``cifar-100-python`` pickles, as the ``.tar.gz``
or the extracted folder, read with a restricted unpickler that admits only numpy arrays and
plain containers.
"""
from __future__ import annotations

import codecs
import io
import os
import pickle
import tarfile
from typing import Any

import numpy as np
from PIL import Image

from .source import Source


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


def _frombuffer_safe(buf: Any, dtype: Any, shape: Any, order: str) -> np.ndarray:
    return np.frombuffer(buf, dtype=_plain_dtype(dtype)).reshape(shape, order=order)


_RECONSTRUCT = np.ndarray((0,)).__reduce__()[0]  # numpy's own array rebuilder, version-proof
_PICKLE_ALLOWED = {
    ("_codecs", "encode"): _latin1,
    ("builtins", "bytearray"): bytearray,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _plain_dtype,
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer_safe,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer_safe,
}


class _CifarUnpickler(pickle.Unpickler):
    """Admits only numpy arrays and plain containers: a CIFAR pickle needs nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _PICKLE_ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"pickle wants {module}.{name}, which a CIFAR-100 file never needs") from None


def _unpickle(blob: bytes, what: str) -> dict:
    try:
        obj = _CifarUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except Exception as e:
        raise ValueError(f"refusing to load CIFAR-100 '{what}': {e}") from e
    if not isinstance(obj, dict):
        raise ValueError(f"CIFAR-100 '{what}' holds a {type(obj).__name__}, expected a dict")
    return {k.decode() if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _cifar_dir(path: str) -> str | None:
    for d in (path, os.path.join(path, "cifar-100-python")):
        if all(os.path.isfile(os.path.join(d, m)) for m in ("train", "test", "meta")):
            return d
    return None


def _read_cifar_members(path: str, names: list[str]) -> dict[str, bytes]:
    if os.path.isdir(path):
        d = _cifar_dir(path)
        if d is None:
            raise ValueError(f"cifar100 folder '{path}' lacks the files train, test, meta")
        out = {}
        for n in names:
            with open(os.path.join(d, n), "rb") as f:
                out[n] = f.read()
        return out
    out = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for m in tar:  # stream once; never extract to disk
                parts = m.name.strip("/").split("/")
                if m.isfile() and parts[-1] in names and len(parts) <= 2 and parts[-1] not in out:
                    out[parts[-1]] = tar.extractfile(m).read()  # type: ignore[union-attr]
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ValueError(f"cannot read cifar100 archive '{path}': {e}") from e
    lacking = [n for n in names if n not in out]
    if lacking:
        raise ValueError(f"cifar100 archive '{path}' lacks member(s) {['cifar-100-python/' + n for n in lacking]}")
    return out


class Cifar100Source(Source):
    """The official ``cifar-100-python`` pickles, as a ``.tar.gz`` or the extracted folder.

    Pickles are read with a restricted unpickler (no arbitrary code). Pixels are kept in
    memory as uint8 (n, 32, 32, 3). Keys are ``"<split>/<index:05d>"``; classes keep the
    official label ids (meta order, not sorted); ``split="all"`` is train then test.
    """

    format = "cifar100"
    SPLITS = ("test", "train", "all")
    LABEL_LEVELS = ("fine", "coarse")

    def __init__(self, path: str, split: str = "test", label_level: str = "fine") -> None:
        if split not in self.SPLITS:
            raise ValueError(f"cifar100 split must be one of {', '.join(self.SPLITS)}; got {split!r}")
        if label_level not in self.LABEL_LEVELS:
            raise ValueError(f"cifar100 label_level must be one of {', '.join(self.LABEL_LEVELS)}; "
                             f"got {label_level!r}")
        splits = ["train", "test"] if split == "all" else [split]
        blobs = _read_cifar_members(path, ["meta"] + splits)
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
