"""Dataset sources: anything that yields ``(key, image, label)`` with known class names.

A :class:`Source` is a map-style, picklable listing (keys, labels, classes and optional
per-item extras) plus :meth:`Source.load`, which decodes one image to RGB with
:func:`open_rgb`. Formats are looked up by name in :data:`SOURCES`; :func:`open_source`
opens a path, detecting the format when asked for ``"auto"``.

Item order is part of the contract (an interrupted encode resumes by index): file-backed
sources list classes sorted by name and keys sorted within each class; CIFAR-100 keeps
the official label ids and the official item order.
"""
from __future__ import annotations

import codecs
import csv
import hashlib
import inspect
import io
import json
import logging
import os
import pickle
import re
import tarfile
import warnings
from typing import IO, Any, Iterator, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

EMOTION6_CLASSES = ["anger", "disgust", "fear", "joy", "sadness", "surprise"]
EMOTION6_DISTRIBUTION = EMOTION6_CLASSES + ["neutral"]

FI_CLASSES = ["amusement", "anger", "awe", "contentment", "disgust", "excitement", "fear", "sadness"]

# WEBEmo (Panda et al., ECCV 2018) labels stock images with 25 emotions from Parrott's
# tree, grouped into 7 "primary" emotions (Parrott's six plus confusion) and 2 polarities.
# Grouping as used by the WEBEmo label files (train25/test25 -> 7 -> 2).
WEBEMO_HIERARCHY: dict[str, dict[str, list[str]]] = {
    "positive": {
        "joy": ["cheerfulness", "contentment", "enthrallment", "optimism", "pride", "relief", "zest"],
        "love": ["affection", "gratitude", "lust"],
        "surprise": ["surprise"],
    },
    "negative": {
        "anger": ["disgust", "envy", "exasperation", "irritability", "rage"],
        "confusion": ["confusion"],
        "fear": ["horror", "nervousness"],
        "sadness": ["disappointment", "neglect", "sadness", "shame", "suffering", "sympathy"],
    },
}
# The released label files misspell two categories; accept those spellings as folder names.
WEBEMO_ALIASES = {"cheerfullness": "cheerfulness", "irritabilty": "irritability"}
WEBEMO_LEVELS = (2, 7, 25)

PathOrFile = Union[str, "os.PathLike[str]", IO[bytes]]


class BadImage(Exception):
    """An image that cannot be decoded; the message is a short human reason."""


# --------------------------------------------------------------------------- decoding

_SIGNATURES = [
    (b"\xff\xd8", "JPEG"), (b"\x89PNG", "PNG"), (b"GIF8", "GIF"), (b"BM", "BMP"),
    (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
]
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}


