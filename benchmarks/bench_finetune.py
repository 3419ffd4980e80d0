"""Full fine-tuning throughput: training images/s, peak memory and data-wait fraction per step.

    .venv/bin/python benchmarks/bench_finetune.py [--steps 6] [--batch-size 16] [--device auto]

Runs :func:`clip_heads.finetune.finetune` for a few optimizer steps on a ViT-B/32-shaped CLIP
(random weights, the real tokenizer and image processor, loaded by path) over Emotion6 JPEGs
from ../shared/datasets (generated JPEGs when absent), and reads its own ``train_log.json``:

* images/s: trained images per second of step time, the first step (DataLoader start-up,
  allocator warm-up) left out;
* data-wait fraction: time a step spent blocked on the DataLoader / its total time. Near 0 the
  model is the bottleneck; well above 0 the GPU starves: raise --workers or fix the disk;
* peak memory: resident set of this process and of its DataLoader workers; on a GPU also
  ``torch.cuda.max_memory_allocated``.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_encode import generated_jpegs  # noqa: E402
from common import EMOTION6, peak_rss_mib, vitb32_dir  # noqa: E402

from clip_heads.datasets import open_source  # noqa: E402
from clip_heads.backbone import resolve_device  # noqa: E402
from clip_heads.encode import default_workers  # noqa: E402
from clip_heads.finetune import finetune  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps (the first is warm-up)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--micro-batch", type=int, default=None)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--model", default=None, help="model dir (default: a random ViT-B/32 saved under cache/)")
    args = ap.parse_args()
    if args.steps < 2:
        ap.error("--steps must be >= 2 (the first step is warm-up)")

    model = args.model or vitb32_dir()
    workers = default_workers(resolve_device(args.device)) if args.workers is None else args.workers
    with tempfile.TemporaryDirectory() as tmp:
        data = str(EMOTION6) if EMOTION6.is_dir() else generated_jpegs(Path(tmp) / "imgs", 8 * args.batch_size)
        src = open_source(data)
        n = min(len(src), args.steps * args.batch_size)
        train = np.sort(np.random.default_rng(0).choice(len(src), size=n, replace=False))
        t = time.perf_counter()
        res = finetune(src, Path(tmp) / "out", model, train_indices=train, epochs=1, batch_size=args.batch_size,
                       micro_batch=args.micro_batch, workers=workers, device=args.device, precision=args.precision,
                       gradient_checkpointing=args.gradient_checkpointing, checkpoint_every=0, progress=False)
        wall = time.perf_counter() - t
    log = res.log
    steps = log["steps"][1:]  # the first step pays for DataLoader start-up
    images = sum(min(args.batch_size, n - (s["step"] - 1) * args.batch_size) for s in steps)
    secs = sum(s["seconds"] for s in steps)
    wait = sum(s["data_wait"] for s in steps)
    me, kids = peak_rss_mib()
    print(f"model {model}, data {data} ({'Emotion6 JPEGs' if EMOTION6.is_dir() else 'generated JPEGs'})")
    print(f"device {log['recipe']['device']}, precision {log['recipe']['precision']}, torch threads "
          f"{torch.get_num_threads()}, workers {workers}, batch {args.batch_size}"
          f"{f' (micro {args.micro_batch})' if args.micro_batch else ''}"
          f"{', gradient checkpointing' if args.gradient_checkpointing else ''}")
    print(f"steps timed: {len(steps)} of {len(log['steps'])}; first step {log['steps'][0]['seconds']:.2f} s")
    print(f"training: {images / secs:.2f} images/s, {secs / len(steps):.2f} s/step")
    per_step = ", ".join(f"{s['data_wait'] / s['seconds']:.2f}" for s in steps)
    print(f"data-wait fraction: {wait / secs:.3f} (per step: {per_step})")
    print(f"peak RSS: {me:.0f} MiB (process), {kids:.0f} MiB (largest DataLoader worker)")
    if torch.cuda.is_available() and log["recipe"]["device"].startswith("cuda"):
        print(f"peak GPU memory allocated: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    print(f"whole call (load, train, save): {wall:.1f} s")
    print(json.dumps({"images_per_s": images / secs, "s_per_step": secs / len(steps), "data_wait_fraction": wait / secs,
                      "peak_rss_mib": me, "workers_peak_rss_mib": kids}))


if __name__ == "__main__":
    main()
