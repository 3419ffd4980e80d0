"""Image preprocessing in DataLoader workers, equal to each family's own image processor.

Two recipes, both picklable so workers apply them next to decoding:

* :class:`Preprocess` re-implements a fixed-resolution processor with PIL + numpy: CLIP's
  shortest-edge resize and centre crop, or SigLIP's resize of the whole image to a square with
  no crop. It is the faster path (bench_encode.py measures it against the processor) and the
  tests hold it to the family's processor within 1e-3 on real JPEGs.
* :class:`ProcessorPreprocess` runs the model's own processor: SigLIP 2's NaFlex processor,
  whose size depends on each image (patches at the native aspect ratio, padded to a fixed count)
  and whose batches carry ``pixel_attention_mask`` and ``spatial_shapes`` beside the pixels.

:func:`image_recipe` picks the recipe for a processor.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Union

import numpy as np
from PIL import Image

__all__ = ["Preprocess", "ProcessorPreprocess", "ImageRecipe", "image_recipe", "resample_code", "stack_batch"]

_RESAMPLE = {0: Image.NEAREST, 1: Image.LANCZOS, 2: Image.BILINEAR, 3: Image.BICUBIC, 4: Image.BOX, 5: Image.HAMMING}


def _size(value: Any) -> dict[str, int]:
    """A processor's size (a dict, or transformers 5's SizeDict) as ``{key: int}`` without empty keys."""
    if value is None:
        return {}
    items = value.items() if hasattr(value, "items") else vars(value).items()
    return {str(k): int(v) for k, v in items if v is not None}


def resample_code(value: Any) -> int:
    """PIL's resampling code from a processor's ``resample``: a PIL int or enum, or (with the
    torchvision backend of transformers) an ``InterpolationMode`` named "bicubic" etc."""
    if isinstance(value, int):
        return int(value)
    name = str(getattr(value, "value", value)).lower().rsplit(".", 1)[-1]
    codes = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
    if name not in codes:
        raise ValueError(f"unsupported image processor resample {value!r}; expected one of {sorted(codes)}")
    return codes[name]


@dataclass(frozen=True)
class Preprocess:
    """A fixed-resolution image processor's recipe: resize, optional centre crop, rescale, normalise.

    The resize is CLIP's (shortest edge to ``shortest_edge``, the aspect ratio kept) unless
    ``resize_height``/``resize_width`` are set: then the whole image is resized to exactly that
    size, its aspect ratio not kept (SigLIP's processors). Output ``(3, out_height, out_width)``.
    """

    shortest_edge: int = 224
    crop_height: int = 224
    crop_width: int = 224
    resample: int = 3  # PIL bicubic, as CLIP
    do_resize: bool = True
    do_center_crop: bool = True
    rescale_factor: float = 1 / 255
    do_rescale: bool = True
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    resize_height: int | None = None
    resize_width: int | None = None

    def __post_init__(self) -> None:
        if not self.do_center_crop and (self.resize_height is None or not self.do_resize):
            # Shortest-edge resizing without a crop gives each image its own size: no batch of them.
            raise ValueError("unsupported image processor: without a centre crop, every image must be resized to one "
                             "fixed (height, width)")

    @classmethod
    def from_processor(cls, proc: Any) -> "Preprocess":
        """The recipe of a fixed-resolution processor (CLIP's, SigLIP's, Chinese-CLIP's...)."""
        if getattr(proc, "max_num_patches", None) is not None:
            raise ValueError(f"{type(proc).__name__} resizes each image to its own number of patches (NaFlex): "
                             "use image_recipe(processor), which runs that processor itself")
        size, crop = _size(getattr(proc, "size", None)), _size(getattr(proc, "crop_size", None))
        do_crop = bool(getattr(proc, "do_center_crop", False))
        common = dict(resample=resample_code(getattr(proc, "resample", 3)), do_resize=bool(getattr(proc, "do_resize", True)),
                      rescale_factor=float(getattr(proc, "rescale_factor", 1 / 255)),
                      do_rescale=bool(getattr(proc, "do_rescale", True)),
                      do_normalize=bool(getattr(proc, "do_normalize", True)),
                      image_mean=tuple(float(v) for v in proc.image_mean), image_std=tuple(float(v) for v in proc.image_std))
        if "shortest_edge" in size and "longest_edge" not in size:
            s = size["shortest_edge"]
            return cls(shortest_edge=s, crop_height=crop.get("height", s), crop_width=crop.get("width", s),
                       do_center_crop=do_crop, **common)
        if {"height", "width"} <= size.keys():
            h, w = size["height"], size["width"]
            return cls(shortest_edge=min(h, w), crop_height=crop.get("height", h) if do_crop else h,
                       crop_width=crop.get("width", w) if do_crop else w, do_center_crop=do_crop,
                       resize_height=h, resize_width=w, **common)
        raise ValueError(f"unsupported image processor size {size}: expected shortest_edge or height/width")

    def config(self) -> dict:
        return asdict(self)

    @property
    def out_height(self) -> int:
        return self.crop_height if self.do_center_crop else int(self.resize_height)

    @property
    def out_width(self) -> int:
        return self.crop_width if self.do_center_crop else int(self.resize_width)

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """``(width, height)`` of an image of this size after the resize."""
        if self.resize_height is not None:
            return int(self.resize_width), int(self.resize_height)
        # Shortest edge to `shortest_edge`, the long edge truncated, as transformers does.
        s = self.shortest_edge
        if width <= height:
            return s, int(s * height / width)
        return int(s * width / height), s

    def __call__(self, img: Image.Image) -> np.ndarray:
        """RGB PIL image -> float32 array ``(3, out_height, out_width)``."""
        if self.do_resize:
            img = img.resize(self.resized_size(*img.size), resample=_RESAMPLE.get(self.resample, Image.BICUBIC))
        if self.do_center_crop:
            w, h = img.size
            top, left = int((h - self.crop_height) / 2.0), int((w - self.crop_width) / 2.0)
            if top < 0 or left < 0:
                # Smaller than the crop: pad with zeros like the reference centre crop.
                canvas = Image.new("RGB", (max(w, self.crop_width), max(h, self.crop_height)))
                canvas.paste(img, (max(0, -left), max(0, -top)))
                img, top, left = canvas, max(top, 0), max(left, 0)
            img = img.crop((left, top, left + self.crop_width, top + self.crop_height))
        # Channels first while still uint8 (a cheap copy), then rescale and normalise as one affine
        # map in place: (x * rescale - mean) / std == x * (rescale / std) - mean / std.
        x = np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)).astype(np.float32)
        scale = np.float32(self.rescale_factor) if self.do_rescale else np.float32(1.0)
        if self.do_normalize:
            mean, std = np.asarray(self.image_mean, np.float32), np.asarray(self.image_std, np.float32)
            x *= (scale / std)[:, None, None]
            x -= (mean / std)[:, None, None]
        elif self.do_rescale:
            x *= scale
        return x

    def example(self, n: int):
        """``n`` random preprocessed images as the model takes them (for warm-ups and benchmarks)."""
        import torch

        return torch.randn(n, 3, self.out_height, self.out_width)


