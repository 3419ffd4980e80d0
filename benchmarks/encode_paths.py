"""bench_encode.py's two matrices: the CPU precisions of a model's image tower, and the ways a
JPEG can be decoded and preprocessed for it. Each row: speed, and how far its output is from the
reference (fp32; the model's own image processor on a full decode).

Speeds on a shared machine drift from second to second, so every variant is timed once per
round, rounds alternate the variants, and each variant's ratio to the reference is taken within
its round; decode speeds are CPU seconds of this process (``time.process_time``), i.e. images/s
of one core, which other processes' load changes far less than wall time.
"""
from __future__ import annotations

import copy
import functools
import subprocess
import sys
import textwrap
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from clip_heads.backbones.precision import apply_precision, cpu_bf16_unit, resolve_precision
from clip_heads.images import open_rgb, simplejpeg_available


def worst_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.float(), b.float()).min())


# -- precision ---------------------------------------------------------------------------------
def precision_variants(model) -> dict:
    """name -> (model, autocast dtype or None, input transform) for each CPU variant."""
    out = {"fp32 (SDPA attention)": (model, None, None), "bf16-autocast": (model, torch.bfloat16, None)}
    out["bf16-weights"] = (copy.deepcopy(model).to(torch.bfloat16), None, lambda x: x.to(torch.bfloat16))
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    out["fp32 eager attention"] = (eager, None, None)
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)  # only the patch conv is 4-D
    out["fp32 channels-last"] = (cl, None, lambda x: x.contiguous(memory_format=torch.channels_last))
    out["int8-dynamic"] = (apply_precision(copy.deepcopy(model), "int8-dynamic", ("vision_model",)), None, None)
    return out


@torch.inference_mode()
def _embed(model, pixels: torch.Tensor, batch: int, autocast, transform) -> torch.Tensor:
    outs = []
    for i in range(0, len(pixels), batch):
        x = pixels[i:i + batch]
        x = transform(x) if transform else x
        with torch.autocast("cpu", dtype=autocast) if autocast is not None else nullcontext():
            out = model.get_image_features(pixel_values=x)
        outs.append((out if isinstance(out, torch.Tensor) else out.pooler_output).float())
    return torch.cat(outs)


def precision_matrix(model, pixels: torch.Tensor, batch: int, rounds: int) -> list[dict]:
    """Rows ``name, rate (median img/s), ratio (median of per-round ratios to fp32), cos``."""
    variants = precision_variants(model)
    rates = {k: [] for k in variants}
    embeds = {}
    for m, ac, tf in variants.values():  # warm-up, one batch each
        _embed(m, pixels[:batch], batch, ac, tf)
    for _ in range(rounds):
        for k, (m, ac, tf) in variants.items():
            t = time.perf_counter()
            embeds[k] = _embed(m, pixels, batch, ac, tf)
            rates[k].append(len(pixels) / (time.perf_counter() - t))
    ref = embeds["fp32 (SDPA attention)"]
    fp32 = rates["fp32 (SDPA attention)"]
    return [{"name": k, "rate": float(np.median(v)), "ratio": float(np.median([a / b for a, b in zip(v, fp32, strict=True)])),
             "cos": worst_cos(embeds[k], ref)} for k, v in rates.items()]


def cpu_choice() -> tuple[str, str]:
    """What encode's --precision auto runs on this CPU, and why."""
    unit = cpu_bf16_unit()
    used = resolve_precision("cpu", "auto")
    why = f"bf16 unit {unit} detected" if unit else "no amx_bf16/avx512_bf16 in the CPU flags (bf16 would be emulated)"
    return used, why


_COMPILE_SNIPPET = textwrap.dedent("""
    import sys, time, torch
    from transformers import AutoModel
    eager, comp = (AutoModel.from_pretrained(sys.argv[1]).eval() for _ in range(2))
    x = torch.randn(int(sys.argv[2]), 3, int(sys.argv[3]), int(sys.argv[3]))
    f = lambda m: m.get_image_features(pixel_values=x).pooler_output
    with torch.inference_mode():
        ref = f(eager)
        t = time.perf_counter()
        comp.vision_model = torch.compile(comp.vision_model)
        f(comp)
        print("compile_s", time.perf_counter() - t, flush=True)
        for _ in range(2):
            t = time.perf_counter(); f(eager); a = time.perf_counter() - t
            t = time.perf_counter(); out = f(comp); b = time.perf_counter() - t
            print("ratio", a / b, flush=True)
        print("cos", torch.nn.functional.cosine_similarity(out, ref).min().item())
""")


