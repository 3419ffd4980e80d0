"""Time the prompt ablation and zero-shot on an FI-sized synthetic store.

A store shaped like FI / Image-Emotion encoded with ViT-B/32: 23,308 images x 512 dims, one
prompt set of 80 templates x 8 classes. Target: the ablation of all 81 rows (80 templates
plus their ensemble) in <= 1 s on a 2-core machine.

    python benchmarks/bench_ablation.py [--dtype float16] [--repeat 5]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from clip_heads.ablation import ablate, ablate_prompts
from clip_heads.evaluate import run_zero_shot
from clip_heads.store import PromptSet, l2_normalize, open_store
from clip_heads.writer import write_store

N, D, T, C = 23_308, 512, 80, 8
FI = ["amusement", "anger", "awe", "contentment", "disgust", "excitement", "fear", "sadness"]


def build(path: Path, dtype: str, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    # Classes share a common direction and differ a little, as CLIP's emotion vectors do.
    means = l2_normalize(rng.normal(size=D) + 0.5 * rng.normal(size=(C, D)))
    y = rng.integers(0, C, N)
    X = l2_normalize(means[y] + 0.12 * rng.normal(size=(N, D)))
    # Each template is the class mean plus noise of its own strength: their accuracies spread out.
    E = means[None] + rng.uniform(0.0, 0.12, size=(T, 1, 1)) * rng.normal(size=(T, C, D))
    tid, cid = np.divmod(np.arange(T * C), C)
    ps = PromptSet("bench", FI, [f"template {t}: {{}}" for t in range(T)],
                   [f"template {t}: {FI[c]}" for t, c in zip(tid, cid, strict=True)], E.reshape(T * C, D).astype(np.float32), tid, cid)
    return write_store(path, X, y, FI, prompt_sets=[ps], dtype=dtype, model_id="synthetic")


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="store dtype (encode writes float16)")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = build(Path(tmp) / "bench.h5", args.dtype)
        with open_store(path) as s:
            X, y, classes = s.arrays()
            ps = s.prompt_set("bench")
        t_core = best_of(lambda: ablate(X, y, classes, [ps]), args.repeat)
        t_full = best_of(lambda: ablate_prompts(path), args.repeat)
        t_zs = best_of(lambda: run_zero_shot(path), args.repeat)
        rows = ablate_prompts(path).metrics["rows"]
    print(f"store: {N} x {D} {args.dtype}, {T} templates x {C} classes -> {len(rows)} ablation rows")
    print(f"ablation, arrays in memory (ablate):       {t_core:.3f} s")
    print(f"ablation, from the store file (ablate_prompts): {t_full:.3f} s   target <= 1 s: {'OK' if t_full <= 1 else 'SLOW'}")
    print(f"zero-shot, from the store file (run_zero_shot): {t_zs:.3f} s")
    print(f"best row: {rows[0]['template']!r} accuracy {rows[0]['accuracy']:.3f}; worst: {rows[-1]['template']!r} {rows[-1]['accuracy']:.3f}")


if __name__ == "__main__":
    main()
