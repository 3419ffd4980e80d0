"""The GPU check (issue 12): is the encode as fast as the GPU's bare forward, and what a
fine-tune step costs. Run it through ``benchmarks/gpu_check.sh`` (one command, <= 8 minutes,
no downloads).

For random-init ViT-B/32 and ViT-L/14 CLIPs (the real shapes; no pretrained weights are needed
to time them) it prints:

* the bare fp16 forward of the image tower, images/s at batch 256 and 1024 (random pixels
  already on the GPU: the ceiling);
* the end-to-end ``encode`` (decode + preprocess in the default workers, uint8 crops shipped to
  the GPU, the forward, the store's writer) on real or generated JPEGs, images/s;
* their ratio (end-to-end / bare at the encode's batch size), and the fraction of the encode's
  wall time the GPU waited for data (the main loop blocked on the next decoded batch);
* a fine-tune step (forward, contrastive loss, backward, AdamW) at batch 256, bf16 autocast, ms.

Without a CUDA GPU it runs the same code at tiny sizes (a CPU smoke run: the figures mean nothing,
the path is checked).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import EMOTION6  # noqa: E402

SHAPES = {  # the vision towers of openai/clip-vit-base-patch32 and -large-patch14, text tower of B
    "ViT-B/32": dict(vision_config={}, projection_dim=512),
    "ViT-L/14": dict(vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                        num_attention_heads=16, patch_size=14), projection_dim=768),
}
SMOKE = dict(vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
             text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
             projection_dim=32)


def build_model(name: str, out: Path, smoke: bool) -> str:
    """A random CLIP of ``name``'s shape saved with save_pretrained, with a small byte-level BPE
    tokenizer written here (no hub access; prompts' token ids do not change image throughput)."""
    if (out / "model.safetensors").exists():
        return str(out)
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import write_tiny_tokenizer

    tok_dir = write_tiny_tokenizer(out / "_tok_src")
    tok = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"))
    kw = dict(SMOKE) if smoke else dict(SHAPES[name])
    text = dict(kw.pop("text_config", {}), vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, **kw)).save_pretrained(out)
    tok.save_pretrained(out)
    CLIPImageProcessor().save_pretrained(out)
    return str(out)


def jpegs(root: Path, n: int) -> str:
    """Emotion6 when ../shared/datasets has at least ``n`` of its images, else ``n`` generated
    photo-like JPEGs (gradients and noise at Emotion6's ~384x256): a GPU run needs thousands, so
    that start-up costs do not count."""
    from PIL import Image

    if EMOTION6.is_dir() and sum(1 for _ in (EMOTION6 / "images").rglob("*.jpg")) >= n:
        return str(EMOTION6)
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 180, 384)[None, :, None]
    for i in range(n):
        d = root / f"c{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        a = np.clip(ramp + rng.normal(0, 25, (256, 384, 3)) + rng.integers(0, 60, 3), 0, 255).astype(np.uint8)
        Image.fromarray(a).save(d / f"{i}.jpg", quality=90)
    return str(root)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def bare_forward(bb, batch: int, iters: int) -> float:
    """images/s of the image tower alone on random pixels already on the device."""
    x = torch.randn(batch, 3, bb.preprocess.out_height, bb.preprocess.out_width, device=bb.device)
    bb.encode_pixels(x)
    sync(bb.device)
    t = time.perf_counter()
    for _ in range(iters):
        bb.encode_pixels(x)
    sync(bb.device)
    return batch * iters / (time.perf_counter() - t)


def end_to_end(bb, model_dir: str, source: str, n: int, batch: int, tmp: str) -> tuple[float, dict]:
    from clip_heads.encode import encode

    out = Path(tmp) / "e2e.h5"
    encode(source, out, model=model_dir, limit=min(n, batch), batch_size=batch, progress=False, backbone=bb,
           templates=["bp-photo"], overwrite=True)  # warm-up: workers, first writes
    t = time.perf_counter()
    r = encode(source, out, model=model_dir, limit=n, batch_size=batch, progress=False, backbone=bb,
               templates=["bp-photo"], overwrite=True)
    wall = time.perf_counter() - t
    return r.n_images / wall, dict(r.timings or {}, wall_s=wall)


def finetune_step_ms(bb, batch: int, steps: int) -> float:
    """ms per step: forward of both towers, CLIP's contrastive loss (transformers' return_loss,
    which clip-heads' fine-tune equals), backward, AdamW; bf16 autocast on a GPU."""
    model = bb.model
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    x = torch.randn(batch, 3, bb.preprocess.out_height, bb.preprocess.out_width, device=bb.device)
    tok = {k: v.to(bb.device) for k, v in bb.tokenize([f"a photo of thing {i}" for i in range(batch)]).items()}
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if bb.device.type == "cuda" else torch.autocast("cpu", enabled=False)
    times = []
    for i in range(steps + 2):
        sync(bb.device)
        t = time.perf_counter()
        with amp:
            loss = model(pixel_values=x, return_loss=True, **tok).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(bb.device)
        if i >= 2:
            times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="ViT-B/32,ViT-L/14")
    ap.add_argument("--images", type=int, default=None, help="images per end-to-end encode (default 8192 on a GPU)")
    ap.add_argument("--cache", default=str(ROOT / "cache"))
    args = ap.parse_args()
    from clip_heads.backbones.model import Backbone
    from clip_heads.encode import default_workers

    gpu = torch.cuda.is_available()
    dev = torch.device("cuda" if gpu else "cpu")
    smoke = not gpu
    name = torch.cuda.get_device_name(0) if gpu else "no CUDA GPU: CPU smoke run at tiny sizes (figures mean nothing)"
    batches, e2e_batch = ((256, 1024), 256) if gpu else ((4, 8), 8)
    n = args.images or (8192 if gpu else 32)
    print(f"device: {name}; torch {torch.__version__}; {os.cpu_count()} cores, {default_workers(dev)} decode workers")
    with tempfile.TemporaryDirectory() as tmp:
        source = jpegs(Path(tmp) / "jpegs", n)
        print(f"images: {source}")
        for model in args.models.split(","):
            tag = model.replace("/", "").lower() + ("-smoke" if smoke else "")
            model_dir = build_model(model, Path(args.cache) / f"gpu-check-{tag}", smoke)
            bb = Backbone(model_dir, device=dev, precision="fp16" if gpu else "fp32")
            bare = {b: bare_forward(bb, b, iters=10 if gpu else 1) for b in batches}
            e2e, t = end_to_end(bb, model_dir, source, n, e2e_batch, tmp)
            ratio = e2e / bare[e2e_batch]
            wait = t.get("data_wait_s", float("nan")) / t["wall_s"]
            del bb
            bt = Backbone(model_dir, device=dev, precision="fp32", trainable=True)
            step = finetune_step_ms(bt, 256 if gpu else 4, steps=5 if gpu else 1)
            del bt
            if gpu:
                torch.cuda.empty_cache()
            print(f"{model}: bare {'fp16' if gpu else 'fp32'} forward " + ", ".join(f"{v:.0f} img/s at batch {b}" for b, v in bare.items())
                  + f"; end-to-end encode {e2e:.0f} img/s ({n} images, batch {e2e_batch}); ratio {ratio:.3f}; "
                  f"GPU waited for data {wait:.1%} of the encode; fine-tune step at batch {256 if gpu else 4}: {step:.0f} ms")


if __name__ == "__main__":
    main()