@dataclass(frozen=True)
class ProcessorPreprocess:
    """The model's own image processor, run per image in the workers (SigLIP 2 NaFlex).

    Returns a dict of arrays per image (``pixel_values`` ``(patches, 3 * p * p)``,
    ``pixel_attention_mask`` ``(patches,)``, ``spatial_shapes`` ``(2,)``), which
    :class:`clip_heads.loading.DecodedBatches` stacks into a batch of the same keys.
    """

    processor: Any = field(repr=False)
    do_resize: bool = True

    def __call__(self, img: Image.Image) -> dict[str, np.ndarray]:
        out = self.processor(images=[img], return_tensors="np")
        return {k: np.asarray(v[0]) for k, v in out.items()}

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        from transformers.models.siglip2.image_processing_pil_siglip2 import get_image_size_for_max_num_patches

        p = self.processor
        h, w = get_image_size_for_max_num_patches(height, width, int(p.patch_size), int(p.max_num_patches))
        return int(w), int(h)

    def config(self) -> dict:
        keep = ("image_processor_type", "patch_size", "max_num_patches", "resample", "do_resize", "do_rescale",
                "rescale_factor", "do_normalize", "image_mean", "image_std")
        d = self.processor.to_dict()
        return {k: (resample_code(d[k]) if k == "resample" else d[k]) for k in keep if k in d}

    def example(self, n: int) -> dict:
        """``n`` preprocessed random images, as a batch."""
        rng = np.random.default_rng(0)
        imgs = [Image.fromarray(rng.integers(0, 255, (256, 320, 3), dtype=np.uint8)) for _ in range(n)]
        import torch

        return {k: torch.from_numpy(np.asarray(v)) for k, v in self.processor(images=imgs, return_tensors="np").items()}


ImageRecipe = Union[Preprocess, ProcessorPreprocess]


def image_recipe(processor: Any) -> ImageRecipe:
    """The worker-side recipe equal to ``processor``: numpy for fixed resolutions, the processor
    itself for NaFlex (its batches carry ``pixel_attention_mask`` and ``spatial_shapes``)."""
    if getattr(processor, "max_num_patches", None) is not None:
        return ProcessorPreprocess(processor)
    return Preprocess.from_processor(processor)


def stack_batch(items: list) -> Any:
    """Preprocessed images as one batch: a float32 tensor ``(B, 3, H, W)``, or a dict of
    tensors when each image is a dict of arrays (NaFlex: patches, their mask, the patch grid).
    No images: ``torch.zeros(0)``."""
    import torch

    if not items:
        return torch.zeros(0)
    if isinstance(items[0], dict):
        return {k: torch.from_numpy(np.stack([it[k] for it in items])) for k in items[0]}
    return torch.from_numpy(np.stack(items))
