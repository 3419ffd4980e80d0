"""The vision-language families clip-heads loads, as data, and which family a checkpoint is.

A family is what differs between checkpoints that otherwise load, encode and score the same
way: the transformers class for each ``config.json`` ``model_type``, how prompts are tokenized
(padding to the longest prompt or to a fixed length, lower-casing), how cosines become class
scores (CLIP's softmax, SigLIP's sigmoid with a learned bias), the loss it was trained with, and
whether the image embedding is a linear projection of a pooled output (CLIP) or the pooled
output itself (SigLIP's attention-pooling head). Nothing here imports torch or transformers:
a store's or a model folder's family is known before anything heavy loads.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

__all__ = ["CLIP_LOGIT_SCALE", "FamilySpec", "FAMILIES", "SIGMOID_FAMILIES", "DEFAULT_FAMILY", "list_families", "get_family",
           "detect_family", "family_of_folder", "family_of_model", "supported_text"]


@dataclass(frozen=True)
class FamilySpec:
    """What one family of checkpoints needs to be encoded, scored and fine-tuned correctly.

    Attributes
    ----------
    name : the name stores record (``family`` attribute), e.g. ``"siglip"``.
    title : how people write it ("SigLIP 2").
    model_classes : ``config.json`` ``model_type`` -> the transformers class that loads it.
    text_padding : ``"longest"`` (pad a batch to its longest prompt: the text tower pools at the
        end-of-text token or the first token, so padding never reaches the embedding) or
        ``"max_length"`` (always pad to ``text_max_length``: SigLIP pools the LAST position,
        which is padding for a short prompt, exactly as it was trained).
    text_max_length : tokens per prompt for ``"max_length"`` padding; None: the tokenizer's
        ``model_max_length``, capped at the text tower's position embeddings.
    text_lowercase : prompts are lower-cased first (SigLIP 2 was trained on lower-cased text).
    scoring : ``"softmax"`` over ``logit_scale * cos`` or ``"sigmoid"`` of ``logit_scale * cos + logit_bias``.
    loss : the contrastive loss the family was trained with: ``"infonce"`` or ``"sigmoid"`` (pairwise).
    image_projection : the model attribute holding the linear image projection (applied to the
        vision tower's pooled output), or None where the pooled output is the embedding.
    position_offset : position ids the text tower reserves before the first token (2 for the
        XLM-R text tower of AltCLIP), taken off its position embeddings to get the longest prompt.
    max_logit_scale : the cap on the learned temperature ``exp(logit_scale)`` (CLIP's training
        clamps it at 100, where OpenAI's checkpoints end; also the scale zero-shot assumes for a
        store that records none), None for no cap.
    hub_ids : checkpoints a user would pass, for the docs.
    """

    name: str
    title: str
    model_classes: Mapping[str, str]
    text_padding: str = "longest"
    text_max_length: int | None = None
    text_lowercase: bool = False
    scoring: str = "softmax"
    loss: str = "infonce"
    image_projection: str | None = "visual_projection"
    position_offset: int = 0
    max_logit_scale: float | None = None
    hub_ids: tuple[str, ...] = field(default=())

    def normalize_text(self, text: str) -> str:
        """A prompt as the family's text tower reads it (lower-cased for SigLIP 2)."""
        return text.lower() if self.text_lowercase else text

    def record(self) -> dict[str, Any]:
        """The store attributes of this family (its scale and bias come from the model)."""
        return {"family": self.name, "scoring": self.scoring, "text_padding": self.text_padding,
                "text_lowercase": self.text_lowercase}


CLIP_LOGIT_SCALE = 100.0  # CLIP's cap on its learned temperature: written here once (zeroshot re-exports it)

FAMILIES: dict[str, FamilySpec] = {
    spec.name: spec
    for spec in (
        FamilySpec("clip", "CLIP", {"clip": "CLIPModel"}, max_logit_scale=CLIP_LOGIT_SCALE,
                   hub_ids=("openai/clip-vit-base-patch32", "openai/clip-vit-large-patch14",
                            "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "facebook/metaclip-b32-400m")),
        FamilySpec("siglip", "SigLIP", {"siglip": "SiglipModel"}, text_padding="max_length", text_max_length=64,
                   scoring="sigmoid", loss="sigmoid", image_projection=None,
                   hub_ids=("google/siglip-base-patch16-224", "google/siglip-so400m-patch14-384")),
        # Fixed-resolution SigLIP 2 checkpoints declare model_type "siglip" (SiglipModel) with a Gemma
        # tokenizer; the NaFlex ones declare "siglip2" (Siglip2Model). Both are this family.
        FamilySpec("siglip2", "SigLIP 2", {"siglip2": "Siglip2Model", "siglip": "SiglipModel"},
                   text_padding="max_length", text_max_length=64, text_lowercase=True, scoring="sigmoid",
                   loss="sigmoid", image_projection=None,
                   hub_ids=("google/siglip2-base-patch16-224", "google/siglip2-so400m-patch14-384",
                            "google/siglip2-base-patch16-naflex")),
        FamilySpec("metaclip_2", "MetaCLIP 2", {"metaclip_2": "MetaClip2Model"}, max_logit_scale=CLIP_LOGIT_SCALE,
                   hub_ids=("facebook/metaclip-2-worldwide-b32", "facebook/metaclip-2-worldwide-huge-quickgelu")),
        FamilySpec("altclip", "AltCLIP", {"altclip": "AltCLIPModel"}, position_offset=2, max_logit_scale=CLIP_LOGIT_SCALE,
                   hub_ids=("BAAI/AltCLIP",)),
        FamilySpec("chinese_clip", "Chinese-CLIP", {"chinese_clip": "ChineseCLIPModel"}, max_logit_scale=CLIP_LOGIT_SCALE,
                   hub_ids=("OFA-Sys/chinese-clip-vit-base-patch16",)),
    )
}
DEFAULT_FAMILY = "clip"  # what a store that records no family (schema 1) was encoded with
SIGMOID_FAMILIES = frozenset(n for n, s in FAMILIES.items() if s.scoring == "sigmoid")
# Tokenizer classes that make a model_type "siglip" checkpoint a fixed-resolution SigLIP 2.
_SIGLIP2_TOKENIZERS = ("GemmaTokenizer", "GemmaTokenizerFast", "Siglip2Tokenizer")


def list_families() -> list[str]:
    return list(FAMILIES)


def supported_text() -> str:
    """The supported families with their model_types, for one-line refusals."""
    return "; ".join(f"{s.title} ({', '.join(s.model_classes)})" for s in FAMILIES.values())


def get_family(name: str | None) -> FamilySpec:
    """The family a store records by name (None: CLIP, what stores before schema 2 hold)."""
    name = DEFAULT_FAMILY if name in (None, "") else str(name)
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; clip-heads supports: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def detect_family(config: Mapping[str, Any], tokenizer_class: str | None = None, origin: str = "the model") -> FamilySpec:
    """The family of a checkpoint from its ``config.json`` (and, for ``model_type`` "siglip",
    its tokenizer class: a Gemma tokenizer marks a fixed-resolution SigLIP 2).

    Raises ``ValueError`` in one line, listing the supported families, for any other model_type.
    """
    model_type = config.get("model_type") if isinstance(config, Mapping) else None
    if model_type == "siglip":
        tok = str(tokenizer_class or "")
        return FAMILIES["siglip2" if tok in _SIGLIP2_TOKENIZERS else "siglip"]
    for spec in FAMILIES.values():
        if model_type in spec.model_classes:
            return spec
    raise ValueError(f"{origin} is a {model_type!r} model (config.json model_type), which clip-heads does not load; "
                     f"it needs a complete model with both its image and text towers, of a supported family: {supported_text()}")


def _read_json(path: Path, origin: str, required: bool) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if required:
            raise ValueError(f"{origin} has no {path.name} in {path.parent}: not a model saved with save_pretrained") from None
        return {}
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {origin}: unreadable {path.name} in {path.parent} ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"cannot read {origin}: {path.name} in {path.parent} is not a JSON object")
    return data


def family_of_folder(folder: str | os.PathLike, origin: str | None = None) -> FamilySpec:
    """The family of the model saved in ``folder`` (its config.json and tokenizer_config.json)."""
    folder = Path(folder)
    origin = origin or str(folder)
    config = _read_json(folder / "config.json", origin, required=True)
    tok = _read_json(folder / "tokenizer_config.json", origin, required=False).get("tokenizer_class")
    return detect_family(config, tok, origin)


def family_of_model(model: Any, tokenizer: Any = None) -> FamilySpec:
    """The family of a loaded model (its config's model_type, and its tokenizer's class)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    tok = type(tokenizer).__name__ if tokenizer is not None else None
    return detect_family({"model_type": model_type}, tok, f"model {getattr(config, '_name_or_path', '') or type(model).__name__}")