def compile_row(model_dir: str, batch: int, size: int, timeout: float) -> dict:
    """torch.compile (inductor) of the image tower, in a child process under ``timeout``: its
    speed ratio to eager fp32 and worst cosine, or why it was skipped."""
    if timeout <= 0:
        return {"name": "torch.compile", "skipped": "not tried (--compile-timeout 0)"}
    try:
        r = subprocess.run([sys.executable, "-c", _COMPILE_SNIPPET, model_dir, str(batch), str(size)],
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"name": "torch.compile", "skipped": f"compiling took over {timeout:.0f} s here (2 busy cores)"}
    vals = {}
    for line in r.stdout.splitlines():
        k, _, v = line.partition(" ")
        vals.setdefault(k, []).append(float(v))
    if r.returncode != 0 or "cos" not in vals:
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1][:160]
        return {"name": "torch.compile", "skipped": f"failed here: {tail}"}
    return {"name": "torch.compile", "ratio": float(np.median(vals["ratio"])), "cos": vals["cos"][0],
            "compile_s": vals["compile_s"][0]}


# -- decode ------------------------------------------------------------------------------------
def large_jpegs(images: list, root: Path, short_side: int = 1536) -> list[Path]:
    """Real photos upscaled to a short side of ``short_side`` px and saved as quality-90 JPEGs:
    camera-sized files whose content is still a photo's (noise would be a JPEG's worst case)."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    out = []
    for i, im in enumerate(images):
        w, h = im.size
        s = short_side / min(w, h)
        p = root / f"large{i}.jpg"
        im.resize((round(w * s), round(h * s)), Image.LANCZOS).save(p, quality=90)
        out.append(p)
    return out


def _box_resize_pixels(recipe, img):
    """PIL's resize of only the centre-crop region (``resize(crop, box=...)``): a measured
    alternative, not a decode path (its pass order differs from the full resize: up to 4/255)."""
    from PIL import Image

    w, h = img.size
    rw, rh = recipe.resized_size(w, h)
    sx, sy = w / rw, h / rh
    top, left = int((rh - recipe.crop_height) / 2.0), int((rw - recipe.crop_width) / 2.0)
    box = (left * sx, top * sy, (left + recipe.crop_width) * sx, (top + recipe.crop_height) * sy)
    out = img.resize((recipe.crop_width, recipe.crop_height), Image.BICUBIC, box=box)
    return np.ascontiguousarray(np.asarray(out).transpose(2, 0, 1))


def decode_paths(recipe, processor) -> dict:
    """name -> function(path) -> float32 array (3, H, W), or uint8 for the "uint8 crops" rows.
    The decode path ``--decode auto`` resolves to is marked "(default)"."""
    from clip_heads.loading import DECODE_STEPS, decoded_pixels, resolve_decode

    def reference(p):
        return processor(images=[open_rgb(p)], return_tensors="np")["pixel_values"][0]

    def via(path, uint8=True, pixels=None):
        if pixels is not None:
            return lambda p: pixels(recipe, open_rgb(p))
        return lambda p: decoded_pixels(functools.partial(open_rgb, p), recipe, path, uint8)  # what the loader runs

    default = resolve_decode("auto", recipe)
    paths = {"processor (reference)": reference, "exact, float crops": via("exact", uint8=False),
             "exact, uint8 crops": via("exact"), "exact + PIL crop-region resize": via("exact", pixels=_box_resize_pixels)}
    for path in ("draft", "simplejpeg", "draft-torch", "simplejpeg-torch"):
        if DECODE_STEPS[path][0] == "simplejpeg" and not simplejpeg_available():
            continue
        paths[f"{path}, uint8 crops" + (" (default)" if path == default else "")] = via(path)
    return paths


def decode_matrix(recipe, processor, files: list, embed, rounds: int = 3) -> list[dict]:
    """Rows ``name, per_core (img/s of one core), max_diff (0-255 units vs the processor), cos``.

    ``embed`` maps a float batch ``(B, 3, H, W)`` to embeddings; uint8 rows are normalised with
    the recipe's own :meth:`normalize` (what the device does) before it."""
    paths = decode_paths(recipe, processor)
    cpu = {k: [] for k in paths}
    outs = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core: what a decode worker (torch threads 1 there) gets
    try:
        for fn in paths.values():
            fn(files[0])  # warm-up: first calls pay imports and kernel dispatch
        for _ in range(rounds):
            for k, fn in paths.items():
                t = time.process_time()
                outs[k] = [fn(p) for p in files]
                cpu[k].append((time.process_time() - t) / len(files))
    finally:
        torch.set_num_threads(threads)
    std = np.asarray(recipe.image_std, np.float32)[:, None, None] * 255
    ref = np.stack(outs["processor (reference)"])
    ref_e = embed(torch.from_numpy(ref))
    rows = []
    for k, arrs in outs.items():
        x = np.stack(arrs)
        xf = recipe.normalize(torch.from_numpy(x)).numpy() if x.dtype == np.uint8 else x
        diff = float(np.abs((xf - ref) * std).max()) if xf.shape == ref.shape else float("nan")
        rows.append({"name": k, "per_core": 1 / float(np.median(cpu[k])), "max_diff": diff,
                     "cos": worst_cos(embed(torch.from_numpy(xf)), ref_e) if xf.shape == ref.shape else float("nan")})
    return rows
