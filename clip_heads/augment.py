"""Augmented views of an image for ``encode --views K``: random resized crop + horizontal flip.

The recipe of Tip-Adapter's and CLAP's caches (torchvision's ``RandomResizedCrop`` at scale
0.5-1 and ``RandomHorizontalFlip``), reimplemented on PIL so that it needs no torchvision: a
crop of area ``s * A`` (``s`` uniform in ``scale``) and aspect ratio ``r`` (log-uniform in
``ratio``) at a uniform position, tried up to 10 times, else the centre crop of the largest
allowed box; resized to ``size x size`` (bicubic), then flipped with probability 1/2.

**Seeded per image.** View ``j`` of an image depends only on ``(seed, key, j)`` (a generator
seeded from the SHA-256 of the key), so a resumed or re-sharded encode writes the same views as
an uninterrupted one, whatever order the images arrive in. :func:`recipe` is what a store
records in its ``views`` attribute (JSON).

**Into the model.** :func:`view_pixels` is what an encode feeds the model for each view: for a
fixed-resolution family (:class:`~clip_heads.backbones.preprocess.Preprocess`) the crop is
resized straight to the model's input size (``out_width x out_height``, as ``RandomResizedCrop``
does), flipped, then rescaled and normalised by the family's own recipe; for a family whose
processor sizes each image itself (SigLIP 2's NaFlex) the crop is flipped and handed to that
processor whole. The box is drawn on the image as decoded (with ``--decode draft`` or
``simplejpeg`` a JPEG is decoded reduced, and its boxes are drawn on that image).
"""
from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["RECIPE", "VERSION", "view_boxes", "augmented_views", "recipe", "view_pixels", "check_views_count"]

SCALE = (0.5, 1.0)
RATIO = (3 / 4, 4 / 3)
FLIP = 0.5
ATTEMPTS = 10
VERSION = 1  # of the recipe: a store records it, and a resume or a merge must match it


def recipe(k: int, seed: int = 0) -> dict[str, Any]:
    """The views' recipe as a store records it (JSON-ready)."""
    return {"views": int(k), "crop": "random-resized", "scale": list(SCALE), "ratio": list(RATIO), "flip": FLIP,
            "attempts": ATTEMPTS, "resample": "bicubic", "seed": int(seed), "rng": "sha256(seed, key, view)",
            "resize": "to the model's input size, then the family's normalisation (NaFlex: its processor)",
            "version": VERSION}


def check_views_count(k: Any) -> int:
    """``--views K`` as an int >= 0 (0: no views), or a one-line ``ValueError``."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or int(k) < 0:
        raise ValueError(f"--views must be a whole number of augmented views per image, 0 (none) or more; got {k!r}")
    return int(k)


RECIPE = recipe(0)


def _rng(key: str, view: int, seed: int) -> np.random.Generator:
    digest = hashlib.sha256(f"{int(seed)}\0{key}\0{int(view)}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def view_boxes(width: int, height: int, key: str, k: int, seed: int = 0) -> list[tuple[tuple[int, int, int, int], bool]]:
    """``[(box (left, upper, right, lower), flipped), ...]`` of the ``k`` views of an image of
    ``width x height`` named ``key``: the crop boxes and flips alone, for tests and provenance."""
    area = width * height
    out = []
    for j in range(int(k)):
        rng = _rng(key, j, seed)
        box = None
        for _ in range(ATTEMPTS):
            target = area * rng.uniform(*SCALE)
            r = math.exp(rng.uniform(math.log(RATIO[0]), math.log(RATIO[1])))
            w, h = int(round(math.sqrt(target * r))), int(round(math.sqrt(target / r)))
            if 0 < w <= width and 0 < h <= height:
                left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
                box = (left, top, left + w, top + h)
                break
        if box is None:  # torchvision's fallback: the centre crop within the ratio bounds
            in_ratio = width / height
            w, h = ((width, int(round(width / RATIO[0]))) if in_ratio < RATIO[0] else
                    (int(round(height * RATIO[1])), height) if in_ratio > RATIO[1] else (width, height))
            w, h = min(w, width), min(h, height)
            left, top = (width - w) // 2, (height - h) // 2
            box = (left, top, left + w, top + h)
        out.append((box, bool(rng.uniform() < FLIP)))
    return out


def augmented_views(image: Image.Image, key: str, k: int, size: int | tuple[int, int] | None,
                    seed: int = 0) -> list[Image.Image]:
    """The ``k`` augmented views of ``image`` (RGB), each ``size x size`` (or ``(width, height)``;
    None: the crop as it is, not resized); see the module docstring."""
    views = []
    wh = None if size is None else (int(size), int(size)) if isinstance(size, (int, np.integer)) else tuple(map(int, size))
    for box, flipped in view_boxes(image.width, image.height, key, k, seed):
        v = image.crop(box) if wh is None else image.resize(wh, Image.Resampling.BICUBIC, box=box)
        views.append(v.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flipped else v)
    return views


def view_pixels(image: Image.Image, key: str, k: int, seed: int, preprocess: Any, uint8: bool = False) -> list[Any]:
    """The ``k`` views of ``image`` as the model takes them: each what ``preprocess`` (the
    family's recipe) makes of an image, or its uint8 crop (``uint8``, a fixed-size recipe only,
    normalised on the device as the plain images are). See the module docstring."""
    from dataclasses import is_dataclass, replace

    # A fixed-resolution recipe (clip_heads.backbones.preprocess.Preprocess, a layer above this
    # one: known by its interface) resizes to one size; a NaFlex processor sizes each image itself.
    if is_dataclass(preprocess) and hasattr(preprocess, "out_width") and hasattr(preprocess, "pixels"):
        # The views are already the model's size: the family's recipe, its resize and crop no-ops.
        size = (preprocess.out_width, preprocess.out_height)
        p = replace(preprocess, do_resize=False, do_center_crop=True, crop_width=size[0], crop_height=size[1])
        return [p.pixels(v) if uint8 else p(v) for v in augmented_views(image, key, k, size, seed)]
    return [preprocess(v) for v in augmented_views(image, key, k, None, seed)]
