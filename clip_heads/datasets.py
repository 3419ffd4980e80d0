"""Dataset sources: anything that yields ``(key, image, label)`` with known class names.

Every format is a :class:`clip_heads.source.Source` (a map-style, picklable listing whose
:meth:`~clip_heads.source.Source.load` decodes one image with :func:`clip_heads.images.open_rgb`).
This module holds the folder-like formats (plain class folders, FI, WEBEmo, Emotion6, CSV
manifests); the others have a module each: CIFAR-100's python format (:mod:`clip_heads.cifar`),
EmoSet (:mod:`clip_heads.emoset`), ArtPhoto and Abstract (:mod:`clip_heads.art_datasets`),
Twitter I (:mod:`clip_heads.twitter`), EmotionROI (:mod:`clip_heads.emotionroi`), Hugging Face
datasets on disk and parquet files (:mod:`clip_heads.hf_source`) and webdataset tar shards
(:mod:`clip_heads.webdataset_source`); the walking and checking they share is in
:mod:`clip_heads.folders`. Formats are looked up by name in :data:`SOURCES`; :func:`open_source`
opens a path, detecting the format when asked for ``"auto"``.

Item order is part of the contract (an interrupted encode resumes by index): file-backed
sources list classes sorted by name and keys sorted within each class; CIFAR-100 and Hugging
Face datasets keep their own label ids and row order.

Sources stay inside their root unless opened with ``allow_outside_root=True``: a class
folder or a manifest row that resolves outside it is an error when the source is opened; a
file found by walking that is a symlink out of the root is listed but refused when loaded, so
an encode records it among the skipped images with the reason. Folders are walked without
recursion, to at most :data:`clip_heads.folders.MAX_FOLDER_DEPTH` levels, and symlinked
subfolders below a class folder are not entered.
"""
from __future__ import annotations

import csv
import inspect
import logging
import os
import stat
from typing import Any, Union

import numpy as np

from .art_datasets import ABSTRACT_GROUND_TRUTH, AbstractSource, ArtPhotoSource, looks_like_artphoto
from .errors import BadValueError
from .cifar import Cifar100Source, find_cifar_dir
from .emoset import EMOSET_SPLITS, EmoSetSource
from .emotionroi import EMOTIONROI_SPLIT_DIR, EmotionROISource
from .emotions import EKMAN_EMOTIONS, MIKELS_EMOTIONS
from .folders import check_inside, check_listed_file, collect, match_names, open_text, require_dir, subdirs
from .hf_source import HFSource, ParquetSource, is_hf_dataset
from .images import ImageLimits, file_kind
from .source import Source
from .twitter import TWITTER_IMAGES, TWITTER_LISTS, TwitterISource
from .webdataset_source import WebDatasetSource, has_braces

logger = logging.getLogger(__name__)

EMOTION6_CLASSES = EKMAN_EMOTIONS
EMOTION6_DISTRIBUTION = EMOTION6_CLASSES + ["neutral"]

FI_CLASSES = MIKELS_EMOTIONS

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


# --------------------------------------------------------------------------- folder-like sources

class FolderSource(Source):
    """``root/<class>/<images>``; images in nested subfolders belong to their top class folder."""

    format = "folder"

    def __init__(self, path: str, allow_outside_root: bool = False) -> None:
        require_dir(path, self.format)
        self._set_root_policy(path, allow_outside_root)
        classes = subdirs(path)
        if not classes:
            raise ValueError(f"folder source '{path}' has no class folders (expected root/<class>/<images>)")
        keys, labels = collect(path, {c: [c] for c in classes}, classes, self._confine)
        self._finish(path, path, classes, keys, labels)


class FISource(Source):
    """FI "Image-Emotion" (You et al., AAAI 2016): the 8 Mikels class folders, any letter case."""

    format = "fi"
    kind = "emotions"

    def __init__(self, path: str, allow_outside_root: bool = False) -> None:
        require_dir(path, self.format)
        self._set_root_policy(path, allow_outside_root)
        mapping = match_names(path, subdirs(path), FI_CLASSES, self.format)
        keys, labels = collect(path, {c: [d] for d, c in mapping.items()}, FI_CLASSES, self._confine)
        self._finish(path, path, FI_CLASSES, keys, labels)


