"""ArtPhoto and Abstract (Machajdik & Hanbury, ACM MM 2010), in the form imageemotion.org releases them.

* ArtPhoto (``testImages_artphoto.zip``): 806 artistic photographs in one flat folder, each
  named for its emotion: ``amusement_0001.jpg`` ... The release spells sadness ``sad_``; the
  full name ``sadness_`` is accepted too. Files that are not images (the ``ReadMe.rtf``) are
  ignored; an image whose name starts with no known emotion is refused.
* Abstract (``testImages_abstract.zip``): 280 abstract paintings in one folder beside
  ``ABSTRACT_groundTruth.csv``: one row per image, its file name then the number of people who
  chose each of the 8 emotions. The header names the emotions ``Amusement, Anger, Awe, Content,
  Disgust, Excitement, Fear, Sad`` (any order, quoted or not; the full Mikels names are accepted
  too); fields may be quoted with ``'`` (the release) or ``"``.

Both use Mikels' 8 emotions; neither has an official split (the papers use 5-fold CV).
"""
from __future__ import annotations

import csv
import logging
import os

import numpy as np

from .emotions import MIKELS_EMOTIONS
from .errors import BadValueError
from .folders import IMAGE_EXTENSIONS, check_inside, check_listed_file, open_text, require_dir, warn_outside
from .source import Source, outside_root

logger = logging.getLogger(__name__)

# The release's own spellings of two emotions (file prefixes, ground-truth header).
MIKELS_ALIASES = {"sad": "sadness", "content": "contentment"}
ABSTRACT_GROUND_TRUTH = "ABSTRACT_groundTruth.csv"
ABSTRACT_TIES = ("drop", "first")


def _mikels(name: str) -> str | None:
    name = name.strip().strip("'\"").strip().lower()
    name = MIKELS_ALIASES.get(name, name)
    return name if name in MIKELS_EMOTIONS else None


def looks_like_artphoto(path: str) -> bool:
    """Whether the top level of ``path`` has images and every one is named ``<emotion>_...``."""
    try:
        with os.scandir(path) as it:
            names = [e.name for e in it if not e.name.startswith(".") and e.name.lower().endswith(IMAGE_EXTENSIONS)]
    except OSError:
        return False
    return bool(names) and all("_" in n and _mikels(n.split("_", 1)[0]) for n in names)


class ArtPhotoSource(Source):
    """ArtPhoto: a flat folder of ``<emotion>_<n>.jpg``; label = the file name's emotion.

    Classes are :data:`~clip_heads.emotions.MIKELS_EMOTIONS`; items are ordered by class, then
    file name; keys are the file names. No extras.
    """

    format = "artphoto"
    kind = "emotions"

    def __init__(self, path: str, allow_outside_root: bool = False) -> None:
        require_dir(path, self.format)
        self._set_root_policy(path, allow_outside_root)
        try:
            with os.scandir(path) as it:
                files = sorted((e.name, e.is_symlink()) for e in it
                               if not e.name.startswith(".") and not e.is_dir() and e.name.lower().endswith(IMAGE_EXTENSIONS))
        except OSError as e:
            raise ValueError(f"cannot list folder '{path}': {e.strerror or e}") from e
        if not files:
            raise ValueError(f"artphoto source '{path}' has no images at its top level (expected the flat "
                             f"testImages_artphoto folder of <emotion>_<n>.jpg files)")
        index = {c: i for i, c in enumerate(MIKELS_EMOTIONS)}
        rows, outside = [], []
        for name, is_link in files:
            emotion = _mikels(name.split("_", 1)[0]) if "_" in name else None
            if emotion is None:
                raise ValueError(f"artphoto: file '{name}' in '{path}' is not named <emotion>_<n> with one of "
                                 f"{', '.join(MIKELS_EMOTIONS)} (or the release's 'sad')")
            rows.append((index[emotion], name))
            if is_link and self._confine is not None:
                target = outside_root(os.path.join(path, name), self._confine)
                if target is not None:
                    outside.append((name, target))
        missing = sorted(set(MIKELS_EMOTIONS) - {MIKELS_EMOTIONS[i] for i, _ in rows})
        if missing:
            raise ValueError(f"artphoto source '{path}' has no images of {missing}; ArtPhoto has all 8 emotions")
        warn_outside(outside, path)
        rows.sort()
        self._finish(path, path, MIKELS_EMOTIONS, [k for _, k in rows], [c for c, _ in rows])


