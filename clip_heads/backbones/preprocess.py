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

__all__ = ["RESIZERS", "Preprocess", "ProcessorPreprocess", "ImageRecipe", "image_recipe", "resample_code", "stack_batch"]

_RESAMPLE = {0: Image.NEAREST, 1: Image.LANCZOS, 2: Image.BILINEAR, 3: Image.BICUBIC, 4: Image.BOX, 5: Image.HAMMING}
# How Preprocess.pixels resizes: "pil" (the processor's own resize) or "torch" (its uint8 kernels).
RESIZERS = ("pil", "torch")
_TORCH_MODES = {2: "bilinear", 3: "bicubic"}  # PIL codes torch has an antialiased uint8 resize for


def _resize_torch(img: Image.Image, size: tuple[int, int], mode: str) -> np.ndarray:
    """RGB ``img`` resized to ``size`` (width, height) by torch: ``(3, height, width)`` uint8.

    The HWC array seen as NCHW is channels-last, the layout of torch's vectorised uint8 kernel
    (its antialiased filter is PIL's: support scaled with the reduction, bicubic a = -0.5)."""
    import torch
    import torch.nn.functional as F

    a = np.array(img, dtype=np.uint8)  # a writable copy: torch refuses to view a read-only buffer
    x = torch.from_numpy(a).permute(2, 0, 1)[None]
    w, h = size
    return F.interpolate(x, size=(h, w), mode=mode, antialias=True, align_corners=False)[0].numpy()



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

    def __call__(self, img: Image.Image, resizer: str = "pil") -> np.ndarray:
        """RGB PIL image -> float32 array ``(3, out_height, out_width)`` (``resizer``: see :meth:`pixels`)."""
        x = self.pixels(img, resizer).astype(np.float32)
        scale, shift = self._affine()
        if scale is not None:
            x *= scale[:, None, None]
        if shift is not None:
            x -= shift[:, None, None]
        return x

    @property
    def min_side(self) -> int:
        """The side a resize brings an image's shortest side to (the target a reduced JPEG
        decode must stay above; see :func:`clip_heads.images.reduced_decoding`)."""
        if self.resize_height is not None:
            return max(int(self.resize_height), int(self.resize_width))
        return int(self.shortest_edge)

    def _affine(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        # Rescale and normalise as one affine map: (x * rescale - mean) / std == x * (rescale / std) - mean / std.
        scale = np.float32(self.rescale_factor) if self.do_rescale else np.float32(1.0)
        if self.do_normalize:
            mean, std = np.asarray(self.image_mean, np.float32), np.asarray(self.image_std, np.float32)
            return (scale / std).astype(np.float32), (mean / std).astype(np.float32)
        return (np.full(3, scale, np.float32), None) if self.do_rescale else (None, None)

    def normalize(self, pixels):
        """uint8 crops ``(B, 3, H, W)`` (a torch tensor on any device) -> the float32 batch the
        model takes: the same affine map as :meth:`__call__`, as two separate float32 ops so the
        result equals the CPU path bit for bit, computed where the tensor is (the GPU)."""
        import torch

        x = pixels.to(torch.float32)
        scale, shift = self._affine()
        if scale is not None:
            x = x * torch.from_numpy(scale).to(x.device)[:, None, None]
        if shift is not None:
            x = x - torch.from_numpy(shift).to(x.device)[:, None, None]
        return x

    def pixels(self, img: Image.Image, resizer: str = "pil") -> np.ndarray:
        """RGB PIL image -> the resized, cropped uint8 array ``(3, out_height, out_width)``, before
        rescaling: a quarter of float32's bytes to ship, normalised on the device by :meth:`normalize`.

        ``resizer`` "pil" is the processor's own resize (the reference); "torch" is torch's uint8
        antialiased resize (``F.interpolate(antialias=True)``), the same filter as PIL's in vectorised
        fixed point: ~3x faster, within 2/255 of PIL's pixels (bench_encode.py). Filters torch has
        no antialiased uint8 kernel for (all but bilinear and bicubic) resize with PIL either way."""
        if resizer not in RESIZERS:
            raise ValueError(f"unknown resizer {resizer!r}; valid: {', '.join(RESIZERS)}")
        if self.do_resize and resizer == "torch" and self.resample in _TORCH_MODES:
            return self._center_crop(_resize_torch(img, self.resized_size(*img.size), _TORCH_MODES[self.resample]))
        if self.do_resize:
            img = img.resize(self.resized_size(*img.size), resample=_RESAMPLE.get(self.resample, Image.BICUBIC))
        # Channels first while still uint8 (a cheap copy).
        return self._center_crop(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))

    def _center_crop(self, a: np.ndarray) -> np.ndarray:
        """``(3, h, w)`` uint8 -> the centre crop, contiguous; smaller than the crop: padded with
        zeros like the reference centre crop."""
        if not self.do_center_crop:
            return np.ascontiguousarray(a)
        _, h, w = a.shape
        ch, cw = self.crop_height, self.crop_width
        top, left = int((h - ch) / 2.0), int((w - cw) / 2.0)
        if top >= 0 and left >= 0:
            return np.ascontiguousarray(a[:, top:top + ch, left:left + cw])
        out = np.zeros((a.shape[0], ch, cw), np.uint8)
        src = a[:, max(top, 0):max(top, 0) + ch, max(left, 0):max(left, 0) + cw]
        out[:, max(0, -top):max(0, -top) + src.shape[1], max(0, -left):max(0, -left) + src.shape[2]] = src
        return out

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
