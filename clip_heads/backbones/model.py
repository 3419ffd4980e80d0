"""THE factory: a model of any supported family, loaded by hub id or directory, with its
tokenizer, its image preprocessing and its family spec.

:func:`load_backbone` resolves the model's files (:func:`clip_heads.identity.resolve_model`:
safetensors only, hashed), reads its family from ``config.json``
(:func:`~clip_heads.backbones.families.family_of_folder`), and loads model, tokenizer and image
processor with transformers' own classes from that folder, never touching the hub again.
Encode, prompts, the fine-tune and WiSE-FT all load through it; nothing else in clip-heads
imports a transformers model class.
"""
from __future__ import annotations

import base64
import json
import logging
import os
from contextlib import nullcontext
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from ..catalog import DEFAULT_MODEL, FEATURES, PRECISIONS
from ..identity import ModelFiles, resolve_model
from . import towers
from .families import FamilySpec, family_of_folder
from .preprocess import ImageRecipe, image_recipe, stack_batch

logger = logging.getLogger(__name__)

__all__ = ["FEATURES", "resolve_device", "resolve_precision", "autocast_for", "Backbone", "load_backbone", "load_clip",
           "encode_array"]

def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if isinstance(device, torch.device):
        return device
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


def encode_array(a: np.ndarray) -> dict[str, Any]:
    """A float32 array as a JSON-able record (``shape``, ``dtype``, base64 ``data``), so a store's
    layout can carry it; :func:`clip_heads.store.create_layout` writes it as a dataset."""
    a = np.ascontiguousarray(a, dtype="<f4")
    return {"shape": list(a.shape), "dtype": "<f4", "data": base64.b64encode(a.tobytes()).decode("ascii")}


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _load_parts(files: ModelFiles, spec: FamilySpec, dtype: Any):
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer

    model_type = json.loads((files.path / "config.json").read_text()).get("model_type")
    model_cls = getattr(transformers, spec.model_classes[model_type])
    kw = {} if dtype is None else {"dtype": dtype}
    try:
        model, info = model_cls.from_pretrained(files.path, use_safetensors=True, output_loading_info=True, **kw)
    except (OSError, ValueError, RuntimeError, TypeError) as e:
        raise ValueError(f"cannot load {spec.title} model {files.model_id!r} from {files.path}: {_first_line(e)}") from e
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ValueError(f"{files.model_id} is not a complete {spec.title} model: {len(missing)} weights are missing "
                         f"from its checkpoint (e.g. {missing[0]}), and would be random")
    try:
        tokenizer = AutoTokenizer.from_pretrained(files.path)
    except (ImportError, OSError, ValueError, RuntimeError, TypeError) as e:
        # SigLIP's tokenizer is sentencepiece's: without that package transformers cannot build it.
        hint = " (pip install sentencepiece)" if "sentencepiece" in str(e).lower() else ""
        raise ValueError(f"cannot load the tokenizer of {spec.title} model {files.model_id!r} from {files.path}: "
                         f"{_first_line(e)}{hint}") from e
    try:
        processor = AutoImageProcessor.from_pretrained(files.path)
    except (OSError, ValueError, RuntimeError, TypeError) as e:
        raise ValueError(f"cannot load the image processor of {spec.title} model {files.model_id!r} from {files.path}: "
                         f"{_first_line(e)}") from e
    return model, tokenizer, processor