class AbstractSource(Source):
    """Abstract: ``ABSTRACT_groundTruth.csv`` votes -> majority label, vote distribution as extras.

    Parameters
    ----------
    path : str
        The folder holding ``ABSTRACT_groundTruth.csv`` and the images it names.
    ties : {"drop", "first"}
        An image whose most-chosen emotions are tied has no majority label. ``"drop"``
        (default) leaves it out, giving the 228-image set the literature classifies;
        ``"first"`` keeps all 280, labelled with the first tied emotion in class order (an
        arbitrary choice), and adds a ``tied`` extra (1 for those images).

    Classes are :data:`~clip_heads.emotions.MIKELS_EMOTIONS`; items are ordered by class, then
    file name; keys are the file names. Extras: ``votes`` (n, 8) int32 and
    ``emotion_distribution`` (n, 8) float32 (votes / their sum), columns in class order.
    """

    format = "abstract"
    kind = "emotions"

    def __init__(self, path: str, ties: str = "drop", allow_outside_root: bool = False) -> None:
        require_dir(path, self.format)
        self._set_root_policy(path, allow_outside_root)
        if ties not in ABSTRACT_TIES:
            raise BadValueError(f"abstract ties must be one of {', '.join(ABSTRACT_TIES)}; got {ties!r}")
        gt = os.path.join(path, ABSTRACT_GROUND_TRUTH)
        if not os.path.exists(gt):
            raise FileNotFoundError(f"abstract source '{path}' lacks '{ABSTRACT_GROUND_TRUTH}' (expected the "
                                    "testImages_abstract folder: the images beside their vote table)")
        check_inside(gt, self._confine, f"'{ABSTRACT_GROUND_TRUTH}'", path)
        names, votes = self._read_votes(gt, path)
        table = np.asarray(votes, dtype=np.int64)
        top = table.max(axis=1, keepdims=True)
        tied = (table == top).sum(axis=1) > 1
        label = table.argmax(axis=1)  # the first maximum: the first tied emotion in class order
        keep = ~tied if ties == "drop" else np.ones(len(names), bool)
        if ties == "drop" and tied.any():
            logger.info("abstract: %d of %d images have tied votes and no majority label; left out (ties='first' "
                        "keeps them)", int(tied.sum()), len(names))
        order = sorted(np.flatnonzero(keep), key=lambda i: (label[i], names[i]))
        table = table[order]
        extras = {"votes": table.astype(np.int32),
                  "emotion_distribution": (table / table.sum(axis=1, keepdims=True)).astype(np.float32)}
        meta = {"votes": list(MIKELS_EMOTIONS), "emotion_distribution": list(MIKELS_EMOTIONS)}
        if ties == "first":
            extras["tied"] = tied[order].astype(np.int8)
        self._finish(path, path, MIKELS_EMOTIONS, [names[i] for i in order], label[order], extras, meta,
                     options={"ties": ties})

    def _read_votes(self, gt: str, root: str) -> tuple[list[str], list[list[int]]]:
        reader = csv.reader(open_text(gt, "abstract ground truth", newline=""), skipinitialspace=True)
        names: list[str] = []
        votes: list[list[int]] = []
        seen: dict[str, int] = {}
        row_no = 0
        try:
            header = next(reader, [])
            columns = [_mikels(h) for h in header[1:]]
            if len(header) != 9 or sorted(c or "" for c in columns) != MIKELS_EMOTIONS:
                raise ValueError(f"'{gt}' header must be a file-name column and the 8 emotions "
                                 f"(Amusement, Anger, Awe, Content, Disgust, Excitement, Fear, Sad); got {header}")
            perm = [columns.index(c) for c in MIKELS_EMOTIONS]
            for row_no, row in enumerate(reader, 1):
                if not any(c.strip() for c in row):
                    continue
                where = f"'{gt}' row {row_no} (line {reader.line_num})"
                name = row[0].strip().strip("'\"").strip()
                try:
                    counts = [int(c.strip().strip("'\"")) for c in row[1:]]
                except ValueError:
                    counts = []
                if not name or len(counts) != 8 or min(counts) < 0:
                    raise ValueError(f"{where}: expected a file name and 8 vote counts (integers >= 0), got {row}")
                if sum(counts) == 0:
                    raise ValueError(f"{where}: '{name}' has no votes, so neither a label nor a distribution")
                if name in seen:
                    raise ValueError(f"{where}: '{name}' already listed in row {seen[name]}")
                seen[name] = row_no
                check_listed_file(os.path.join(root, name), name, root, where, self._confine)
                names.append(name.replace("\\", "/"))
                votes.append([counts[j] for j in perm])
        except csv.Error as e:
            raise ValueError(f"'{gt}' row {row_no + 1} (line {reader.line_num}): {e}") from e
        except UnicodeDecodeError as e:
            raise ValueError(f"'{gt}' is not UTF-8 text ({e.reason} at byte {e.start})") from e
        if not names:
            raise ValueError(f"abstract source '{root}' contains no images ('{gt}' lists none)")
        return names, votes
