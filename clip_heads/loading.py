"""Decoding a source's images a batch at a time: the one bad-image policy.

:class:`DecodedBatches` is what encode, the fine-tune and its zero-shot evaluation feed to a
``DataLoader`` (``batch_size=None``: each item is already a batch). An image that cannot be
decoded (:class:`~clip_heads.images.BadImage`: a broken or hostile file, or one whose resize
would blow up) is skipped and reported with its reason; any other exception is a bug and
propagates with its traceback, so it can never pass for 1,980 skipped images.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from .backbones.preprocess import ImageRecipe, Preprocess, stack_batch
from .images import DEFAULT_LIMITS, BadImage, reduced_decoding, simplejpeg_available
from .source import Source

__all__ = ["DecodedBatches", "decoded_image", "recipe_pixels", "decoded_pixels", "resolve_decode", "DEFAULT_DECODE", "DECODE_STEPS", "REDUCE_MARGIN"]

# A decode path, as a store records it -> (how a JPEG is decoded: clip_heads.images.DECODERS, how
# the decoded image is resized: clip_heads.backbones.preprocess.RESIZERS). "exact" is the reference:
# the full decode and the processor's own PIL resize. A name never changes meaning (a resume must
# redo nothing another way), so a new combination gets a new name.
DECODE_STEPS = {
    "exact": ("exact", "pil"),
    "draft": ("draft", "pil"),
    "simplejpeg": ("simplejpeg", "pil"),
    "draft-torch": ("draft", "torch"),
    "simplejpeg-torch": ("simplejpeg", "torch"),
}
# What --decode auto means: the fastest path whose embeddings stay at cosine >= 0.9999 against
# the reference (bench_encode.py measures each path; tests/test_encode_speed.py holds whatever auto
# resolves to, with and without simplejpeg, to that bound on real JPEGs). PIL's bicubic resize was
# ~60% of an Emotion6 image's cost; torch's uint8 kernel does it ~3x faster within 2/255.
DEFAULT_DECODE = "draft-torch"
# A reduced JPEG decode keeps its shortest side >= this many times the recipe's resize target.
REDUCE_MARGIN = 2
# A path needing the fast-decode extra -> what auto falls back to without it.
_WITHOUT_SIMPLEJPEG = {"simplejpeg": "draft", "simplejpeg-torch": "draft-torch"}


def resolve_decode(decode: str, preprocess: ImageRecipe) -> str:
    """The decode path a run uses, as a store records it: "auto" is :data:`DEFAULT_DECODE`
    (its PIL-draft twin where it needs simplejpeg and that is not installed); a recipe that is
    not a fixed-size resize (SigLIP 2's NaFlex processor sizes each image itself) decodes
    "exact" whatever was asked."""
    from .catalog import DECODE_PATHS

    if decode not in DECODE_PATHS:
        raise ValueError(f"unknown --decode {decode!r}; valid: {', '.join(DECODE_PATHS)}")
    if not isinstance(preprocess, Preprocess) or not preprocess.do_resize:
        return "exact"
    if decode == "auto":
        decode = DEFAULT_DECODE
        return _WITHOUT_SIMPLEJPEG.get(decode, decode) if not simplejpeg_available() else decode
    if DECODE_STEPS[decode][0] == "simplejpeg" and not simplejpeg_available():
        raise ValueError(f"--decode {decode} needs the simplejpeg package: pip install 'clip-heads[fast-decode]' "
                         f"(or use --decode {_WITHOUT_SIMPLEJPEG[decode]}, as fast here, or auto)")
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

    decode : a :data:`DECODE_STEPS` name: "exact" (default: the full decode, the processor's
        resize); "draft"/"simplejpeg": JPEGs decoded reduced in the DCT domain, their shortest side
        kept >= twice the resize target (:func:`clip_heads.images.reduced_decoding`); "-torch":
        resized by torch's uint8 kernel (:meth:`Preprocess.pixels`); see :func:`resolve_decode`.
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
        if decode not in DECODE_STEPS:
            raise ValueError(f"unknown decode path {decode!r}; valid: {', '.join(DECODE_STEPS)}")
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
        img = decoded_image(lambda: self.source.load(i), p, self.decode, self.source.limits.max_resized_pixels)
        plain = recipe_pixels(img, p, self.decode, self.uint8)
        if not self.views:
            return plain, []
        from .augment import view_pixels

        return plain, view_pixels(img, str(self.source.keys[i]), self.views, self.views_seed, p, self.uint8)


def decoded_image(load: Callable[[], Image.Image], preprocess: ImageRecipe, decode: str = "exact",
                  max_resized_pixels: int = DEFAULT_LIMITS.max_resized_pixels) -> Image.Image:
    """``load()`` (a source's ``load``, or :func:`~clip_heads.images.open_rgb` of a path) under
    ``decode``'s JPEG reduction. Raises :class:`BadImage` for a resize over ``max_resized_pixels``."""
    decoder = DECODE_STEPS[decode][0]
    # The decoded image keeps its short side >= twice the resize target: at 1x (1/4 of a 1536 px
    # JPEG for 224) the embeddings fell to cosine 0.9998 against the reference (bench_encode.py).
    reduce = reduced_decoding(decoder, REDUCE_MARGIN * preprocess.min_side) if decoder != "exact" else nullcontext()
    with reduce:
        img = load()
    if preprocess.do_resize:
        w, h = preprocess.resized_size(*img.size)
        if w * h > max_resized_pixels:
            raise BadImage(f"extreme aspect ratio ({img.size[0]}x{img.size[1]} would be resized to "
                           f"{w}x{h}, over {max_resized_pixels} pixels)")
    return img


def recipe_pixels(img: Image.Image, preprocess: ImageRecipe, decode: str = "exact", uint8: bool = False) -> Any:
    """A decoded image through the recipe with ``decode``'s resizer: the array (uint8 crops when
    ``uint8``), or the recipe's dict (NaFlex)."""
    if isinstance(preprocess, Preprocess):
        resizer = DECODE_STEPS[decode][1]
        return preprocess.pixels(img, resizer) if uint8 else preprocess(img, resizer)
    return preprocess(img)


def decoded_pixels(load: Callable[[], Image.Image], preprocess: ImageRecipe, decode: str = "exact",
                   uint8: bool = False, max_resized_pixels: int = DEFAULT_LIMITS.max_resized_pixels) -> Any:
    """One image as ``decode``'s path makes it, what :class:`DecodedBatches` does for each item's
    plain pixels: :func:`decoded_image`, then :func:`recipe_pixels`."""
    return recipe_pixels(decoded_image(load, preprocess, decode, max_resized_pixels), preprocess, decode, uint8)
