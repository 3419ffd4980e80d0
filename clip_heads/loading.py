"""Decoding a source's images a batch at a time: the one bad-image policy.

:class:`DecodedBatches` is what encode, the fine-tune and its zero-shot evaluation feed to a
``DataLoader`` (``batch_size=None``: each item is already a batch). An image that cannot be
decoded (:class:`~clip_heads.images.BadImage`: a broken or hostile file, or one whose resize
would blow up) is skipped and reported with its reason; any other exception is a bug and
propagates with its traceback, so it can never pass for 1,980 skipped images.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from .backbones.preprocess import ImageRecipe, Preprocess, stack_batch
from .images import DECODERS, BadImage, reduced_decoding, simplejpeg_available
from .source import Source

__all__ = ["DecodedBatches", "resolve_decode", "DEFAULT_DECODE"]

# What --decode auto means: the fastest path whose embeddings stay at cosine >= 0.9999 against
# the full decode (bench_encode.py measures each path; tests/test_encode_speed.py holds the default
# to the bound on real JPEGs). Without the fast-decode extra it is PIL's draft, nearly as fast.
DEFAULT_DECODE = "simplejpeg"


def resolve_decode(decode: str, preprocess: ImageRecipe) -> str:
    """The decode path a run uses, as a store records it: "auto" is :data:`DEFAULT_DECODE`
    (PIL's "draft" where simplejpeg is not installed); a recipe that is not a fixed-size resize
    (SigLIP 2's NaFlex processor sizes each image itself) decodes "exact" whatever was asked."""
    from .catalog import DECODE_PATHS

    if decode not in DECODE_PATHS:
        raise ValueError(f"unknown --decode {decode!r}; valid: {', '.join(DECODE_PATHS)}")
    if not isinstance(preprocess, Preprocess) or not preprocess.do_resize:
        return "exact"
    if decode == "simplejpeg" and not simplejpeg_available():
        raise ValueError("--decode simplejpeg needs the simplejpeg package: pip install 'clip-heads[fast-decode]' "
                         "(or use --decode draft, nearly as fast, or auto)")
    if decode == "auto":
        return DEFAULT_DECODE if DEFAULT_DECODE != "simplejpeg" or simplejpeg_available() else "draft"
    return decode


class DecodedBatches(Dataset):
    """Batch ``b`` is items ``positions[b*batch_size:(b+1)*batch_size]`` of ``source``,
    decoded and preprocessed.

    Parameters
    ----------
    source : Source
    positions : np.ndarray
        Item positions in the source, in the order to decode them.
    batch_size : int
    preprocess : Preprocess or ProcessorPreprocess
        The model's image recipe (:func:`clip_heads.backbones.preprocess.image_recipe`); its
        resize is checked against the source's ``limits.max_resized_pixels`` before it runs.

    Each item is a dict: ``n`` (items in the batch), ``good`` (their positions that decoded),
    ``pixels`` (float32 tensor ``(len(good), 3, H, W)``, or empty; for a recipe that returns a
    dict per image, such as SigLIP 2's NaFlex processor, a dict of the same keys, each stacked),
    ``bad`` (list of ``(position, reason)``).

    decode : "exact" (default: the full decode), "draft" or "simplejpeg": JPEGs decoded reduced
        in the DCT domain, their shortest side kept >= twice the resize target
        (:func:`clip_heads.images.reduced_decoding`); see :func:`resolve_decode`.
    uint8 : ship the crops as uint8 ``(B, 3, H, W)`` (a :class:`Preprocess` recipe only), for
        :meth:`Preprocess.normalize` to rescale on the device.
    views, views_seed : also ``views`` augmented views of each decoded image
        (:func:`clip_heads.augment.view_pixels`, seeded by ``views_seed`` and the item's key):
        the item then has ``view_pixels``, the ``len(good) * views`` views image by image, as
        ``pixels`` is stacked (no such key when ``views`` is 0).
    """

    def __init__(self, source: Source, positions: np.ndarray, batch_size: int, preprocess: ImageRecipe,
                 decode: str = "exact", uint8: bool = False, views: int = 0, views_seed: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        if decode not in DECODERS:
            raise ValueError(f"unknown decode path {decode!r}; valid: {', '.join(DECODERS)}")
        if decode != "exact" and not (isinstance(preprocess, Preprocess) and preprocess.do_resize):
            raise ValueError(f"decode path {decode!r} needs a fixed-size resize recipe; {type(preprocess).__name__} "
                             "decodes exact")
        if uint8 and not isinstance(preprocess, Preprocess):
            raise ValueError(f"uint8 crops need a fixed-size recipe, not {type(preprocess).__name__}")
        self.source, self.positions = source, np.asarray(positions)
        self.batch_size, self.preprocess = batch_size, preprocess
        self.decode, self.uint8 = decode, uint8
        self.views, self.views_seed = int(views), int(views_seed)

    def __len__(self) -> int:
        return (len(self.positions) + self.batch_size - 1) // self.batch_size

    def __getitem__(self, b: int) -> dict[str, Any]:
        if not 0 <= b < len(self):
            raise IndexError(f"batch {b} out of range 0..{len(self) - 1}")
        chunk = self.positions[b * self.batch_size: (b + 1) * self.batch_size]
        good, pixels, bad, views = [], [], [], []
        for i in chunk:
            try:
                px, vs = self._decode(int(i))
                pixels.append(px)
                views += vs
                good.append(int(i))
            except BadImage as e:  # only decoding problems are skipped; anything else is a bug
                bad.append((int(i), str(e) or "unreadable image"))
        out = {"n": len(chunk), "good": good, "pixels": stack_batch(pixels), "bad": bad}
        if self.views:
            out["view_pixels"] = stack_batch(views)
        return out

    def _decode(self, i: int) -> tuple[Any, list]:
        p = self.preprocess
        reduce = reduced_decoding(self.decode, 2 * p.min_side) if self.decode != "exact" else nullcontext()
        with reduce:
            img = self.source.load(i)
        if p.do_resize:
            w, h = p.resized_size(*img.size)
            limit = self.source.limits.max_resized_pixels
            if w * h > limit:
                raise BadImage(f"extreme aspect ratio ({img.size[0]}x{img.size[1]} would be resized to "
                               f"{w}x{h}, over {limit} pixels)")
        plain = p.pixels(img) if self.uint8 else p(img)
        if not self.views:
            return plain, []
        from .augment import view_pixels

        return plain, view_pixels(img, str(self.source.keys[i]), self.views, self.views_seed, p, self.uint8)