def _sniff(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((name for magic, name in _SIGNATURES if data.startswith(magic)), None)


def _high_depth_to_l(im: Image.Image) -> Image.Image:
    # PIL's own convert() clips 16/32-bit values at 255, so a 16-bit PNG comes out white.
    a = np.asarray(im).astype(np.float64)
    a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if im.mode == "F" and lo >= 0.0 and hi <= 1.0:
        a = a * 255.0
    elif im.mode != "F" and lo >= 0 and hi <= 65535:
        a = a / 257.0  # 16-bit range; PNG's 16-bit greyscale decodes to "I;16" or "I"
    else:
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB" and "transparency" not in im.info:
        return im
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        return _high_depth_to_l(im).convert("RGB")
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        # Composite on white rather than drop alpha: transparent pixels often store black
        # (or arbitrary) colour, which would turn e.g. a dark logo into a black square.
        rgba = im.convert("RGBA")
        if rgba.getextrema()[3][0] == 255:
            return rgba.convert("RGB")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return im.convert("RGB")  # L, 1, P, CMYK (Adobe-inverted JPEGs handled by PIL), YCbCr
    except ValueError as e:
        raise BadImage(f"unsupported colour mode {im.mode}") from e


def open_rgb(path_or_file: PathOrFile) -> Image.Image:
    """Decode an image fully and return it as 8-bit RGB.

    EXIF orientation is applied. Alpha (RGBA, LA, palette transparency) is composited on
    white. 16/32-bit integer images are scaled from the 16-bit range (32768 -> 128), float
    images from [0, 1], anything else by its own min-max. Multi-frame files give frame 0.

    Parameters
    ----------
    path_or_file : str, os.PathLike or binary file object

    Returns
    -------
    PIL.Image.Image
        Mode ``"RGB"``, fully loaded, holding no open file.

    Raises
    ------
    BadImage
        With a short reason: "file not found", "zero-byte file", "not an image",
        "truncated JPEG", "decompression bomb (N pixels)", ...
    """
    try:
        if hasattr(path_or_file, "read"):
            data = path_or_file.read()  # type: ignore[union-attr]
        else:
            with open(path_or_file, "rb") as f:  # type: ignore[arg-type]
                data = f.read()
    except FileNotFoundError as e:
        raise BadImage("file not found") from e
    except OSError as e:
        raise BadImage(f"unreadable file ({e.strerror or e})") from e
    if not data:
        raise BadImage("zero-byte file")
    kind = _sniff(data) or "image"
    try:
        # Escalate PIL's bomb warning (MAX_IMAGE_PIXELS < n <= 2x) to an error: a worker
        # that decodes a 20k x 20k image can take the whole machine down.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            kind = im.format or kind
            w, h = im.size
            if w <= 0 or h <= 0:
                raise BadImage(f"empty {kind} ({w}x{h} pixels)")
            im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        m = re.search(r"\((\d+) pixels\)", str(e))
        raise BadImage(f"decompression bomb ({m.group(1) if m else 'too many'} pixels)") from e
    except UnidentifiedImageError as e:
        raise BadImage("not an image" if kind == "image" else f"corrupt {kind} header") from e
    except (OSError, SyntaxError, ValueError, EOFError, IndexError) as e:
        if "truncated" in str(e).lower() or isinstance(e, EOFError):
            raise BadImage(f"truncated {kind}") from e
        raise BadImage(f"corrupt {kind} data ({e})") from e
    try:
        orientation = im.getexif().get(0x0112, 1)
        if orientation not in (1, None):
            im = ImageOps.exif_transpose(im)
    except Exception as e:  # a broken EXIF block should not cost us the pixels
        logger.debug("ignoring unreadable EXIF: %s", e)
    return _to_rgb(im)


# --------------------------------------------------------------------------- sources

class Source:
    """A map-style dataset: ``source[i] -> (key, image, label)``.

    Attributes
    ----------
    format : str
        Registry name, e.g. ``"folder"``.
    root : str
        Absolute path that was opened (folder, manifest file or tarball).
    classes : list of str
        Class names; index = label.
    keys : list of str
        Stable key per item (relative path with ``/``, or the dataset's own id).
    labels : np.ndarray
        int64, shape (n_items,).
    extras : dict of str to np.ndarray
        Optional per-item columns, each of shape (n_items, ...).
    extras_meta : dict of str to list of str
        Column names of 2-D extras.
    """

    format: str = ""

    def _finish(self, root: str, base: str, classes: list[str], keys: list[str], labels: Any,
                extras: dict[str, np.ndarray] | None = None,
                extras_meta: dict[str, list[str]] | None = None,
                options: dict[str, Any] | None = None) -> None:
        if not keys:
            raise ValueError(f"{self.format} source '{root}' contains no images")
        self.root, self._base = root, base
        self.classes, self.keys = list(classes), list(keys)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.extras = extras or {}
        self.extras_meta = extras_meta or {}
        self.options = options or {}
        logger.info("%s source %s: %d images in %d classes", self.format, root, len(self.keys), len(self.classes))

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> tuple[str, Image.Image, int]:
        return self.keys[i], self.load(i), int(self.labels[i])

    def __iter__(self) -> Iterator[tuple[str, Image.Image, int]]:
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.root!r}: {len(self)} items, {len(self.classes)} classes>"

    def path(self, i: int) -> str:
        """Absolute file path of item ``i``."""
        return os.path.normpath(os.path.join(self._base, self.keys[i]))

    def load(self, i: int) -> Image.Image:
        """Decode item ``i`` as RGB; raises :class:`BadImage` for unreadable data."""
        return open_rgb(self.path(i))

    def _stamp(self, h: Any) -> None:
        # stat only, never decode: this must stay cheap on 100k files.
        for i, (key, label) in enumerate(zip(self.keys, self.labels.tolist())):
            try:
                st = os.stat(self.path(i))
                stamp = f"{st.st_size}:{st.st_mtime_ns}"
            except OSError:
                stamp = "missing"
            h.update(f"{key}\t{label}\t{stamp}\n".encode())

    def fingerprint(self) -> str:
        """SHA-256 hex of the listing: keys, labels, classes, extras and file size/mtime."""
        h = hashlib.sha256()
        head = {"format": self.format, "classes": self.classes, "options": self.options}
        h.update(json.dumps(head, sort_keys=True).encode())
        self._stamp(h)
        for name in sorted(self.extras):
            h.update(name.encode() + np.ascontiguousarray(self.extras[name]).tobytes())
        return h.hexdigest()

    def describe(self) -> dict:
        """JSON-able summary: format, root, n, classes, options, extras."""
        return {"format": self.format, "root": self.root, "n": len(self), "classes": list(self.classes),
                "options": dict(self.options), "extras": sorted(self.extras)}