class WebEmoSource(Source):
    """WEBEmo (Panda et al., ECCV 2018) as class folders, labelled at level 2, 7 or 25.

    The release itself is URL lists; we assume the images were downloaded into folders
    named by the 25 fine categories, either flat ``root/<fine>/`` or nested
    ``root/<polarity>/<primary>/<fine>/`` (see :data:`WEBEMO_HIERARCHY`). Folder names are
    case-insensitive and the release's spellings "cheerfullness"/"irritabilty" are accepted.
    """

    format = "webemo"
    kind = "emotions"

    def __init__(self, path: str, level: int | str = 7, allow_outside_root: bool = False) -> None:
        require_dir(path, self.format)
        self._set_root_policy(path, allow_outside_root)
        if str(level).strip() not in {str(v) for v in WEBEMO_LEVELS}:
            raise BadValueError(f"webemo level must be one of 2, 7, 25; got {level!r}")
        level = int(level)
        up = {f: (p, m) for p, mids in WEBEMO_HIERARCHY.items() for m, fs in mids.items() for f in fs}
        fine_names = sorted(up)
        top = subdirs(path)
        if top and {d.lower() for d in top} <= set(WEBEMO_HIERARCHY):
            fine_dirs = {}
            for p_dir, parent in match_names(path, top, sorted(WEBEMO_HIERARCHY), self.format).items():
                mids = sorted(WEBEMO_HIERARCHY[parent])
                for m_dir, mid in match_names(os.path.join(path, p_dir), subdirs(os.path.join(path, p_dir)),
                                               mids, self.format).items():
                    sub = os.path.join(path, p_dir, m_dir)
                    for f_dir, fine in match_names(sub, subdirs(sub), sorted(WEBEMO_HIERARCHY[parent][mid]),
                                                    self.format, WEBEMO_ALIASES).items():
                        fine_dirs[f"{p_dir}/{m_dir}/{f_dir}"] = fine
        else:
            fine_dirs = match_names(path, top, fine_names, self.format, WEBEMO_ALIASES)
        name_at = {25: lambda f: f, 7: lambda f: up[f][1], 2: lambda f: up[f][0]}[level]
        classes = sorted({name_at(f) for f in fine_names})
        by_class: dict[str, list[str]] = {}
        for rel, fine in fine_dirs.items():
            by_class.setdefault(name_at(fine), []).append(rel)
        keys, labels = collect(path, by_class, classes, self._confine)
        self._finish(path, path, classes, keys, labels, options={"level": level})


