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


@pytest.fixture(autouse=True)
def _no_figures(monkeypatch):
    # Every command draws its figures by default (about a second each on this machine); tests
    # of numbers and files skip them, as `--no-plots` does. Tests of the figures pass
    # plots=True, or set CLIP_HEADS_PLOTS=1 for the CLI.
    monkeypatch.setenv("CLIP_HEADS_PLOTS", "0")


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


# ---------------------------------------------------------------------------------------
# Tiny random models of every supported family (issue 10), saved with save_pretrained and loaded
# by path. Each family has its own tokenizer class, built tiny here: SigLIP's sentencepiece
# tokenizer (trained on a few sentences), SigLIP 2's and Gemma's byte-fallback BPE, XLM-R's
# unigram (MetaCLIP 2, AltCLIP), BERT's wordpiece (Chinese-CLIP); CLIP's is the tiny BPE above.
# ---------------------------------------------------------------------------------------
FAMILY_KINDS = ("clip", "siglip", "siglip2", "siglip2-fixres", "metaclip_2", "altclip", "chinese_clip")
_TINY = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
_CORPUS = ["a photo of a cat", "a photo of a dog", "a photo of a eel", "an image that evokes the emotion of joy",
           "a photo that evokes fear", "anger disgust fear joy sadness surprise neutral red green blue",
           "a bad photo of the big thing", "abcdefghijklmnopqrstuvwxyz"]


def _byte_vocab(specials: list[str]) -> dict[str, int]:
    import string

    vocab = {s: i for i, s in enumerate(specials)}
    for ch in ["▁"] + list(string.ascii_letters):
        vocab.setdefault(ch, len(vocab))
    for w in ("▁a", "▁photo", "▁of"):
        vocab.setdefault(w, len(vocab))
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    return vocab


def _siglip_tokenizer(out: Path):
    import io

    import sentencepiece as spm
    from transformers import SiglipTokenizer

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_CORPUS * 10), model_writer=buf, vocab_size=60,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>",
                                   eos_piece="</s>", unk_piece="<unk>", hard_vocab_limit=False, character_coverage=1.0,
                                   minloglevel=2)
    src = out / "_spm"
    src.mkdir(parents=True, exist_ok=True)
    (src / "spiece.model").write_bytes(buf.getvalue())
    # As google/siglip-*: 64 tokens, pad = eos, and no attention mask (the text tower attends to padding).
    return SiglipTokenizer(str(src / "spiece.model"), model_max_length=64, pad_token="</s>", model_input_names=["input_ids"])


def _xlmr_tokenizer():
    import string

    from transformers import XLMRobertaTokenizer

    pieces = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in string.ascii_letters] + [("▁" + w, -1.0) for w in "a photo of the an that".split()]
    return XLMRobertaTokenizer(vocab=pieces + [("<mask>", 0.0)], model_max_length=512)


def _bert_tokenizer():
    import string

    from transformers import BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "photo", "of", "the", "a", "an", "猫", "狗", "照", "片"]
    words += list(string.ascii_lowercase) + ["##" + c for c in string.ascii_lowercase]
    return BertTokenizer(vocab={w: i for i, w in enumerate(dict.fromkeys(words))}, model_max_length=52)


def build_tiny_family(kind: str, out: Path, seed: int = 0) -> Path:
    """A tiny random model of family ``kind`` (one of :data:`FAMILY_KINDS`) with its own kind of
    tokenizer and image processor, saved into ``out`` as save_pretrained writes a hub repo."""
    import math

    import torch
    import transformers as tf

    if kind == "clip":
        return build_tiny_clip(out, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)

    def text(tok, positions, **kw):
        return dict(vocab_size=len(tok), max_position_embeddings=positions, pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, **_TINY, **kw)

    if kind == "siglip":
        tok = _siglip_tokenizer(out)
        model = tf.SiglipModel(tf.SiglipConfig(text_config=text(tok, 64), vision_config=dict(image_size=30, patch_size=2, **_TINY)))
        proc = tf.SiglipImageProcessor(size={"height": 30, "width": 30})
    elif kind == "siglip2-fixres":  # a fixed-resolution SigLIP 2: model_type "siglip", a Gemma tokenizer
        tok = tf.GemmaTokenizer(vocab=_byte_vocab(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]), merges=[], model_max_length=64)
        model = tf.SiglipModel(tf.SiglipConfig(text_config=text(tok, 64), vision_config=dict(image_size=32, patch_size=4, **_TINY)))
        proc = tf.SiglipImageProcessor(size={"height": 32, "width": 32}, resample=2)
    elif kind == "siglip2":  # NaFlex: Siglip2Model, patches at the native aspect ratio
        tok = tf.Siglip2Tokenizer(vocab=_byte_vocab(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]), merges=[], model_max_length=64)
        model = tf.Siglip2Model(tf.Siglip2Config(text_config=text(tok, 64), vision_config=dict(patch_size=4, num_patches=64, **_TINY)))
        proc = tf.Siglip2ImageProcessor(patch_size=4, max_num_patches=64)
    elif kind == "metaclip_2":
        tok = _xlmr_tokenizer()
        model = tf.MetaClip2Model(tf.MetaClip2Config(text_config=text(tok, 77), vision_config=dict(image_size=30, patch_size=2, **_TINY),
                                                     projection_dim=16))
        proc = tf.CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30})
    elif kind == "altclip":
        tok = _xlmr_tokenizer()
        model = tf.AltCLIPModel(tf.AltCLIPConfig(text_config=text(tok, 40, project_dim=16), projection_dim=16,
                                                 vision_config=dict(image_size=30, patch_size=2, **_TINY)))
        proc = tf.CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30})
    elif kind == "chinese_clip":
        tok = _bert_tokenizer()
        model = tf.ChineseCLIPModel(tf.ChineseCLIPConfig(text_config=dict(vocab_size=len(tok), max_position_embeddings=52, pad_token_id=0, **_TINY),
                                                         vision_config=dict(image_size=30, patch_size=2, **_TINY), projection_dim=16))
        # As OFA-Sys/chinese-clip-vit-base-patch16: the whole image resized to a square, no crop.
        proc = tf.ChineseCLIPImageProcessor(size={"height": 30, "width": 30}, do_center_crop=False)
    else:
        raise ValueError(f"unknown tiny family {kind!r}; valid: {FAMILY_KINDS}")
    with torch.no_grad():  # a learned-looking temperature and bias (post_init zeroes SigLIP's)
        model.logit_scale.fill_(math.log(10.0))
        if hasattr(model, "logit_bias"):
            model.logit_bias.fill_(-2.5)
    model.eval().save_pretrained(out)
    tok.save_pretrained(out)
    proc.save_pretrained(out)
    return out


class TinyFamilies:
    """Session cache of tiny models by family kind, each built on first use."""

    def __init__(self, root: Path) -> None:
        self.root, self.paths = root, {}

    def __getitem__(self, kind: str) -> str:
        if kind not in self.paths:
            self.paths[kind] = str(build_tiny_family(kind, self.root / kind))
        return self.paths[kind]


@pytest.fixture(scope="session")
def tiny_families(tmp_path_factory) -> TinyFamilies:
    """``tiny_families["siglip"]``: the path of a tiny random model of that family (see FAMILY_KINDS)."""
    return TinyFamilies(tmp_path_factory.mktemp("tiny-families"))
