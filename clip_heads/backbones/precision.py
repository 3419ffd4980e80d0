"""How a backbone computes: the precision names a store records, and what the CPU can do fast.

A run asks for a precision by its short name (``--precision``) and the store records the name
of what was actually done (:func:`resolve_precision`), so a store's vectors say how they were
computed:

========  ==================  ==========================================================
asked     recorded            what runs
========  ==================  ==========================================================
fp32      ``fp32``            float32 weights and arithmetic (exact: the reference)
fp16      ``fp16-autocast``   float32 weights, fp16 autocast (GPU)
bf16      ``bf16-autocast``   float32 weights, bf16 autocast
bf16-w    ``bf16-weights``    the weights themselves in bf16 (``model.to(torch.bfloat16)``)
int8      ``int8-dynamic``    the image tower's linear layers quantised to int8 with dynamic
                              activation scales (CPU only; the text tower stays float32)
auto      fp16-autocast on a CUDA GPU; on a CPU bf16-autocast where the CPU has bf16 matrix
          units (AMX or AVX-512 BF16, read from the CPU's flags, never assumed), else fp32
========  ==================  ==========================================================

On CPUs with bf16 units, bf16 autocast was the fastest variant whose vectors keep a worst
cosine >= 0.999 against fp32 on real JPEGs (``benchmarks/bench_encode.py`` measures the whole
matrix: bf16 autocast and weights, eager vs SDPA attention, channels-last, ``torch.compile``,
int8). Without them bf16 is emulated and several times slower than fp32, so ``auto`` stays fp32.
int8 is opt-in only, although on this AVX2 machine it is the one variant faster than fp32
(x1.52 for ViT-B/32, worst cosine 0.99973 against fp32 on Emotion6; SigLIP B/16 x0.97, 0.99959):
those cosines come from random-init weights, whose activations are near-Gaussian. Trained CLIP
ViTs carry a few residual channels with activations tens of times larger than the rest, and
dynamic int8 takes one scale per activation tensor, so the outliers set the step and squeeze the
other channels into a handful of levels: the error on a trained checkpoint can be far larger
than on random weights, and no trained weights exist here to measure it. A default must be a
precision whose distance to fp32 was measured on the weights it runs; int8 has not been.
"""
from __future__ import annotations

import functools
from contextlib import nullcontext
from typing import Any

__all__ = ["PRECISION_NAMES", "resolve_precision", "same_precision", "autocast_for", "cpu_bf16_unit",
           "apply_precision"]

# The short name asked for -> the name a store records.
PRECISION_NAMES = {"fp32": "fp32", "fp16": "fp16-autocast", "bf16": "bf16-autocast", "bf16-weights": "bf16-weights",
                   "int8": "int8-dynamic"}
_AUTOCAST = {"fp16-autocast": "float16", "bf16-autocast": "bfloat16"}
# Stores written before the names said what was done recorded the short ones.
_LEGACY = {"fp16": "fp16-autocast", "bf16": "bf16-autocast"}
_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_bf16_unit() -> str | None:
    """The CPU's bf16 matrix unit (``"amx_bf16"`` or ``"avx512_bf16"``) if it has one and
    torch's CPU kernels can use it (oneDNN available, an AVX-512 capability), else None."""
    import torch

    flags = _cpu_flags()
    unit = next((f for f in _BF16_FLAGS if f in flags), None)
    if unit is None or not torch.backends.mkldnn.is_available():
        return None
    capability = str(torch.backends.cpu.get_cpu_capability()).upper()
    return unit if "AVX512" in capability or "AMX" in capability else None


def resolve_precision(device: Any, precision: str = "auto") -> str:
    """The recorded name of what a run at ``precision`` on ``device`` computes (see the table
    above). A recorded name (a worker given the writer's) resolves to itself."""
    import torch

    from ..catalog import ENCODE_PRECISIONS

    recorded = {v: k for k, v in PRECISION_NAMES.items()}
    if precision in recorded and precision not in ENCODE_PRECISIONS:  # a recorded name: what it says
        precision = recorded[precision]
    if precision not in ENCODE_PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(ENCODE_PRECISIONS)}")
    kind = torch.device(device).type
    if precision == "auto":
        if kind == "cuda":
            return "fp16-autocast"
        return "bf16-autocast" if kind == "cpu" and cpu_bf16_unit() else "fp32"
    if precision == "int8" and kind != "cpu":
        raise ValueError(f"precision 'int8' (dynamic quantisation) runs on the CPU only, not on {device}; "
                         "use --precision fp16 or bf16 there")
    return PRECISION_NAMES[precision]


def same_precision(a: Any, b: Any) -> bool:
    """Whether two recorded precision names are the same computation (old short names included)."""
    a, b = str(a), str(b)
    return _LEGACY.get(a, a) == _LEGACY.get(b, b)


def autocast_for(device: Any, precision: str = "auto"):
    """The autocast context of ``precision`` (short or recorded name) on ``device``; a null
    context where none applies."""
    import torch

    device = torch.device(device)
    dtype = _AUTOCAST.get(resolve_precision(device, _LEGACY.get(precision, precision)))
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))


def apply_precision(model: Any, used: str, vision_modules: tuple[str, ...]) -> Any:
    """``model`` changed in place for the recorded precision ``used``: bf16 weights, or the
    linear layers of ``vision_modules`` (the image tower) quantised to int8.
    Autocast precisions leave the weights as they are."""
    import torch

    if used == "bf16-weights":
        return model.to(torch.bfloat16)
    if used == "int8-dynamic":
        import warnings

        from torch.ao.quantization import quantize_dynamic

        with warnings.catch_warnings():  # torch.ao's deprecation notice
            warnings.simplefilter("ignore")
            for name in vision_modules:  # their nn.Linear children, swapped in place
                module = getattr(model, name, None)
                if module is not None:
                    quantize_dynamic(module, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
    return model