class Emotion6Source(Source):
    """Cornell Emotion6: ``images/<keyword>/<n>.jpg`` + ``ground_truth.txt``.

    Label = folder keyword. Keys are the ground-truth ids (``"disgust/1.jpg"``). Extras:
    ``emotion_distribution`` (n, 7) over :data:`EMOTION6_DISTRIBUTION`, ``valence`` and
    ``arousal`` (n,), all float32.
    """

    format = "emotion6"
    kind = "emotions"

    def __init__(self, path: str, allow_outside_root: bool = False) -> None:
        require_dir(path, self.format)
        self._set_root_policy(path, allow_outside_root)
        images, gt_file = os.path.join(path, "images"), os.path.join(path, "ground_truth.txt")
        for p in (images, gt_file):
            if not os.path.exists(p):
                raise FileNotFoundError(f"emotion6 source '{path}' lacks '{os.path.basename(p)}'")
            check_inside(p, self._confine, f"'{os.path.basename(p)}'", path)
        mapping = match_names(images, subdirs(images), EMOTION6_CLASSES, self.format)
        keys, labels = collect(images, {c: [d] for d, c in mapping.items()}, EMOTION6_CLASSES, self._confine)
        rows: dict[str, list[float]] = {}
        try:
            for lineno, line in enumerate(open_text(gt_file, "emotion6 ground truth"), 1):
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
        except UnicodeDecodeError as e:
            raise ValueError(f"{gt_file} is not UTF-8 text ({e.reason} at byte {e.start})") from e
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

    Paths are relative to the manifest's folder and must resolve inside it (no ``..`` out of
    it, no absolute path elsewhere, no symlink out) unless ``allow_outside_root=True``; each
    must name a regular file. Labels are class names; classes are the sorted unique labels.
    Items are ordered by class, then key; ``split`` becomes an extra.
    """

    format = "csv"

    def __init__(self, path: str, allow_outside_root: bool = False) -> None:
        if os.path.isdir(path):
            raise ValueError(f"csv source must be a .csv or .tsv file, got folder '{path}'")
        base = os.path.dirname(path)
        self._set_root_policy(base, allow_outside_root)
        delim = "\t" if path.lower().endswith(".tsv") else ","
        f = open_text(path, "manifest", newline="")
        reader = csv.reader(f, delimiter=delim)
        row_no = 0
        try:
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
                check_listed_file(os.path.join(base, key), key, base, where, self._confine, "the manifest's folder")
                if key in seen:
                    raise ValueError(f"{where}: '{key}' already listed in row {seen[key]}")
                seen[key] = row_no
                items.append((vals["label"], key, vals.get("split", "")))
        except csv.Error as e:  # e.g. a field over csv.field_size_limit() (131,072 characters)
            raise ValueError(f"manifest '{path}' row {row_no + 1} (line {reader.line_num}): {e}") from e
        except UnicodeDecodeError as e:
            raise ValueError(f"manifest '{path}' is not UTF-8 text ({e.reason} at byte {e.start})") from e
        classes = sorted({lab for lab, _, _ in items})
        items.sort()
        index = {c: i for i, c in enumerate(classes)}
        labels = [index[lab] for lab, _, _ in items]
        extras = {"split": np.asarray([s for _, _, s in items], dtype=str)} if "split" in col else {}
        self._finish(path, base, classes, [k for _, k, _ in items], labels, extras)


# --------------------------------------------------------------------------- registry

SOURCES: dict[str, type[Source]] = {
    "folder": FolderSource,
    "csv": CsvSource,
    "emotion6": Emotion6Source,
    "fi": FISource,
    "webemo": WebEmoSource,
    "cifar100": Cifar100Source,
    "emoset": EmoSetSource,
    "artphoto": ArtPhotoSource,
    "abstract": AbstractSource,
    "twitter1": TwitterISource,
    "emotionroi": EmotionROISource,
    "hf": HFSource,
    "parquet": ParquetSource,
    "webdataset": WebDatasetSource,
}


# The formats whose labels are emotions or sentiment, as each declares (Source.kind).
EMOTION_FORMATS = tuple(name for name, cls in SOURCES.items() if cls.kind == "emotions")


def list_formats() -> list[str]:
    """Names accepted by :func:`open_source`: the registered formats plus ``"auto"``."""
    return list(SOURCES) + ["auto"]


def detect_format(path: str) -> str:
    """Guess the format of ``path``; FI and WEBEmo are plain class folders and detect as folder."""
    low = path.lower()
    if has_braces(path) and not os.path.exists(path):
        return "webdataset"
    if os.path.isfile(path):
        if low.endswith(".tar") and not _is_cifar_tar(path):
            return "webdataset"
        if low.endswith((".tar.gz", ".tgz", ".tar")):
            return "cifar100"
        if low.endswith((".parquet", ".arrow")):
            return "parquet"
        if low.endswith((".csv", ".tsv")):
            return "csv"
        raise ValueError(f"cannot detect the dataset format of file '{path}': expected a .csv/.tsv "
                         f"manifest or a cifar-100-python .tar.gz")
    if find_cifar_dir(path):
        return "cifar100"
    def has(name: str) -> bool:
        return os.path.exists(os.path.join(path, name))

    if os.path.isfile(os.path.join(path, "ground_truth.txt")) and os.path.isdir(os.path.join(path, "images")):
        return "emotion6"
    if any(has(f"{s}.json") for s in EMOSET_SPLITS) and os.path.isdir(os.path.join(path, "image")):
        return "emoset"
    if has(ABSTRACT_GROUND_TRUTH):
        return "abstract"
    if os.path.isdir(os.path.join(path, TWITTER_IMAGES)) and any(has(f) for f in TWITTER_LISTS.values()):
        return "twitter1"
    if os.path.isdir(os.path.join(path, "images")) and os.path.isdir(os.path.join(path, EMOTIONROI_SPLIT_DIR)):
        return "emotionroi"
    if is_hf_dataset(path):
        return "hf"
    dirs = {d.lower() for d in subdirs(path)}
    if not dirs and looks_like_artphoto(path):
        return "artphoto"
    if dirs == set(FI_CLASSES):
        logger.info("'%s' has the FI class folders; opening as a plain folder (use format='fi' to validate)", path)
    return "folder"


def _is_cifar_tar(path: str) -> bool:
    """Whether a plain .tar holds cifar-100-python (else it is read as a webdataset shard)."""
    import tarfile

    try:
        with tarfile.open(path, "r:") as t:
            first = t.next()
    except (tarfile.TarError, OSError, EOFError):
        return True  # not a readable plain tar: let the cifar100 reader say what is wrong
    return first is not None and first.name.split("/")[0].startswith("cifar-100")


def open_source(path: Union[str, "os.PathLike[str]"], format: str = "auto", *, allow_outside_root: bool = False,
                limits: ImageLimits | None = None, **options: Any) -> Source:
    """Open a dataset as a :class:`Source`.

    Parameters
    ----------
    path : str or os.PathLike
        Folder, manifest file or archive (a regular file or a folder).
    format : str
        One of :func:`list_formats`; ``"auto"`` detects cifar100 (tarball or folder with
        train/test/meta), emotion6 (ground_truth.txt + images/), emoset (train/val/test.json +
        image/), abstract (ABSTRACT_groundTruth.csv), twitter1 (Agg_AMT_Candidates/ + an
        *_agree.txt), emotionroi (images/ + training_testing_split/), hf (dataset_dict.json,
        state.json + dataset_info.json, or *.parquet at the top or in data/), artphoto (no
        subfolders, every image named <emotion>_...), csv (.csv/.tsv), webdataset (a brace
        pattern such as ``data/{00000..00127}.tar``, or a plain .tar that is not CIFAR-100),
        parquet (a .parquet or .arrow file) and otherwise folder. FI and WEBEmo must be named,
        and so must a folder of parquet files read as ``parquet`` rather than ``hf``.
    allow_outside_root : bool
        Read files that resolve outside the source's folder (manifest paths with ``..`` or
        absolute paths elsewhere, symlinks out of the root). Off by default.
    limits : ImageLimits, optional
        Size, pixel and aspect limits for decoding images (default :data:`DEFAULT_LIMITS`).
    **options
        Format options; ``None`` values mean "default". cifar100: ``split`` ("test",
        "train", "all"), ``label_level`` ("fine", "coarse"); webemo: ``level`` (2, 7, 25);
        emoset: ``split`` ("all", "train", "val", "test"), ``attributes`` (bool); abstract:
        ``ties`` ("drop", "first"); twitter1: ``agreement`` (3, 4, 5); hf: ``image_column``,
        ``label_column``, ``split``; parquet: ``image_column``, ``label_column``,
        ``key_column``; webdataset: ``label_key``, ``classes``.

    Returns
    -------
    Source
    """
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    name = str(format).lower()
    if name in ("webdataset", "auto") and has_braces(path) and not os.path.exists(path):
        mode = stat.S_IFREG  # a pattern of tar shards: the source checks every file it names
    else:
        mode = None
    try:
        mode = mode or os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"dataset path '{path}' does not exist") from None
    except OSError as e:
        raise ValueError(f"cannot open dataset path '{path}': {e.strerror or e}") from e
    if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
        raise ValueError(f"dataset path '{path}' is a {file_kind(mode)}: expected a folder or a regular file")
    if name not in list_formats():
        raise ValueError(f"unknown dataset format {format!r}; valid: {', '.join(list_formats())}")
    if name == "auto":
        name = detect_format(path)
    cls = SOURCES[name]
    params = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "path")]
    valid = [p for p in params if p != "allow_outside_root"]  # common to all formats; not listed
    options = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"format '{name}' does not take option(s) {unknown}; "
                         f"valid: {', '.join(valid) if valid else 'none'}")
    if allow_outside_root:
        if "allow_outside_root" not in params:
            raise ValueError(f"format '{name}' does not take allow_outside_root")
        options["allow_outside_root"] = True
    src = cls(path, **options)
    if limits is not None:
        src.limits = limits
    return src
