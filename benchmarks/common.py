"""Shared set-up for benchmark scripts: a real-size random CLIP saved to disk, loaded by path."""
from __future__ import annotations

import resource
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TOKENIZER = SHARED / "tokenizers" / "clip-bpe"
EMOTION6 = SHARED / "datasets" / "emotion6"


def vitb32_dir(cache: Path = Path("cache/bench-vitb32")) -> str:
    """A ViT-B/32-shaped CLIP (``CLIPConfig()`` defaults, random weights) with the real CLIP
    tokenizer and the OpenAI image-processor recipe, saved once with ``save_pretrained``.

    No pretrained weights exist here; the shapes, and so the costs, are the real ones.
    """
    if (cache / "model.safetensors").exists():
        return str(cache)
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    if not TOKENIZER.is_dir():
        raise SystemExit(f"the real CLIP tokenizer is expected at {TOKENIZER}")
    torch.manual_seed(0)
    cache.mkdir(parents=True, exist_ok=True)
    CLIPModel(CLIPConfig()).save_pretrained(cache)
    CLIPTokenizer.from_pretrained(str(TOKENIZER)).save_pretrained(cache)
    CLIPImageProcessor().save_pretrained(cache)
    return str(cache)


def peak_rss_mib() -> tuple[float, float]:
    """Peak resident memory of this process and of its (finished) children, MiB."""
    me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return me, kids
