"""Loading a frozen Hugging Face CLIP and turning images and texts into its embeddings.

Any CLIP id (``openai/clip-vit-base-patch32``, the papers' model) or a local directory saved
with ``save_pretrained`` is loaded the same way. The model's own preprocessor config decides
resize, crop and normalisation; :class:`Preprocess` re-implements it with PIL + numpy so it can
run in DataLoader workers, and the tests hold it to ``CLIPImageProcessor`` on real JPEGs.

Which files a model is, and whether they are the ones a store or a run recorded, is
:mod:`clip_heads.identity` (no torch there); :func:`load_clip` loads exactly the files
:func:`~clip_heads.identity.resolve_model` found (safetensors only). The identity functions are
importable from here as well.
"""
from __future__ import annotations

import json
import logging
import os
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from .catalog import DEFAULT_MODEL, PRECISIONS
from .identity import ModelFiles, check_identity, model_identity, resolve_model, weights_hash

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_MODEL", "PRECISIONS", "Preprocess", "resolve_device", "resolve_precision", "autocast_for",
           "LoadedClip", "load_clip", "Backbone", "as_embeddings",
           # the model's identity, defined in clip_heads.identity
           "ModelFiles", "check_identity", "model_identity", "resolve_model", "weights_hash"]

_RESAMPLE = {0: Image.NEAREST, 1: Image.LANCZOS, 2: Image.BILINEAR, 3: Image.BICUBIC, 4: Image.BOX, 5: Image.HAMMING}


@dataclass(frozen=True)
class Preprocess:
    """The image processor's recipe: shortest-edge resize, centre crop, rescale, normalise.

    Picklable and light, so DataLoader workers can apply it next to decoding.
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

    @classmethod
    def from_processor(cls, proc) -> "Preprocess":
        size = dict(proc.size or {})
        crop = dict(getattr(proc, "crop_size", None) or {})
        if "shortest_edge" not in size:
            if not {"height", "width"} <= size.keys():
                raise ValueError(f"unsupported image processor size {size}: expected shortest_edge or height/width")
            # A fixed (h, w) resize: treat as resize-to-square with a crop of the same size.
            if size["height"] != size["width"]:
                raise ValueError(f"unsupported non-square resize {size}")
            size = {"shortest_edge": size["height"]}
            crop = crop or {"height": size["shortest_edge"], "width": size["shortest_edge"]}
        return cls(
            shortest_edge=int(size["shortest_edge"]),
            crop_height=int(crop.get("height", size["shortest_edge"])),
            crop_width=int(crop.get("width", size["shortest_edge"])),
            resample=_resample_code(getattr(proc, "resample", 3)),
            do_resize=bool(getattr(proc, "do_resize", True)),
            do_center_crop=bool(getattr(proc, "do_center_crop", True)),
            rescale_factor=float(getattr(proc, "rescale_factor", 1 / 255)),
            do_rescale=bool(getattr(proc, "do_rescale", True)),
            do_normalize=bool(getattr(proc, "do_normalize", True)),
            image_mean=tuple(float(v) for v in proc.image_mean),
            image_std=tuple(float(v) for v in proc.image_std),
        )

    def config(self) -> dict:
        return asdict(self)

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        # Shortest edge to `shortest_edge`, the long edge truncated, as transformers does.
        s = self.shortest_edge
        if width <= height:
            return s, int(s * height / width)
        return int(s * width / height), s

    def __call__(self, img: Image.Image) -> np.ndarray:
        """RGB PIL image -> float32 array ``(3, crop_height, crop_width)``."""
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
        x = np.asarray(img, dtype=np.float32)
        if self.do_rescale:
            x = x * np.float32(self.rescale_factor)
        if self.do_normalize:
            x = (x - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1))


def _resample_code(value) -> int:
    """PIL's resampling code from a processor's ``resample``: a PIL int or enum, or (with the
    torchvision backend of transformers) an ``InterpolationMode`` named "bicubic" etc."""
    if isinstance(value, int):
        return int(value)
    name = str(getattr(value, "value", value)).lower().rsplit(".", 1)[-1]
    codes = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
    if name not in codes:
        raise ValueError(f"unsupported image processor resample {value!r}; expected one of {sorted(codes)}")
    return codes[name]


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"unknown --device {device!r}: use auto, cpu, cuda, cuda:N or mps") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r} asked for, but no CUDA GPU is available here; use --device cpu")
    return dev


def resolve_precision(device: torch.device, precision: str = "auto") -> str:
    """The precision a run uses: "auto" is fp16 on GPU, fp32 elsewhere."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    return precision


