"""Shared fixtures: offline mode, a tiny random CLIP saved to disk and loaded by path."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SHARED_DATASETS = SHARED / "datasets"
SHARED_TOKENIZER = SHARED / "tokenizers" / "clip-bpe"

requires_shared = pytest.mark.skipif(
    not SHARED_DATASETS.is_dir(), reason="../shared/datasets is absent (real data is not part of the repo)"
)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # Tests never reach a hub: everything is loaded by path, as a user loads a hub id.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _bytes_to_unicode() -> dict[int, str]:
    # The byte -> printable-character table byte-level BPE tokenizers use (GPT-2 / CLIP convention).
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def write_tiny_tokenizer(out: Path) -> Path:
    """A real byte-level BPE vocabulary with a handful of merges: small, but tokenizes any text."""
    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges = ["t h", "th e</w>", "a n", "o f</w>", "p h", "ph o", "pho t", "phot o</w>"]
    for m in merges:
        vocab[m.replace(" ", "")] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return out


def build_tiny_clip(out: Path, image_size: int = 30, seed: int = 0) -> Path:
    """Save a tiny random CLIP + tokenizer + image processor into `out` with `save_pretrained`."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    tok_dir = write_tiny_tokenizer(out / "_tok_src")
    tok = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"))
    torch.manual_seed(seed)
    common = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tok),
            max_position_embeddings=77,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            **common,
        ),
        vision_config=dict(image_size=image_size, patch_size=2, **common),
        projection_dim=16,
    )
    model = CLIPModel(config).eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> str:
    """Path of a tiny random CLIP directory, to be loaded exactly as a user loads a hub id."""
    return str(build_tiny_clip(tmp_path_factory.mktemp("tiny-clip")))


def make_blobs(n_per_class=60, n_classes=4, dim=16, sep=3.0, seed=0):
    """Class-dependent Gaussian means: separable synthetic 'embeddings' for head tests."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(n_classes, dim))
    means *= sep / np.linalg.norm(means, axis=1, keepdims=True)
    X = np.concatenate([rng.normal(size=(n_per_class, dim)) + m for m in means]).astype(np.float32)
    y = np.repeat(np.arange(n_classes), n_per_class)
    order = rng.permutation(len(y))
    return X[order], y[order], means
