"""Encode throughput: bare model forward vs end-to-end `encode` on real JPEGs, in one run.

    .venv/bin/python benchmarks/bench_encode.py [--images 384] [--batch-size 64] [--device auto]

Prints images/s of the image tower alone on ready-made tensors, images/s of the whole
pipeline (decode + preprocess in workers, forward, journal writes and the final HDF5 store) on
Emotion6 JPEGs from ../shared/datasets (generated JPEGs when absent), their ratio, and peak
memory. It also times every fsync/fdatasync the encode makes - one per committed batch, plus
the final store and its folder - and prints their cost per batch and as a share of the
end-to-end time (target <= 2% at batch 64).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import EMOTION6, peak_rss_mib, vitb32_dir  # noqa: E402

from clip_heads.backbone import Backbone  # noqa: E402
from clip_heads.encode import default_workers, encode  # noqa: E402


def generated_jpegs(root: Path, n: int) -> str:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / f"c{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (256, 341, 3), dtype=np.uint8)).save(d / f"{i}.jpg", quality=85)
    return str(root)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=384)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--model", default=None, help="model dir (default: a random ViT-B/32 saved under cache/)")
    ap.add_argument("--tmp", default=None, help="folder for the store (its filesystem decides what a sync costs)")
    args = ap.parse_args()

    model = args.model or vitb32_dir()
    bb = Backbone(model, device=args.device)
    workers = default_workers(bb.device) if args.workers is None else args.workers
    print(f"device {bb.device}, torch threads {torch.get_num_threads()}, workers {workers}, batch {args.batch_size}")

    # Bare forward: the image tower on ready tensors, the same batch size and count. Measured
    # before and after the end-to-end run and averaged, so drift on a shared machine cancels.
    pix = torch.randn(args.batch_size, 3, bb.preprocess.crop_height, bb.preprocess.crop_width)
    bb.encode_pixels(pix)  # warm-up
    n_batches = max(1, args.images // args.batch_size)

    def bare_forward() -> float:
        if bb.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n_batches):
            bb.encode_pixels(pix).cpu()
        if bb.device.type == "cuda":
            torch.cuda.synchronize()
        return n_batches * args.batch_size / (time.perf_counter() - t)

    # Durability: time every sync the encode asks for (the journal's per-batch fdatasync, the
    # final store's fsync, the folder's) by wrapping the two calls in this process.
    synced = {"n": 0, "s": 0.0}

    def timed(fn):
        def wrapper(fd):
            t0 = time.perf_counter()
            try:
                return fn(fd)
            finally:
                synced["n"] += 1
                synced["s"] += time.perf_counter() - t0
        return wrapper

    real_sync = {name: getattr(os, name) for name in ("fsync", "fdatasync") if hasattr(os, name)}
    before = bare_forward()
    for name, fn in real_sync.items():
        setattr(os, name, timed(fn))
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        source = str(EMOTION6) if EMOTION6.is_dir() else generated_jpegs(Path(tmp) / "imgs", args.images)
        n = n_batches * args.batch_size
        t = time.perf_counter()
        r = encode(source, Path(tmp) / "s.h5", model=model, limit=n, batch_size=args.batch_size, workers=workers,
                   device=args.device, progress=False, backbone=bb, templates=["bp-photo"])
        wall = time.perf_counter() - t
        e2e = r.n_images / wall
    for name, fn in real_sync.items():
        setattr(os, name, fn)
    after = bare_forward()
    bare = (before + after) / 2
    me, kids = peak_rss_mib()
    print(f"source            {'Emotion6 (real JPEGs)' if source == str(EMOTION6) else 'generated JPEGs'}, {r.n_images} images")
    print(f"bare forward      {bare:8.1f} images/s (before {before:.1f}, after {after:.1f})")
    print(f"end-to-end encode {e2e:8.1f} images/s")
    print(f"ratio             {e2e / bare:8.3f}  (target >= 0.90)")
    batches = max(1, -(-r.n_images // args.batch_size))
    print(f"durability        {synced['n']} syncs, {synced['s'] / batches * 1000:.2f} ms per batch of {args.batch_size}, "
          f"{synced['s'] / wall:.2%} of end-to-end time (target <= 2%)")
    print(f"peak RSS          {me:8.0f} MiB main, {kids:.0f} MiB largest worker")
    if bb.device.type == "cuda":
        print(f"peak GPU memory   {torch.cuda.max_memory_allocated() / 2**20:8.0f} MiB")


if __name__ == "__main__":
    main()