def autocast_for(device: torch.device, precision: str = "auto"):
    """fp16/bf16 autocast on GPU; full precision on CPU unless asked otherwise."""
    precision = resolve_precision(device, precision)
    if precision == "fp32":
        return nullcontext()
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class LoadedClip:
    """A CLIPModel with its tokenizer and image processor, and the files they came from."""

    model: Any
    tokenizer: Any
    processor: Any
    files: ModelFiles

    @property
    def identity(self) -> dict[str, str]:
        return self.files.identity()


def load_clip(model: str | os.PathLike | ModelFiles, device: torch.device | str = "cpu", dtype=None) -> LoadedClip:
    """THE way a CLIP is loaded: resolve its files (:func:`resolve_model`), then load model,
    tokenizer and image processor from that folder, safetensors only, never touching the hub again.

    A checkpoint that is not a complete CLIP (another model type, missing weights) is refused.
    """
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    files = model if isinstance(model, ModelFiles) else resolve_model(model)
    try:
        model_type = json.loads((files.path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"cannot load CLIP model {files.model_id!r}: unreadable config.json in {files.path} ({e})") from e
    if model_type != "clip":
        raise ValueError(f"{files.model_id} is a {model_type!r} model (config.json model_type); clip-heads needs a "
                         "complete CLIP (model_type 'clip') with both its image and text towers")
    kw = {} if dtype is None else {"dtype": dtype}
    try:
        clip, info = CLIPModel.from_pretrained(files.path, use_safetensors=True, output_loading_info=True, **kw)
        tokenizer = AutoTokenizer.from_pretrained(files.path)
        processor = AutoImageProcessor.from_pretrained(files.path)
    except (OSError, ValueError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"cannot load CLIP model {files.model_id!r} from {files.path}: {first}") from e
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ValueError(f"{files.model_id} is not a complete CLIP: {len(missing)} weights are missing from its "
                         f"checkpoint (e.g. {missing[0]}), and would be random")
    return LoadedClip(clip.to(device), tokenizer, processor, files)


class Backbone:
    """A frozen CLIP: image and text towers, tokenizer and preprocessing, in eval mode.

    Parameters
    ----------
    model_id : hub id or local directory.
    device : "auto", "cpu", "cuda", "cuda:N", "mps".
    precision : "auto" (fp16 autocast on GPU, fp32 on CPU), "fp32", "fp16", "bf16".
    """

    def __init__(self, model_id: str | ModelFiles = DEFAULT_MODEL, device: str = "auto", precision: str = "auto"):
        self.device = resolve_device(device)
        self.precision = precision
        autocast_for(self.device, precision)  # validates the name early
        loaded = load_clip(model_id, self.device)
        self.model, self.tokenizer, self.files = loaded.model.eval(), loaded.tokenizer, loaded.files
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.preprocess = Preprocess.from_processor(loaded.processor)
        self.model_id = self.files.model_id
        self.identity = self.files.identity()
        self.model_hash, self.model_revision = self.files.weights_hash, self.files.revision
        self.dim = int(self.model.config.projection_dim)

    def provenance(self) -> dict:
        """Store attributes: ``model_id``, ``model_revision``, ``model_hash`` and ``preprocess``."""
        return dict(self.identity, preprocess=self.preprocess.config())

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed pixels ``(B, 3, H, W)`` -> image embeddings ``(B, dim)`` float32 (not normalised)."""
        pixels = pixels.to(self.device, non_blocking=True)
        with autocast_for(self.device, self.precision):
            out = self.model.get_image_features(pixel_values=pixels)
        return as_embeddings(out).float()

    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """RGB PIL images -> image embeddings ``(B, dim)``."""
        return self.encode_pixels(torch.from_numpy(np.stack([self.preprocess(im) for im in images])))

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256, progress: bool = False,
                     desc: str = "prompts") -> torch.Tensor:
        """Texts -> text embeddings ``(len(texts), dim)`` float32 (not normalised)."""
        from tqdm.auto import tqdm

        out = []
        with tqdm(total=len(texts), desc=desc, unit="prompt", disable=not progress or not texts) as bar:
            for i in range(0, len(texts), batch_size):
                tok = self.tokenizer(list(texts[i : i + batch_size]), padding=True, truncation=True, return_tensors="pt")
                tok = {k: v.to(self.device) for k, v in tok.items()}
                with autocast_for(self.device, self.precision):
                    feats = self.model.get_text_features(**tok)
                out.append(as_embeddings(feats).float().cpu())
                bar.update(len(out[-1]))
        return torch.cat(out) if out else torch.zeros(0, self.dim)


def as_embeddings(out) -> torch.Tensor:
    """The projected embeddings ``(B, dim)`` of ``get_image_features`` / ``get_text_features``."""
    # transformers 5 returns a BaseModelOutputWithPooling whose pooler_output is the projected
    # embedding; 4.x returned the tensor itself.
    return out if isinstance(out, torch.Tensor) else out.pooler_output
