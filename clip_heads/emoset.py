"""EmoSet (Yang et al., ICCV 2023): EmoSet-118K's JSON split lists and per-image attribute files.

The release (github.com/JingyuanYY/EmoSet) is a folder::

    info.json                      label <-> index maps (not needed: labels are by name)
    train.json  val.json  test.json
    image/<emotion>/<id>.jpg
    annotation/<emotion>/<id>.json

Each split list is a JSON array with one entry per image. The README documents four fields,
``[emotion, image_id, image_path, annotation_path]`` (``["amusement", "amusement_12865",
"image/amusement/amusement_12865.jpg", "annotation/amusement/amusement_12865.json"]``); copies in
circulation also drop the id, ``[emotion, image_path, annotation_path]``. Both are accepted;
anything else is refused naming the file and the entry. Paths are relative to the root and must
stay inside it (unless ``allow_outside_root``).

An annotation file is a JSON object with the emotion attributes of the paper: ``brightness``
and ``colorfulness`` (numbers, 11 levels), ``scene``, ``facial_expression`` and
``human_action`` (names), and ``object`` (a list of names). Any of them may be absent.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from .emotions import MIKELS_EMOTIONS
from .errors import BadValueError
from .folders import check_inside, check_listed_file, read_json, require_dir
from .source import Source

logger = logging.getLogger(__name__)

EMOSET_SPLITS = ("train", "val", "test")
# The single-valued attributes, in the order of the paper; ``object`` is the multi-valued one.
EMOSET_ATTRIBUTES = ("brightness", "colorfulness", "scene", "facial_expression", "human_action")
OBJECT_SEPARATOR = "|"


def _entry(item: Any, where: str) -> tuple[str, str, str]:
    """(emotion, image path, annotation path) of one split-list entry, in either documented form."""
    if isinstance(item, list) and len(item) in (3, 4) and all(isinstance(v, str) for v in item):
        emotion, image, annotation = item[0], item[-2], item[-1]
        return emotion.strip().lower(), image.replace("\\", "/").strip(), annotation.replace("\\", "/").strip()
    raise ValueError(f"{where}: expected [emotion, image_id, image_path, annotation_path] or "
                     f"[emotion, image_path, annotation_path] (strings), got {str(item)[:120]}")


def _attribute(value: Any, name: str, where: str) -> str:
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"{where}: attribute '{name}' should be a name or a number, got {str(value)[:80]}")
    return str(value)  # brightness 0.6 -> "0.6", as the official loader keys info.json


def _objects(value: Any, where: str) -> str:
    if value is None:
        return ""
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(v, str) for v in names):
        raise ValueError(f"{where}: attribute 'object' should be a list of names, got {str(value)[:80]}")
    bad = [v for v in names if OBJECT_SEPARATOR in v]
    if bad:
        raise ValueError(f"{where}: object name {bad[0]!r} contains '{OBJECT_SEPARATOR}', "
                         "which separates object names in the 'object' extra")
    return OBJECT_SEPARATOR.join(sorted(set(names)))


class EmoSetSource(Source):
    """EmoSet-118K: Mikels' 8 emotions, the official train/val/test lists, attribute extras.

    Parameters
    ----------
    path : str
        The folder holding ``train.json``, ``val.json``, ``test.json``, ``image/``, ``annotation/``.
    split : {"all", "train", "val", "test"}
        ``"all"`` (default) lists every split; only the lists needed are read.
    attributes : bool or str
        Read each image's annotation file into extras (default). ``False`` skips the 118,102
        small reads when only the emotion labels are wanted.

    Classes are :data:`~clip_heads.emotions.MIKELS_EMOTIONS` (alphabetical, not ``info.json``'s
    index order; labels are matched by name); items are ordered by class, then image path, and
    keys are the image paths (``"image/amusement/amusement_12865.jpg"``). Extras: ``split``
    ("train", "val", "test"); with ``attributes``, one string column per attribute in
    :data:`EMOSET_ATTRIBUTES` (the JSON value as text, ``"0.6"`` for a brightness; ``""`` when the
    annotation lacks it) and ``object`` (the sorted object names joined by ``"|"``; ``""`` for none).
    """

    format = "emoset"
    kind = "emotions"

    def __init__(self, path: str, split: str = "all", attributes: bool | str = True,
                 allow_outside_root: bool = False) -> None:
        require_dir(path, self.format)
        self._set_root_policy(path, allow_outside_root)
        split = str(split).strip().lower()
        if split not in ("all",) + EMOSET_SPLITS:
            raise BadValueError(f"emoset split must be one of all, {', '.join(EMOSET_SPLITS)}; got {split!r}")
        attributes = _flag(attributes, "emoset attributes")
        splits = list(EMOSET_SPLITS) if split == "all" else [split]
        lists = {s: os.path.join(path, f"{s}.json") for s in splits}
        lacking = [f"{s}.json" for s, p in lists.items() if not os.path.exists(p)]
        if lacking:
            raise ValueError(f"emoset source '{path}' lacks {', '.join(lacking)} (expected the EmoSet-118K layout: "
                             f"train.json, val.json, test.json beside image/ and annotation/)")
        index = {c: i for i, c in enumerate(MIKELS_EMOTIONS)}
        rows: list[tuple[int, str, str, dict[str, Any]]] = []
        seen: dict[str, str] = {}
        for s, list_file in lists.items():
            check_inside(list_file, self._confine, f"'{s}.json'", path)
            items = read_json(list_file, "emoset split list")
            if not isinstance(items, list):
                raise ValueError(f"emoset split list '{list_file}' holds a JSON {type(items).__name__}, "
                                 "expected a list of entries")
            for n, item in enumerate(items):
                where = f"emoset '{s}.json' entry {n}"
                emotion, image, annotation = _entry(item, where)
                if emotion not in index:
                    raise ValueError(f"{where}: unknown emotion {emotion!r}; valid: {', '.join(MIKELS_EMOTIONS)}")
                check_listed_file(os.path.join(path, image), image, path, where, self._confine)
                if image in seen:
                    raise ValueError(f"{where}: '{image}' is already listed in {seen[image]}")
                seen[image] = f"'{s}.json'"
                ann = self._annotation(path, annotation, emotion, where) if attributes else {}
                rows.append((index[emotion], image, s, ann))
        rows.sort(key=lambda r: (r[0], r[1]))
        extras: dict[str, np.ndarray] = {"split": np.asarray([r[2] for r in rows], dtype=str)}
        if attributes:
            for name in EMOSET_ATTRIBUTES:
                extras[name] = np.asarray([r[3].get(name, "") for r in rows], dtype=str)
            extras["object"] = np.asarray([r[3].get("object", "") for r in rows], dtype=str)
        self._finish(path, path, MIKELS_EMOTIONS, [r[1] for r in rows], [r[0] for r in rows], extras,
                     options={"split": split, "attributes": attributes})

    def _annotation(self, root: str, rel: str, emotion: str, where: str) -> dict[str, str]:
        full = os.path.join(root, rel)
        check_inside(full, self._confine, f"{where}: annotation '{rel}'", root)
        if not os.path.exists(full):
            raise ValueError(f"{where}: annotation file '{rel}' not found relative to '{root}'")
        data = read_json(full, "emoset annotation")
        if not isinstance(data, dict):
            raise ValueError(f"emoset annotation '{full}' holds a JSON {type(data).__name__}, expected an object")
        own = data.get("emotion")
        if isinstance(own, str) and own.strip().lower() != emotion:
            raise ValueError(f"{where}: the split list says {emotion!r} but annotation '{rel}' says {own!r}")
        out = {name: _attribute(data.get(name), name, f"emoset annotation '{rel}'") for name in EMOSET_ATTRIBUTES}
        out["object"] = _objects(data.get("object"), f"emoset annotation '{rel}'")
        return out


def _flag(value: bool | str, what: str) -> bool:
    """A boolean option that may come from the command line as text."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ValueError(f"{what} must be true or false; got {value!r}")
