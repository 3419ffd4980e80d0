"""Scaling costs, in one run: the Ray engine against the single-process encode, and a merge over
the shard files against a copying merge.

    .venv/bin/python benchmarks/bench_scale.py [--images 384] [--batch-size 64] [--ray-cpus 2]
                                               [--rows 25000,100000] [--shards 4] [--skip-ray]

1. Encode throughput on the same real JPEGs (Emotion6 from ../shared/datasets; generated JPEGs
   when absent) with a ViT-B/32-shaped CLIP: ``encode(engine="local")`` and
   ``encode(engine="ray")`` on a local Ray started here with ``--ray-cpus`` CPUs (started once,
   before the clock runs, as a cluster is). Printed: images/s end to end (the Ray figure pays
   for its actors starting and loading the model), images/s in steady state (from the first
   committed batch to the last), and their ratios (target >= 0.8).
2. ``merge_stores`` of ``--shards`` shard stores of each ``--rows`` x 512 float16, over the shard
   files (virtual, the default) and copying (``copy=True``): the virtual merge must not grow
   with the rows, the copy grows with them.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_encode import generated_jpegs  # noqa: E402
from common import EMOTION6, vitb32_dir  # noqa: E402

from clip_heads.encode import encode  # noqa: E402
from clip_heads.journal import StoreWriter  # noqa: E402
from clip_heads.store import l2_normalize  # noqa: E402
from clip_heads.writer import merge_stores, write_store  # noqa: E402


def timed_encode(source: str, out: Path, model: str, n: int, batch_size: int, **kw) -> dict:
    """Wall time of one encode, and the time from its first committed batch to its last."""
    commits: list[float] = []
    real = StoreWriter.commit

    def commit(self, items):
        real(self, items)
        commits.append(time.perf_counter())

    StoreWriter.commit = commit
    try:
        t = time.perf_counter()
        r = encode(source, out, model=model, limit=n, batch_size=batch_size, progress=False, templates=["bp-photo"],
                   device="cpu", **kw)
        wall = time.perf_counter() - t
    finally:
        StoreWriter.commit = real
    steady = (len(commits) - 1) * batch_size / (commits[-1] - commits[0]) if len(commits) > 1 else float("nan")
    return {"images": r.n_images, "e2e": r.n_images / wall, "steady": steady, "wall": wall}


def bench_ray(args) -> None:
    import ray

    model = args.model or vitb32_dir()
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        source = str(EMOTION6) if EMOTION6.is_dir() else generated_jpegs(Path(tmp) / "imgs", args.images)
        ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
        try:
            local = timed_encode(source, Path(tmp) / "local.h5", model, args.images, args.batch_size, workers=0)
            on_ray = timed_encode(source, Path(tmp) / "ray.h5", model, args.images, args.batch_size, engine="ray")
        finally:
            ray.shutdown()
    print(f"source            {'Emotion6 (real JPEGs)' if source == str(EMOTION6) else 'generated JPEGs'}, "
          f"{local['images']} images, batch {args.batch_size}")
    print(f"single process    {local['e2e']:8.2f} images/s end to end, {local['steady']:8.2f} steady ({local['wall']:.1f} s)")
    print(f"ray ({args.ray_cpus} CPUs)      {on_ray['e2e']:8.2f} images/s end to end, {on_ray['steady']:8.2f} steady "
          f"({on_ray['wall']:.1f} s)")
    print(f"ratio ray/single  {on_ray['e2e'] / local['e2e']:8.3f} end to end, {on_ray['steady'] / local['steady']:.3f} "
          "steady  (target >= 0.8)")


def shard_set(folder: Path, rows: int, shards: int, dim: int = 512) -> list[Path]:
    """``shards`` stores of ``rows`` float16 vectors, marked as shards 0..N-1 of one encode."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(shards):
        X = l2_normalize(rng.standard_normal((rows, dim), dtype=np.float32))
        p = write_store(folder / f"s{i}.h5", X, rng.integers(0, 8, rows), [f"c{c}" for c in range(8)], dtype="float16",
                        keys=[f"{i}/{j}" for j in range(rows)], model_id="bench", model_hash="sha256:bench")
        with h5py.File(p, "a") as f:
            f.attrs["shard_index"], f.attrs["shard_count"] = i, shards
        paths.append(p)
    return paths


def bench_merge(args) -> None:
    print(f"merge of {args.shards} shards x 512 float16 (median of {args.repeats})")
    for rows in (int(r) for r in args.rows.split(",")):
        with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
            paths = shard_set(Path(tmp), rows, args.shards)
            times = {}
            for copy in (False, True):
                runs = []
                for _ in range(args.repeats):
                    out = Path(tmp) / f"m{int(copy)}.h5"
                    t = time.perf_counter()
                    merge_stores(out, paths, overwrite=True, copy=copy)
                    runs.append(time.perf_counter() - t)
                times[copy] = (float(np.median(runs)), out.stat().st_size / 2**20)
            (tv, sv), (tc, sc) = times[False], times[True]
            print(f"  {rows:>7} rows each: virtual {tv * 1000:8.0f} ms ({sv:6.2f} MiB file)   "
                  f"copy {tc * 1000:8.0f} ms ({sc:7.1f} MiB file)   copy/virtual {tc / tv:6.1f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=384)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--ray-cpus", type=int, default=2)
    ap.add_argument("--model", default=None, help="model dir (default: a random ViT-B/32 saved under cache/)")
    ap.add_argument("--rows", default="25000,100000", help="rows per shard, comma-separated")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--skip-merge", action="store_true")
    ap.add_argument("--tmp", default=None, help="folder for the stores")
    args = ap.parse_args()
    if not args.skip_ray:
        bench_ray(args)
    if not args.skip_merge:
        bench_merge(args)


if __name__ == "__main__":
    main()