def _subdirs(folder: str) -> list[str]:
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if not e.name.startswith(".") and e.is_dir())


def _images_under(root: str, rel: str) -> list[str]:
    """Sorted keys ('/'-separated, relative to root) of the images anywhere under root/rel."""
    out = []
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, rel)):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        relpath = os.path.relpath(dirpath, root).replace(os.sep, "/")
        out += [f"{relpath}/{f}" for f in filenames
                if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(out)


def _require_dir(path: str, fmt: str) -> None:
    if not os.path.isdir(path):
        raise ValueError(f"{fmt} source must be a folder, got file '{path}'")


def _collect(root: str, class_dirs: dict[str, list[str]], classes: list[str]) -> tuple[list[str], list[int]]:
    """Flatten {class: [folders]} into sorted keys and labels; an imageless folder is an error."""
    keys: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        found: list[str] = []
        for rel in class_dirs.get(name, []):
            imgs = _images_under(root, rel)
            if not imgs:
                raise ValueError(f"class folder '{rel}' in '{root}' has no images "
                                 f"(accepted extensions: {', '.join(IMAGE_EXTENSIONS)})")
            found += imgs
        keys += sorted(found)
        labels += [label] * len(found)
    return keys, labels


def _match_names(root: str, dirs: list[str], valid: list[str], fmt: str,
                 aliases: dict[str, str] | None = None) -> dict[str, str]:
    """Map folder names to canonical class names (case-insensitive); refuse extra or missing ones."""
    aliases = aliases or {}
    mapping, seen, extra = {}, {}, []
    for d in dirs:
        name = aliases.get(d.lower(), d.lower())
        if name not in valid:
            extra.append(d)
        elif name in seen:
            raise ValueError(f"{fmt}: folders '{seen[name]}' and '{d}' in '{root}' are both class '{name}'")
        else:
            mapping[d], seen[name] = name, d
    if extra:
        raise ValueError(f"{fmt}: unexpected class folder(s) {extra} in '{root}'; valid: {', '.join(valid)}")
    missing = [c for c in valid if c not in seen]
    if missing:
        raise ValueError(f"{fmt}: missing class folder(s) {missing} in '{root}'")
    return mapping


class FolderSource(Source):
    """``root/<class>/<images>``; images in nested subfolders belong to their top class folder."""

    format = "folder"

    def __init__(self, path: str) -> None:
        _require_dir(path, self.format)
        classes = _subdirs(path)
        if not classes:
            raise ValueError(f"folder source '{path}' has no class folders (expected root/<class>/<images>)")
        keys, labels = _collect(path, {c: [c] for c in classes}, classes)
        self._finish(path, path, classes, keys, labels)


class FISource(Source):
    """FI "Image-Emotion" (You et al., AAAI 2016): the 8 Mikels class folders, any letter case."""

    format = "fi"

    def __init__(self, path: str) -> None:
        _require_dir(path, self.format)
        mapping = _match_names(path, _subdirs(path), FI_CLASSES, self.format)
        keys, labels = _collect(path, {c: [d] for d, c in mapping.items()}, FI_CLASSES)
        self._finish(path, path, FI_CLASSES, keys, labels)


class WebEmoSource(Source):
    """WEBEmo (Panda et al., ECCV 2018) as class folders, labelled at level 2, 7 or 25.

    The release itself is URL lists; we assume the images were downloaded into folders
    named by the 25 fine categories, either flat ``root/<fine>/`` or nested
    ``root/<polarity>/<primary>/<fine>/`` (see :data:`WEBEMO_HIERARCHY`). Folder names are
    case-insensitive and the release's spellings "cheerfullness"/"irritabilty" are accepted.
    """

    format = "webemo"

    def __init__(self, path: str, level: int | str = 7) -> None:
        _require_dir(path, self.format)
        if str(level).strip() not in {str(v) for v in WEBEMO_LEVELS}:
            raise ValueError(f"webemo level must be one of 2, 7, 25; got {level!r}")
        level = int(level)
        up = {f: (p, m) for p, mids in WEBEMO_HIERARCHY.items() for m, fs in mids.items() for f in fs}
        fine_names = sorted(up)
        top = _subdirs(path)
        if top and {d.lower() for d in top} <= set(WEBEMO_HIERARCHY):
            fine_dirs = {}
            for p_dir, parent in _match_names(path, top, sorted(WEBEMO_HIERARCHY), self.format).items():
                mids = sorted(WEBEMO_HIERARCHY[parent])
                for m_dir, mid in _match_names(os.path.join(path, p_dir), _subdirs(os.path.join(path, p_dir)),
                                               mids, self.format).items():
                    sub = os.path.join(path, p_dir, m_dir)
                    for f_dir, fine in _match_names(sub, _subdirs(sub), sorted(WEBEMO_HIERARCHY[parent][mid]),
                                                    self.format, WEBEMO_ALIASES).items():
                        fine_dirs[f"{p_dir}/{m_dir}/{f_dir}"] = fine
        else:
            fine_dirs = _match_names(path, top, fine_names, self.format, WEBEMO_ALIASES)
        name_at = {25: lambda f: f, 7: lambda f: up[f][1], 2: lambda f: up[f][0]}[level]
        classes = sorted({name_at(f) for f in fine_names})
        by_class: dict[str, list[str]] = {}
        for rel, fine in fine_dirs.items():
            by_class.setdefault(name_at(fine), []).append(rel)
        keys, labels = _collect(path, by_class, classes)
        self._finish(path, path, classes, keys, labels, options={"level": level})


class Emotion6Source(Source):
    """Cornell Emotion6: ``images/<keyword>/<n>.jpg`` + ``ground_truth.txt``.

    Label = folder keyword. Keys are the ground-truth ids (``"disgust/1.jpg"``). Extras:
    ``emotion_distribution`` (n, 7) over :data:`EMOTION6_DISTRIBUTION`, ``valence`` and
    ``arousal`` (n,), all float32.
    """

    format = "emotion6"

    def __init__(self, path: str) -> None:
        _require_dir(path, self.format)
        images, gt_file = os.path.join(path, "images"), os.path.join(path, "ground_truth.txt")
        for p in (images, gt_file):
            if not os.path.exists(p):
                raise FileNotFoundError(f"emotion6 source '{path}' lacks '{os.path.basename(p)}'")
        mapping = _match_names(images, _subdirs(images), EMOTION6_CLASSES, self.format)
        keys, labels = _collect(images, {c: [d] for d, c in mapping.items()}, EMOTION6_CLASSES)
        rows: dict[str, list[float]] = {}
        with open(gt_file, encoding="utf-8-sig") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip() or line.startswith("["):
                    continue  # header "[image_filename]\t[valence]..."
                cols = line.rstrip("\r\n").split("\t")
                cols = cols if len(cols) == 10 else line.split()
                try:
                    values = [float(v) for v in cols[1:]]
                except ValueError:
                    values = []
                if len(values) != 9:
                    raise ValueError(f"{gt_file} line {lineno}: expected a file name and 9 numbers, "
                                     f"got {line.strip()!r}")
                rows[cols[0].replace("\\", "/")] = values
        # keys are relative to images/, i.e. the ids ground_truth.txt uses ("disgust/1.jpg")
        unlisted = [k for k in keys if k not in rows]
        if unlisted:
            raise ValueError(f"emotion6: {len(unlisted)} image(s) have no row in {gt_file}, e.g. '{unlisted[0]}'")
        missing = sorted(set(rows) - set(keys))
        if missing:
            raise ValueError(f"emotion6: {gt_file} lists {len(missing)} image(s) not under images/, e.g. '{missing[0]}'")
        table = np.asarray([rows[k] for k in keys], dtype=np.float32)
        extras = {"emotion_distribution": table[:, 2:], "valence": table[:, 0], "arousal": table[:, 1]}
        self._finish(path, images, EMOTION6_CLASSES, keys, labels, extras,
                     {"emotion_distribution": list(EMOTION6_DISTRIBUTION)})


class CsvSource(Source):
    """A ``.csv``/``.tsv`` manifest with header ``path,label[,split]``.

    Paths are relative to the manifest's folder; labels are class names; classes are the
    sorted unique labels. Items are ordered by class, then key; ``split`` becomes an extra.
    """

    format = "csv"

    def __init__(self, path: str) -> None:
        if not os.path.isfile(path):
            raise ValueError(f"csv source must be a .csv or .tsv file, got folder '{path}'")
        base = os.path.dirname(path)
        delim = "\t" if path.lower().endswith(".tsv") else ","
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter=delim)
            header = [c.strip().lower() for c in next(reader, [])]
            if "path" not in header or "label" not in header:
                raise ValueError(f"manifest '{path}' header must name columns path,label[,split]; got {header}")
            col = {name: header.index(name) for name in ("path", "label", "split") if name in header}
            items, seen = [], {}
            for row_no, row in enumerate(reader, 1):
                if not any(c.strip() for c in row):
                    continue
                vals = {n: (row[i].strip() if i < len(row) else "") for n, i in col.items()}
                key = vals["path"].replace("\\", "/")
                where = f"manifest '{path}' row {row_no} (line {reader.line_num})"
                if not key or not vals["label"]:
                    raise ValueError(f"{where}: missing {'path' if not key else 'label'} in {row}")
                if not os.path.isfile(os.path.join(base, key)):
                    raise ValueError(f"{where}: file '{key}' not found relative to '{base}'")
                if key in seen:
                    raise ValueError(f"{where}: '{key}' already listed in row {seen[key]}")
                seen[key] = row_no
                items.append((vals["label"], key, vals.get("split", "")))
        classes = sorted({lab for lab, _, _ in items})
        items.sort()
        index = {c: i for i, c in enumerate(classes)}
        labels = [index[lab] for lab, _, _ in items]
        extras = {"split": np.asarray([s for _, _, s in items], dtype=str)} if "split" in col else {}
        self._finish(path, base, classes, [k for _, k, _ in items], labels, extras)


