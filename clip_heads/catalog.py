"""What clip-heads offers, by name, without importing any of it: the default model, the
precisions, the image features encode can store, the heads. (The model families are in
:mod:`clip_heads.backbones.families`, as light as this.)

The CLI builds its options from these before a command runs (``clip-heads --help`` must not
load torch or scikit-learn), so this module imports nothing heavy. The modules that implement
them import their names from here, so each value is written once.
"""
from __future__ import annotations

__all__ = ["DEFAULT_MODEL", "PRECISIONS", "ENCODE_PRECISIONS", "DECODE_PATHS", "FEATURES", "parse_features", "HEAD_CLASSES", "list_heads"]

DEFAULT_MODEL = "openai/clip-vit-base-patch32"  # the papers' ViT-B/32
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
# encode (a frozen forward) may also run with bf16 weights or int8 linears on a CPU; see
# clip_heads.backbones.precision for what each computes and the names a store records.
ENCODE_PRECISIONS = PRECISIONS + ("bf16-weights", "int8")
# How encode decodes and resizes images (clip_heads.loading.DECODE_STEPS): auto = the fastest path
# within the tolerance; exact = the full decode and PIL resize, equal to the model's own processor.
DECODE_PATHS = ("auto", "exact", "draft", "simplejpeg", "draft-torch", "simplejpeg-torch")
# What encode stores per image: the embeddings, and optionally the image tower's pooled output
# before the projection (encode --features projected,pre-projection).
FEATURES = ("projected", "pre-projection")


def parse_features(features) -> tuple[str, ...]:
    """``--features``: "projected" (the default) or "projected,pre-projection" (a string or names),
    in :data:`FEATURES` order; anything else is a ValueError naming what is valid."""
    items = [features] if isinstance(features, str) else list(features or ["projected"])
    names = [p.strip() for f in items for p in str(f).split(",") if p.strip()]
    if any(n not in FEATURES for n in names) or "projected" not in names:
        raise ValueError(f"--features {','.join(names)!r} is invalid: give projected, or projected,pre-projection "
                         f"(valid names: {', '.join(FEATURES)})")
    return tuple(f for f in FEATURES if f in names)

# Registry key -> "module:class" of every head, in the order the CLI lists them: THE registry of
# heads (clip_heads.heads.HEADS is built from it; a new head is registered here alone).
HEAD_CLASSES: dict[str, str] = {
    "zero-shot": "clip_heads.heads.zero_shot:ZeroShotHead",
    "linear": "clip_heads.heads.linear:LinearHead",
    "mlp": "clip_heads.heads.mlp:MLPHead",
    "contrastive": "clip_heads.heads.contrastive:ContrastiveHead",
    "tip-adapter": "clip_heads.heads.tip_adapter:TipAdapterHead",
    "zs-lp": "clip_heads.heads.zs_lp:ZSLPHead",
    "clap": "clip_heads.heads.clap:CLAPHead",
    "lpp": "clip_heads.heads.lpp:LPPHead",
    "gda": "clip_heads.heads.gda:GDAHead",
    "prolip": "clip_heads.heads.prolip:ProLIPHead",
}


def list_heads() -> list[str]:
    """Names of the registered heads (for ``click.Choice``), without importing them."""
    return list(HEAD_CLASSES)
