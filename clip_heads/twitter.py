"""Twitter I (You et al., AAAI 2015): 1,269 Twitter images, positive or negative, by agreement.

Five Amazon Mechanical Turk workers labelled each image's sentiment. The release
(``Twitter_PCNN`` on Quanzeng You's page) is a folder::

    Agg_AMT_Candidates/<name>.jpg     the 1,269 images
    five_agree.txt                    "<name> <0|1>" per line: all five agreed (882 images)
    four_agree.txt                    at least four agreed (1,116)
    three_agree.txt                   at least three agreed: every image (1,269)

with 1 = positive, 0 = negative. The subsets are nested; an image's label is the same in every
list that holds it (checked).
"""
from __future__ import annotations

import logging
import os

import numpy as np

from .emotions import POLARITY
from .errors import BadValueError
from .folders import check_inside, check_listed_file, read_lines, require_dir
from .source import Source

logger = logging.getLogger(__name__)

TWITTER_IMAGES = "Agg_AMT_Candidates"
TWITTER_LISTS = {5: "five_agree.txt", 4: "four_agree.txt", 3: "three_agree.txt"}


class TwitterISource(Source):
    """Twitter I: ``negative``/``positive`` from the agreement lists.

    Parameters
    ----------
    path : str
        The folder holding ``Agg_AMT_Candidates/`` and the ``*_agree.txt`` lists.
    agreement : {3, 4, 5}
        The subset: images on which at least this many of the five workers agreed. 3
        (default) is the whole dataset; the lists for this level and every higher one are read.

    Classes are ``["negative", "positive"]``; items are ordered by class, then file name; keys
    are the file names. Extra ``agreement`` (int8): the largest number of agreeing workers
    whose list holds the image (3, 4 or 5), so a store encoded at 3 can be cut to 4 or 5.
    """

    format = "twitter1"
    kind = "emotions"

    def __init__(self, path: str, agreement: int | str = 3, allow_outside_root: bool = False) -> None:
        require_dir(path, self.format)
        self._set_root_policy(path, allow_outside_root)
        if str(agreement).strip() not in {str(k) for k in TWITTER_LISTS}:
            raise BadValueError(f"twitter1 agreement must be one of 3, 4, 5; got {agreement!r}")
        agreement = int(agreement)
        images = os.path.join(path, TWITTER_IMAGES)
        levels = [k for k in sorted(TWITTER_LISTS, reverse=True) if k >= agreement]
        want = [f"{TWITTER_IMAGES}/"] + [TWITTER_LISTS[k] for k in levels]
        lacking = [w for w in want if not os.path.exists(os.path.join(path, w))]
        if lacking:
            raise ValueError(f"twitter1 source '{path}' lacks {', '.join(lacking)} "
                             f"(expected the Twitter I release: {', '.join(want)})")
        check_inside(images, self._confine, f"'{TWITTER_IMAGES}'", path)
        label: dict[str, int] = {}
        level: dict[str, int] = {}
        for k in levels:  # strongest agreement first, so each image keeps its largest level
            list_file = os.path.join(path, TWITTER_LISTS[k])
            check_inside(list_file, self._confine, f"'{TWITTER_LISTS[k]}'", path)
            listed: set[str] = set()
            for lineno, line in read_lines(list_file, "twitter1 agreement list"):
                where = f"'{TWITTER_LISTS[k]}' line {lineno}"
                parts = line.split()
                if len(parts) != 2 or parts[1] not in ("0", "1"):
                    raise ValueError(f"{where}: expected '<image name> <0|1>', got {line[:120]!r}")
                name, value = parts[0].replace("\\", "/"), int(parts[1])
                if name in listed:
                    raise ValueError(f"{where}: '{name}' is listed twice")
                listed.add(name)
                if name in label:
                    if label[name] != value:
                        raise ValueError(f"{where}: '{name}' is {POLARITY[value]} here but {POLARITY[label[name]]} "
                                         f"in '{TWITTER_LISTS[level[name]]}'")
                    continue
                check_listed_file(os.path.join(images, name), name, images, where, self._confine)
                label[name], level[name] = value, k
            missing = sorted(set(label) - listed)
            if missing:  # the subsets are nested: a 5-agree image is also a 4- and 3-agree one
                raise ValueError(f"twitter1: '{TWITTER_LISTS[k]}' lacks {len(missing)} image(s) of the stronger "
                                 f"agreement list(s), e.g. '{missing[0]}'")
        keys = sorted(label, key=lambda n: (label[n], n))
        self._finish(path, images, POLARITY, keys, [label[n] for n in keys],
                     {"agreement": np.asarray([level[n] for n in keys], dtype=np.int8)},
                     options={"agreement": agreement})