class Backbone:
    """A vision-language model of any supported family, ready to embed images and prompts.

    Parameters
    ----------
    model_id : hub id, local directory, or the :class:`~clip_heads.identity.ModelFiles` of one.
    device : "auto", "cpu", "cuda", "cuda:N", "mps".
    precision : "auto" (fp16 autocast on GPU, fp32 on CPU), "fp32", "fp16", "bf16"; the weights
        stay float32 (autocast computes in the lower precision).
    trainable : False (default): eval mode, no gradients (encode, prompts, zero-shot); True:
        the parameters keep their gradients, for the fine-tune.
    dtype : load the weights in this torch dtype instead of the checkpoint's.

    Attributes
    ----------
    model, tokenizer, processor : transformers' own objects.
    spec : the :class:`~clip_heads.backbones.families.FamilySpec`.
    preprocess : the worker-side image recipe equal to ``processor`` (picklable).
    dim, pre_dim : embedding and pre-projection dimensions; text_max_length : tokens per prompt.
    files, identity, model_id, model_hash, model_revision : which model this is.
    """

    def __init__(self, model_id: str | os.PathLike | ModelFiles = DEFAULT_MODEL, device: str | torch.device = "auto",
                 precision: str = "auto", trainable: bool = False, dtype: Any = None) -> None:
        self.device = resolve_device(device)
        self.precision = precision
        autocast_for(self.device, precision)  # validates the name early
        files = model_id if isinstance(model_id, ModelFiles) else resolve_model(model_id)
        self.spec = family_of_folder(files.path, f"model {files.model_id}")
        model, self.tokenizer, self.processor = _load_parts(files, self.spec, dtype)
        self.model = model.to(self.device)
        self.trainable = trainable
        if not trainable:
            self.model.eval()
            for p in self.model.parameters():
                p.requires_grad_(False)
        self.preprocess: ImageRecipe = image_recipe(self.processor)
        self.files, self.model_id = files, files.model_id
        self.identity = files.identity()
        self.model_hash, self.model_revision = files.weights_hash, files.revision
        self.dim = towers.embed_dim(self.model, self.spec)
        self.pre_dim = towers.pre_dim(self.model, self.spec)
        self.text_max_length = towers.text_max_length(self.model, self.tokenizer, self.spec)

    @property
    def family(self) -> str:
        return self.spec.name

    # -- what a store records --------------------------------------------------------------
    def scoring_attrs(self) -> dict[str, Any]:
        """``family``, ``scoring``, ``logit_scale`` (a temperature) and ``logit_bias`` (sigmoid
        families), the text rule: what :meth:`clip_heads.zeroshot.ScoringRule.from_attrs` reads."""
        return dict(self.spec.record(), text_max_length=self.text_max_length,
                    **towers.logit_values(self.model, self.spec))

    def provenance(self, features: Sequence[str] = ("projected",)) -> dict[str, Any]:
        """Store attributes: the model's identity, ``preprocess``, the family's scoring and text
        rule, and which image ``features`` are stored. With pre-projection ones also ``pre_dim``,
        ``projection`` (the projection's name, or "none" where the family has none: SigLIP) and
        ``projection_weight`` (the matrix as an array record, which the store writes as the
        dataset ``/projection``)."""
        out = dict(self.identity, preprocess=self.preprocess.config(), **self.scoring_attrs(),
                   features=",".join(features))
        if "pre-projection" in features:
            proj = towers.projection_matrix(self.model, self.spec)
            out.update(pre_dim=self.pre_dim, projection=self.spec.image_projection or "none")
            if proj is not None:
                out["projection_weight"] = encode_array(proj)
        return out

    # -- images ----------------------------------------------------------------------------
    @torch.inference_mode()
    def image_features(self, pixels: Any, pre_projection: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Preprocessed images (a tensor ``(B, 3, H, W)``, or a NaFlex batch dict) ->
        ``(embeddings (B, dim), pre-projection features (B, pre_dim) or None)``, float32, not normalised."""
        inputs = towers.image_inputs(pixels, self.device)
        with autocast_for(self.device, self.precision):
            if pre_projection:
                e, pre = towers.image_features(self.model, self.spec, inputs)
                return e.float(), pre.float()
            return towers.image_embeds(self.model, inputs).float(), None

    def encode_pixels(self, pixels: Any) -> torch.Tensor:
        """Preprocessed images -> image embeddings ``(B, dim)`` float32 (not normalised)."""
        return self.image_features(pixels)[0]

    def image_batch(self, images: Sequence[Image.Image]) -> Any:
        """RGB PIL images -> the batch the image tower takes (this backbone's own preprocessing)."""
        return stack_batch([self.preprocess(im) for im in images])

    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """RGB PIL images -> image embeddings ``(B, dim)``."""
        return self.encode_pixels(self.image_batch(images))

    # -- prompts ---------------------------------------------------------------------------
    def prepare_texts(self, texts: Sequence[str]) -> list[str]:
        """Prompts as this family's text tower reads them (lower-cased for SigLIP 2)."""
        return towers.prepare_texts(self.spec, texts)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Token tensors by the family's padding rule and length (on the CPU)."""
        return towers.tokenize(self.tokenizer, self.spec, texts, self.text_max_length)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256, progress: bool = False,
                     desc: str = "prompts") -> torch.Tensor:
        """Texts -> text embeddings ``(len(texts), dim)`` float32 (not normalised)."""
        from tqdm.auto import tqdm

        out = []
        with tqdm(total=len(texts), desc=desc, unit="prompt", disable=not progress or not texts) as bar:
            for i in range(0, len(texts), batch_size):
                tok = {k: v.to(self.device) for k, v in self.tokenize(list(texts[i: i + batch_size])).items()}
                with autocast_for(self.device, self.precision):
                    feats = towers.text_embeds(self.model, tok)
                out.append(feats.float().cpu())
                bar.update(len(out[-1]))
        return torch.cat(out) if out else torch.zeros(0, self.dim)


def load_backbone(model_id_or_dir: str | os.PathLike | ModelFiles = DEFAULT_MODEL, device: str | torch.device = "cpu",
                  precision: str = "auto", trainable: bool = False, dtype: Any = None) -> Backbone:
    """THE way a model is loaded: model, tokenizer, image preprocessing and family spec.

    An unknown ``model_type`` is refused in one line listing the supported families; a
    checkpoint missing weights, or with pickle weights only, is refused too.
    """
    return Backbone(model_id_or_dir, device=device, precision=precision, trainable=trainable, dtype=dtype)


def load_clip(model: str | os.PathLike | ModelFiles, device: str | torch.device = "cpu", dtype: Any = None) -> Backbone:
    """Older name of :func:`load_backbone` (any family now), for callers that still use it:
    a trainable model in full precision."""
    return Backbone(model, device=device, precision="fp32", trainable=True, dtype=dtype)
