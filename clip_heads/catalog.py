"""What clip-heads offers, by name, without importing any of it: the default model, the
precisions, the heads.

The CLI builds its options from these before a command runs (``clip-heads --help`` must not
load torch or scikit-learn), so this module imports nothing heavy. The modules that implement
them import their names from here, so each value is written once.
"""
from __future__ import annotations

__all__ = ["DEFAULT_MODEL", "PRECISIONS", "HEAD_CLASSES", "list_heads"]

DEFAULT_MODEL = "openai/clip-vit-base-patch32"  # the papers' ViT-B/32
PRECISIONS = ("auto", "fp32", "fp16", "bf16")

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