# --------------------------------------------------------------------------- CIFAR-100

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


# --------------------------------------------------------------------------- registry

SOURCES: dict[str, type[Source]] = {
    "folder": FolderSource,
    "csv": CsvSource,
    "emotion6": Emotion6Source,
    "fi": FISource,
    "webemo": WebEmoSource,
    "cifar100": Cifar100Source,
}


def list_formats() -> list[str]:
    """Names accepted by :func:`open_source`: the registered formats plus ``"auto"``."""
    return list(SOURCES) + ["auto"]


def detect_format(path: str) -> str:
    """Guess the format of ``path``; FI and WEBEmo are plain class folders and detect as folder."""
    low = path.lower()
    if os.path.isfile(path):
        if low.endswith((".tar.gz", ".tgz", ".tar")):
            return "cifar100"
        if low.endswith((".csv", ".tsv")):
            return "csv"
        raise ValueError(f"cannot detect the dataset format of file '{path}': expected a .csv/.tsv "
                         f"manifest or a cifar-100-python .tar.gz")
    if _cifar_dir(path):
        return "cifar100"
    if os.path.isfile(os.path.join(path, "ground_truth.txt")) and os.path.isdir(os.path.join(path, "images")):
        return "emotion6"
    dirs = {d.lower() for d in _subdirs(path)}
    if dirs == set(FI_CLASSES):
        logger.info("'%s' has the FI class folders; opening as a plain folder (use format='fi' to validate)", path)
    return "folder"


def open_source(path: Union[str, "os.PathLike[str]"], format: str = "auto", **options: Any) -> Source:
    """Open a dataset as a :class:`Source`.

    Parameters
    ----------
    path : str or os.PathLike
        Folder, manifest file or archive.
    format : str
        One of :func:`list_formats`; ``"auto"`` detects cifar100 (tarball or folder with
        train/test/meta), emotion6 (ground_truth.txt + images/), csv (.csv/.tsv) and
        otherwise folder. FI and WEBEmo must be named.
    **options
        Format options; ``None`` values mean "default". cifar100: ``split`` ("test",
        "train", "all"), ``label_level`` ("fine", "coarse"); webemo: ``level`` (2, 7, 25).

    Returns
    -------
    Source
    """
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if not os.path.exists(path):
        raise FileNotFoundError(f"dataset path '{path}' does not exist")
    name = str(format).lower()
    if name not in list_formats():
        raise ValueError(f"unknown dataset format {format!r}; valid: {', '.join(list_formats())}")
    if name == "auto":
        name = detect_format(path)
    cls = SOURCES[name]
    valid = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "path")]
    options = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"format '{name}' does not take option(s) {unknown}; "
                         f"valid: {', '.join(valid) if valid else 'none'}")
    return cls(path, **options)
