"""What checksums cost a reader: ``open_store(p).arrays()`` with and without them, in one run.

    .venv/bin/python benchmarks/bench_store.py [--rows 100000] [--dim 512] [--dtype float16] [--repeats 9]

Writes one store with :func:`clip_heads.write_store` (Fletcher-32 on every numeric chunk,
sha256 on strings) and a copy whose row datasets carry no checksum (the layout of stores
written before checksums), then times ``open_store(p).arrays()`` on each, alternating A B A B
so drift on a shared machine falls on both, and prints the medians and their ratio
(target <= 1.05). The files are read from the page cache after a warm-up, which is where a
checksum shows most (from a cold disk the read itself dominates).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from clip_heads.store import l2_normalize, open_store
from clip_heads.writer import write_store


def strip_checksums(src: Path, dst: Path) -> None:
    """A copy of ``src`` whose row datasets are rewritten without the Fletcher-32 filter."""
    with h5py.File(src, "r") as a, h5py.File(dst, "w") as b:
        for k, v in a.attrs.items():
            b.attrs[k] = v

        def copy(name, obj):
            if isinstance(obj, h5py.Group):
                b.require_group(name)
                return
            kw = dict(chunks=obj.chunks, maxshape=obj.maxshape) if obj.chunks else {}
            d = b.create_dataset(name, data=obj[()], dtype=obj.dtype, **kw)
            for k, v in obj.attrs.items():
                d.attrs[k] = v

        a.visititems(copy)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    X = l2_normalize(rng.normal(size=(args.rows, args.dim)).astype(np.float32))
    y = rng.integers(0, 10, args.rows)
    with tempfile.TemporaryDirectory() as tmp:
        with_sums = write_store(Path(tmp) / "checksums.h5", X, y, [f"c{i}" for i in range(10)], dtype=args.dtype)
        without = Path(tmp) / "plain.h5"
        strip_checksums(with_sums, without)
        with open_store(with_sums) as s, open_store(without) as t:
            assert s.checksums and not t.checksums
            assert np.array_equal(s.arrays()[0], t.arrays()[0])

        def once(p: Path) -> float:
            t0 = time.perf_counter()
            with open_store(p) as s:
                s.arrays()
            return time.perf_counter() - t0

        once(with_sums), once(without)  # warm-up: both files in the page cache
        a, b = [], []
        for _ in range(args.repeats):
            a.append(once(with_sums))
            b.append(once(without))
        ratios = [x / z for x, z in zip(a, b, strict=True)]
    mb = args.rows * args.dim * np.dtype(args.dtype).itemsize / 2**20
    print(f"store             {args.rows} x {args.dim} {args.dtype} ({mb:.0f} MiB of vectors), {args.repeats} pairs")
    print(f"with checksums    {statistics.median(a) * 1000:8.1f} ms  open_store().arrays() (min {min(a) * 1000:.1f})")
    print(f"without           {statistics.median(b) * 1000:8.1f} ms  (min {min(b) * 1000:.1f})")
    print(f"ratio             {statistics.median(ratios):8.3f}  median of pairs (target <= 1.05)")


if __name__ == "__main__":
    main()
