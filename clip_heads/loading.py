"""Decoding a source's images a batch at a time: the one bad-image policy.

:class:`DecodedBatches` is what encode, the fine-tune and its zero-shot evaluation feed to a
``DataLoader`` (``batch_size=None``: each item is already a batch). An image that cannot be
decoded (:class:`~clip_heads.images.BadImage`: a broken or hostile file, or one whose resize
would blow up) is skipped and reported with its reason; any other exception is a bug and
propagates with its traceback, so it can never pass for 1,980 skipped images.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from torch.utils.data import Dataset

from .backbones.preprocess import ImageRecipe, stack_batch
from .images import BadImage
from .source import Source


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
    """

    def __init__(self, source: Source, positions: np.ndarray, batch_size: int, preprocess: ImageRecipe) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        self.source, self.positions = source, np.asarray(positions)
        self.batch_size, self.preprocess = batch_size, preprocess

    def __len__(self) -> int:
        return (len(self.positions) + self.batch_size - 1) // self.batch_size

    def __getitem__(self, b: int) -> dict[str, Any]:
        if not 0 <= b < len(self):
            raise IndexError(f"batch {b} out of range 0..{len(self) - 1}")
        chunk = self.positions[b * self.batch_size: (b + 1) * self.batch_size]
        good, pixels, bad = [], [], []
        for i in chunk:
            try:
                pixels.append(self._decode(int(i)))
                good.append(int(i))
            except BadImage as e:  # only decoding problems are skipped; anything else is a bug
                bad.append((int(i), str(e) or "unreadable image"))
        return {"n": len(chunk), "good": good, "pixels": stack_batch(pixels), "bad": bad}

    def _decode(self, i: int) -> Any:
        img = self.source.load(i)
        p = self.preprocess
        if p.do_resize:
            w, h = p.resized_size(*img.size)
            limit = self.source.limits.max_resized_pixels
            if w * h > limit:
                raise BadImage(f"extreme aspect ratio ({img.size[0]}x{img.size[1]} would be resized to "
                               f"{w}x{h}, over {limit} pixels)")
        return p(img)
