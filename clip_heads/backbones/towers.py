"""A loaded model's two towers, the way its family uses them: the one place that calls them.

Functions of a transformers model and its :class:`~clip_heads.backbones.families.FamilySpec`,
so the frozen encoder (:class:`~clip_heads.backbones.model.Backbone`), the fine-tune's loss and
its zero-shot evaluation embed images and prompts by the same rules:

* images: ``get_image_features`` (transformers 5 returns an output object whose
  ``pooler_output`` is the projected embedding); the pre-projection features are the vision
  tower's pooled output, which the family's linear projection maps to the embedding (for
  SigLIP, whose attention-pooling head output *is* the embedding, the two are the same);
* prompts: normalised (lower-cased for SigLIP 2), tokenized with the family's padding rule and
  length, every tokenizer output passed on (SigLIP's tokenizer gives no attention mask, so its
  text tower attends to padding as it was trained to);
* the learned ``logit_scale`` (as a temperature) and ``logit_bias``.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .families import FamilySpec

__all__ = ["as_embeddings", "image_inputs", "image_embeds", "image_features", "prepare_texts", "tokenize",
           "text_embeds", "text_max_length", "embed_dim", "pre_dim", "projection_matrix", "logit_values"]


def as_embeddings(out: Any) -> torch.Tensor:
    """The projected embeddings ``(B, dim)`` of ``get_image_features`` / ``get_text_features``."""
    # transformers 5 returns a BaseModelOutputWithPooling whose pooler_output is the projected
    # embedding; 4.x returned the tensor itself.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def image_inputs(pixels: torch.Tensor | Mapping[str, torch.Tensor], device: Any = None) -> dict[str, torch.Tensor]:
    """Keyword inputs of the image tower: a pixel tensor ``(B, 3, H, W)``, or a batch dict as
    the NaFlex processor makes it (``pixel_values``, ``pixel_attention_mask``, ``spatial_shapes``)."""
    inputs = dict(pixels) if isinstance(pixels, Mapping) else {"pixel_values": pixels}
    if device is not None:
        inputs = {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
    return inputs


def _float_pixels(inputs: dict[str, torch.Tensor], model: Any) -> dict[str, torch.Tensor]:
    # Pixels in the model's dtype (a bf16/fp16 model, or autocast, takes float32 as well).
    dtype = next(model.parameters()).dtype
    px = inputs["pixel_values"]
    return dict(inputs, pixel_values=px.to(dtype)) if px.is_floating_point() and px.dtype != dtype else inputs


def image_embeds(model: Any, pixels: Any) -> torch.Tensor:
    """Image embeddings ``(B, dim)``, not normalised: ``get_image_features`` itself."""
    return as_embeddings(model.get_image_features(**_float_pixels(image_inputs(pixels), model)))


def image_features(model: Any, spec: FamilySpec, pixels: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(embeddings (B, dim), pre-projection features (B, pre_dim))`` in one pass of the vision tower.

    The pre-projection features are the vision tower's pooled output (CLIP: the final layer
    norm of the class token) and the embedding is the family's projection of them, computed as
    ``get_image_features`` does; where the family has no image projection (SigLIP) both are
    the pooled output.
    """
    if spec.image_projection is None:
        e = image_embeds(model, pixels)
        return e, e
    pooled = as_embeddings(model.vision_model(**_float_pixels(image_inputs(pixels), model)))
    return getattr(model, spec.image_projection)(pooled), pooled


def prepare_texts(spec: FamilySpec, texts: Sequence[str]) -> list[str]:
    """Prompts as the family's text tower reads them (lower-cased for SigLIP 2)."""
    return [spec.normalize_text(str(t)) for t in texts]


def tokenize(tokenizer: Any, spec: FamilySpec, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    """Token tensors for ``texts`` by the family's rule: padded to the longest prompt (CLIP) or
    to ``max_length`` (SigLIP), truncated at ``max_length``; every tokenizer output kept."""
    padding: Any = "max_length" if spec.text_padding == "max_length" else True
    tok = tokenizer(prepare_texts(spec, texts), padding=padding, truncation=True, max_length=max_length,
                    return_tensors="pt")
    return dict(tok)


def text_embeds(model: Any, tokens: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Prompt embeddings ``(P, dim)``, not normalised: ``get_text_features`` of the tokens."""
    return as_embeddings(model.get_text_features(**tokens))


def text_max_length(model: Any, tokenizer: Any, spec: FamilySpec) -> int:
    """Tokens per prompt: the family's fixed length (SigLIP's 64), else the tokenizer's
    ``model_max_length``; never more than the text tower has positions for."""
    text_config = getattr(model.config, "text_config", None)
    positions = getattr(text_config, "max_position_embeddings", None)
    limit = int(positions) - spec.position_offset if positions else None
    want = spec.text_max_length
    if want is None:
        tok_max = getattr(tokenizer, "model_max_length", None)
        want = int(tok_max) if tok_max and tok_max < 10**9 else limit
    if want is None:
        raise ValueError(f"cannot tell how many tokens a prompt may have for this {spec.title} model: its tokenizer "
                         "and config set no maximum length")
    return min(int(want), limit) if limit else int(want)


def embed_dim(model: Any, spec: FamilySpec) -> int:
    """Dimension of the image (and text) embeddings."""
    if spec.image_projection is not None:
        return int(getattr(model, spec.image_projection).out_features)
    return int(model.config.vision_config.hidden_size)


def pre_dim(model: Any, spec: FamilySpec) -> int:
    """Dimension of the pre-projection image features."""
    if spec.image_projection is not None:
        return int(getattr(model, spec.image_projection).in_features)
    return embed_dim(model, spec)


def projection_matrix(model: Any, spec: FamilySpec) -> np.ndarray | None:
    """The image projection ``(dim, pre_dim)`` float32 (``embeds = pre_embeds @ P.T`` plus its
    bias, which CLIP-like families do not have), or None where the family has none."""
    if spec.image_projection is None:
        return None
    layer = getattr(model, spec.image_projection)
    if getattr(layer, "bias", None) is not None:
        raise ValueError(f"{spec.title}'s image projection has a bias; clip-heads stores bias-free projections only")
    return layer.weight.detach().float().cpu().numpy()


def logit_values(model: Any, spec: FamilySpec) -> dict[str, float]:
    """The model's learned ``logit_scale`` as a temperature (``exp`` of the stored log) and, for
    sigmoid families, its ``logit_bias``: what zero-shot scoring needs, as store attributes."""
    scale = float(model.logit_scale.detach().float().exp().reshape(-1)[0].item())
    out = {"logit_scale": scale}
    if spec.scoring == "sigmoid":
        bias = getattr(model, "logit_bias", None)
        if bias is None:
            raise ValueError(f"this {spec.title} model has no logit_bias, which its sigmoid scoring needs")
        out["logit_bias"] = float(bias.detach().float().reshape(-1)[0].item())
    if not all(math.isfinite(v) for v in out.values()):
        raise ValueError(f"this {spec.title} model's logit scale or bias is not finite: {out}")
    return out
