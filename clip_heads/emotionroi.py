"""EmotionROI (Peng, Sadovnik, Gallagher, Chen, "Where do emotions come from? Predicting the Emotion
Stimuli Map", ICIP 2016): 1,980 Flickr images, Ekman's 6 emotions.

The release is a folder::

    images/<emotion>/<n>.jpg                      330 per emotion
    ground_truth/...                              the emotion stimuli maps (not read)
    training_testing_split/training.txt           "<emotion>/<n>.jpg" per line
    training_testing_split/testing.txt

The split lists are also accepted at the top level (``training.txt``, ``testing.txt`` beside
``images/``); both or neither must be present. Without them the source has no ``split`` extra.
"""
from __future__ import annotations

import logging
import os

import numpy as np

from .emotions import EKMAN_EMOTIONS
from .folders import check_inside, collect, match_names, read_lines, require_dir, subdirs
from .source import Source

logger = logging.getLogger(__name__)

EMOTIONROI_SPLIT_DIR = "training_testing_split"
EMOTIONROI_SPLITS = {"train": "training.txt", "test": "testing.txt"}


class EmotionROISource(Source):
    """EmotionROI: ``images/<emotion>/`` class folders and the official training/testing lists.

    Classes are :data:`~clip_heads.emotions.EKMAN_EMOTIONS`; items are ordered by class, then
    key; keys are relative to ``images/`` (``"anger/1.jpg"``), as in the split lists. Extra
    ``split`` ("train" or "test") when the lists are present: every image must be in exactly
    one of them, and every listed image must exist.
    """

    format = "emotionroi"
    kind = "emotions"

    def __init__(self, path: str, allow_outside_root: bool = False) -> None:
        require_dir(path, self.format)
        self._set_root_policy(path, allow_outside_root)
        images = os.path.join(path, "images")
        if not os.path.isdir(images):
            raise ValueError(f"emotionroi source '{path}' lacks 'images/' (expected images/<emotion>/ for "
                             f"{', '.join(EKMAN_EMOTIONS)}, and training_testing_split/training.txt, testing.txt)")
        check_inside(images, self._confine, "'images'", path)
        mapping = match_names(images, subdirs(images), EKMAN_EMOTIONS, self.format)
        keys, labels = collect(images, {c: [d] for d, c in mapping.items()}, EKMAN_EMOTIONS, self._confine)
        # The lists name classes in lower case; folder names are matched case-insensitively.
        canonical = {f"{mapping[k.split('/', 1)[0]]}/{k.split('/', 1)[1]}": k for k in keys}
        extras = {}
        lists = self._split_lists(path)
        if lists:
            split_of: dict[str, str] = {}
            for split, list_file in lists.items():
                for lineno, line in read_lines(list_file, "emotionroi split list"):
                    where = f"'{list_file}' line {lineno}"
                    name = line.replace("\\", "/").strip("/")
                    head, _, tail = name.partition("/")
                    name = f"{head.lower()}/{tail}"
                    if name not in canonical:
                        raise ValueError(f"{where}: '{line}' is not an image under images/<emotion>/ "
                                         f"(expected '<emotion>/<file>' with one of {', '.join(EKMAN_EMOTIONS)})")
                    if name in split_of:
                        raise ValueError(f"{where}: '{line}' is already listed in "
                                         f"{EMOTIONROI_SPLITS[split_of[name]]}")
                    split_of[name] = split
            unlisted = [n for n in canonical if n not in split_of]
            if unlisted:
                raise ValueError(f"emotionroi: {len(unlisted)} image(s) under images/ are in neither "
                                 f"{' nor '.join(EMOTIONROI_SPLITS.values())}, e.g. '{unlisted[0]}'")
            by_key = {k: split_of[n] for n, k in canonical.items()}
            extras["split"] = np.asarray([by_key[k] for k in keys], dtype=str)
        else:
            logger.warning("emotionroi source '%s' has no %s/training.txt, testing.txt: opened without the "
                           "official split", path, EMOTIONROI_SPLIT_DIR)
        self._finish(path, images, EKMAN_EMOTIONS, keys, labels, extras)

    def _split_lists(self, path: str) -> dict[str, str]:
        for folder in (os.path.join(path, EMOTIONROI_SPLIT_DIR), path):
            files = {s: os.path.join(folder, f) for s, f in EMOTIONROI_SPLITS.items()}
            present = [s for s, f in files.items() if os.path.exists(f)]
            if len(present) == len(files):
                for f in files.values():
                    check_inside(f, self._confine, f"'{os.path.relpath(f, path)}'", path)
                return files
            if present:
                raise ValueError(f"emotionroi source '{path}' has {EMOTIONROI_SPLITS[present[0]]} in "
                                 f"'{folder}' but not its pair: expected both "
                                 f"{' and '.join(EMOTIONROI_SPLITS.values())}")
        return {}
