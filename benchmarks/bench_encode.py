"""Encode throughput: CPU precisions, decode paths, and end-to-end `encode` against the bare forward.

    .venv/bin/python benchmarks/bench_encode.py [--sections precision,decode,pipeline] [--families clip,siglip]

precision: the ViT-B/32 and SigLIP base image towers (random init) at fp32, bf16 autocast, bf16
weights, eager vs SDPA attention, channels-last, int8 dynamic quantisation and torch.compile
(in a child process under --compile-timeout): images/s, the ratio to fp32 within each round,
and the worst cosine to fp32 on real JPEGs; then what `--precision auto` picks on this CPU and
its ratio to fp32 (target >= 2x where the CPU has bf16 units).
decode: decode + preprocess images/s of one core (CPU time) for each path on Emotion6 and on
large (>= 1,500 px) JPEGs, with the max abs pixel difference (0-255 units) and the worst
ViT-B/32 embedding cosine against the model's own processor on a full decode.
pipeline (below, as before):

For each family at its base size (random weights: no pretrained ones exist here), prints images/s
of the image tower alone on the real JPEGs already preprocessed in memory, images/s of the whole
pipeline (decode + preprocess in workers, forward, journal writes and the final HDF5 store) on
the same Emotion6 JPEGs from ../shared/datasets (generated JPEGs when absent), and their ratio
(target >= 0.90 for CLIP and SigLIP). Bare runs and encodes alternate (bare, encode, bare, ...)
and each encode is set against the bare runs beside it, so drift on a shared machine cancels;
the median of those ratios is printed with each one. Where a family's tokenizer is not available
here (every one but CLIP's), the real CLIP BPE tokenizer stands in: it changes the prompts' token
ids, not the image side this measures. It also prints, per image, what the worker-side recipe
costs against running the family's own image processor (the choice made in
clip_heads.backbones.preprocess), and the cost of the encode's fsyncs (target <= 2%).
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
from common import EMOTION6, TOKENIZER, peak_rss_mib, vitb32_dir  # noqa: E402
import encode_paths  # noqa: E402

from clip_heads.backbones.model import Backbone  # noqa: E402
from clip_heads.backbones.preprocess import stack_batch  # noqa: E402
from clip_heads.encode import default_workers, encode  # noqa: E402

# family -> (what its base size is, the transformers config/model/processor names, processor kwargs)
BASE = {
    "clip": ("ViT-B/32 (openai/clip-vit-base-patch32's shape), its real tokenizer", None),
    "siglip": ("ViT-B/16 at 224 (google/siglip-base-patch16-224's shape)", ("SiglipConfig", "SiglipModel", "SiglipImageProcessor", {})),
    "siglip2": ("NaFlex ViT-B/16, 256 patches (google/siglip2-base-patch16-naflex's shape)",
                ("Siglip2Config", "Siglip2Model", "Siglip2ImageProcessor", {})),
    "metaclip_2": ("transformers' MetaClip2Config() defaults", ("MetaClip2Config", "MetaClip2Model", "CLIPImageProcessor", {})),
    "chinese_clip": ("ViT-B/16 (OFA-Sys/chinese-clip-vit-base-patch16's shape)",
                     ("ChineseCLIPConfig", "ChineseCLIPModel", "ChineseCLIPImageProcessor",
                      {"size": {"height": 224, "width": 224}, "do_center_crop": False})),
    "altclip": ("ViT-L/14 + XLM-R large (BAAI/AltCLIP's shape)", ("AltCLIPConfig", "AltCLIPModel", "CLIPImageProcessor", {})),
}
TARGETS = {"clip": 0.90, "siglip": 0.90}


def family_dir(family: str, cache: Path = Path("cache")) -> str:
    """A base-size random model of ``family`` saved once with save_pretrained (CLIP BPE tokenizer
    standing in for every family's but CLIP's)."""
    if family == "clip":
        return vitb32_dir()
    out = cache / f"bench-{family}"
    if (out / "model.safetensors").exists() or (out / "model.safetensors.index.json").exists():
        return str(out)
    import transformers
    from transformers import CLIPTokenizer

    cfg_name, model_name, proc_name, proc_kw = BASE[family][1]
    tok = CLIPTokenizer.from_pretrained(str(TOKENIZER), model_max_length=64 if family.startswith("siglip") else 77)
    text = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                bos_token_id=tok.bos_token_id)
    if family.startswith("siglip"):
        text["max_position_embeddings"] = 64
    if family == "altclip":
        text = dict(text, max_position_embeddings=514)
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(getattr(transformers, cfg_name)(text_config=text))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    getattr(transformers, proc_name)(**proc_kw).save_pretrained(out)
    return str(out)


def generated_jpegs(root: Path, n: int) -> str:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / f"c{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (256, 341, 3), dtype=np.uint8)).save(d / f"{i}.jpg", quality=85)
    return str(root)


def preprocess_costs(bb: Backbone, images: list) -> tuple[float, float]:
    """ms per image: the worker-side recipe, and the family's own image processor, on the same images."""
    def per_image(fn) -> float:
        fn(images[0])
        t = time.perf_counter()
        for im in images:
            fn(im)
        return (time.perf_counter() - t) / len(images) * 1e3

    recipe = per_image(bb.preprocess)
    processor = per_image(lambda im: bb.processor(images=[im], return_tensors="np"))
    return recipe, processor


def bench_family(family: str, args, source: str, images: list, tmp: str) -> dict:
    model = family_dir(family)
    bb = Backbone(model, device=args.device)
    n_batches = len(images) // args.batch_size
    n = n_batches * args.batch_size
    batches = [stack_batch([bb.preprocess(im) for im in images[i * args.batch_size:(i + 1) * args.batch_size]])
               for i in range(n_batches)]
    bb.encode_pixels(batches[0])  # warm-up

    def bare_forward() -> float:
        if bb.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for b in batches:
            bb.encode_pixels(b).cpu()
        if bb.device.type == "cuda":
            torch.cuda.synchronize()
        return n / (time.perf_counter() - t)

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

    workers = default_workers(bb.device) if args.workers is None else args.workers

    in_forward = {"s": 0.0}
    real_forward = bb.encode_pixels

    def forward_timed(pixels):
        t0 = time.perf_counter()
        try:
            return real_forward(pixels)
        finally:
            in_forward["s"] += time.perf_counter() - t0

    def end_to_end(name: str, limit: int):
        bb.encode_pixels = forward_timed  # the encode's own forward passes, timed inside it
        t = time.perf_counter()
        try:
            r = encode(source, Path(tmp) / f"{family}-{name}.h5", model=model, limit=limit, batch_size=args.batch_size,
                       workers=workers, device=args.device, progress=False, backbone=bb, templates=["bp-photo"],
                       overwrite=True)
        finally:
            del bb.encode_pixels
        return r, time.perf_counter() - t

    # A process pays some costs once (imports on first use, the first forked store writer): a
    # one-batch encode pays them before anything is timed, as any long encode amortises them.
    end_to_end("warm-up", args.batch_size)
    in_forward["s"] = 0.0
    real_sync = {name: getattr(os, name) for name in ("fsync", "fdatasync") if hasattr(os, name)}
    bares, e2es, ratios, walls = [bare_forward()], [], [], 0.0
    for i in range(args.rounds):  # bare, encode, bare, encode, bare: each encode against its neighbours
        for name, fn in real_sync.items():
            setattr(os, name, timed(fn))
        try:
            r, wall = end_to_end(f"run{i}", n)
        finally:
            for name, fn in real_sync.items():
                setattr(os, name, fn)
        walls += wall
        e2es.append(r.n_images / wall)
        bares.append(bare_forward())
        ratios.append(e2es[-1] / ((bares[-2] + bares[-1]) / 2))
    bare = float(np.mean(bares))
    recipe_ms, proc_ms = preprocess_costs(bb, images[:32])
    return {"family": family, "base": BASE[family][0], "images": r.n_images, "bare": bare, "bares": bares,
            "e2e": float(np.median(e2es)), "ratio": float(np.median(ratios)), "ratios": ratios, "recipe_ms": recipe_ms,
            "processor_ms": proc_ms, "recipe": type(bb.preprocess).__name__, "sync_share": synced["s"] / walls,
            "forward_share": in_forward["s"] / walls,
            "workers": workers}


def precision_section(args, images: list) -> None:
    used, why = encode_paths.cpu_choice()
    print(f"\n== CPU precision (torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}; "
          f"--precision auto = {used}: {why})")
    for family in args.precision_families.split(","):
        bb = Backbone(family_dir(family), device="cpu", precision="fp32")
        n = args.precision_images
        pixels = stack_batch([bb.preprocess(im) for im in images[:n]])
        rows = encode_paths.precision_matrix(bb.model, pixels, args.batch_size, args.precision_rounds)
        print(f"{family:<8} {BASE[family][0]}, {len(pixels)} Emotion6 JPEGs, batch {args.batch_size}")
        for r in rows:
            ok = "ok" if r["cos"] >= 0.999 else "below 0.999"
            print(f"  {r['name']:<24} {r['rate']:7.2f} img/s  x{r['ratio']:5.2f} vs fp32  worst cos {r['cos']:.6f} ({ok})")
        c = encode_paths.compile_row(family_dir(family), args.batch_size, bb.preprocess.out_height, args.compile_timeout)
        if "skipped" in c:
            print(f"  {'torch.compile':<24} skipped: {c['skipped']}")
        else:
            print(f"  {'torch.compile':<24} x{c['ratio']:5.2f} vs eager fp32 (random pixels)  worst cos {c['cos']:.6f}  "
                  f"compile {c['compile_s']:.0f} s")
        by = {r["name"]: r for r in rows}
        chosen = by.get(used, by["fp32 (SDPA attention)"])
        print(f"  fp32 {by['fp32 (SDPA attention)']['rate']:.2f} img/s vs chosen ({used}) {chosen['rate']:.2f} img/s: "
              f"ratio {chosen['ratio']:.2f} (target >= 2.00" + ("" if used != "fp32" else
              f"; unreachable without bf16 units; opt-in --precision int8 here: x{by['int8-dynamic']['ratio']:.2f}, "
              f"cos {by['int8-dynamic']['cos']:.6f}") + ")")


def decode_section(args, images: list, paths: list, tmp: str) -> None:
    bb = Backbone(family_dir("clip"), device="cpu", precision="fp32")

    def embed(x):
        return torch.cat([bb.encode_pixels(x[i:i + args.batch_size]) for i in range(0, len(x), args.batch_size)])

    large = encode_paths.large_jpegs(images[:args.large_images], Path(tmp) / "large")
    print(f"\n== decode + preprocess, one core (CPU time), ViT-B/32's 224 px recipe; simplejpeg "
          f"{'installed' if encode_paths.simplejpeg_available() else 'absent (pip install clip-heads[fast-decode])'}")
    worst = {}
    for what, files in ((f"Emotion6, {len(paths)} JPEGs (~341x256)", paths),
                        (f"large JPEGs, {len(large)} (short side 1536, quality 90)", large)):
        print(what)
        for r in encode_paths.decode_matrix(bb.preprocess, bb.processor, files, embed):
            print(f"  {r['name']:<42} {r['per_core']:7.1f} img/s per core  max |diff| {r['max_diff']:6.2f}/255  "
                  f"worst cos {r['cos']:.7f}")
            if r["name"].endswith("(default)"):
                worst[what] = r
    e6 = next(iter(worst.values()), None)
    if e6 is not None:
        print(f"default path on Emotion6: {e6['per_core']:.0f} img/s per core (target >= 600); worst cosine over both "
              f"sets {min(r['cos'] for r in worst.values()):.7f} (bound 0.9999)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="precision,decode,pipeline")
    ap.add_argument("--families", default="clip",
                    help=f"pipeline section: comma list of {', '.join(BASE)} (altclip's ViT-L/14 + XLM-R large is slow on a CPU)")
    ap.add_argument("--precision-families", default="clip,siglip")
    ap.add_argument("--precision-images", type=int, default=32)
    ap.add_argument("--precision-rounds", type=int, default=2)
    ap.add_argument("--compile-timeout", type=float, default=240, help="seconds torch.compile may take (0: skip it)")
    ap.add_argument("--decode-images", type=int, default=96)
    ap.add_argument("--large-images", type=int, default=16)
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=2, help="timed encodes per family, each between two bare runs")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tmp", default=None, help="folder for the stores (its filesystem decides what a sync costs)")
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = sorted(set(families + args.precision_families.split(",")) - set(BASE))
    if unknown:
        raise SystemExit(f"unknown families {unknown}; valid: {', '.join(BASE)}")
    print(f"torch threads {torch.get_num_threads()}, batch {args.batch_size}; one run on a shared machine")
    n = max(1, args.images // args.batch_size) * args.batch_size
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        if EMOTION6.is_dir():
            from clip_heads.datasets import open_source
            from clip_heads.encode import sample_positions

            source, what = str(EMOTION6), "Emotion6 (real JPEGs)"
            src = open_source(source)
            # The same images the encode's seeded --limit sample picks, decoded once for the bare forward.
            chosen = sample_positions(len(src), max(n, args.decode_images, args.precision_images), 0)
            images = [src.load(int(i)) for i in chosen]
            paths = [src.path(int(i)) for i in chosen[:args.decode_images]]
        else:
            from PIL import Image

            source, what = generated_jpegs(Path(tmp) / "imgs", n), "generated JPEGs"
            paths = sorted(Path(source).rglob("*.jpg"))
            images = [Image.open(p).convert("RGB") for p in paths]
        print(f"source {what}")
        if "precision" in sections:
            precision_section(args, images)
        if "decode" in sections:
            decode_section(args, images, paths, tmp)
        if "pipeline" not in sections:
            return
        print("\n== end-to-end encode (default decode, precision and workers) vs the bare forward")
        if EMOTION6.is_dir():  # exactly the images the encode's seeded --limit sample picks
            images = [src.load(int(i)) for i in sample_positions(len(src), n, 0)]
        rows = []
        for family in families:
            row = bench_family(family, args, source, images, tmp)
            rows.append(row)
            target = TARGETS.get(family)
            print(f"{family:<13} {row['base']}")
            print(f"  bare forward      {row['bare']:8.1f} images/s (" + ", ".join(f"{b:.1f}" for b in row["bares"]) + ")")
            print(f"  end-to-end encode {row['e2e']:8.1f} images/s ({row['images']} images, {row['workers']} workers)")
            print(f"  ratio             {row['ratio']:8.3f}  (median; each encode against the bare runs beside it: "
                  + ", ".join(f"{x:.3f}" for x in row["ratios"]) + ")" + (f"  target >= {target:.2f}" if target else ""))
            print(f"  forward share     {row['forward_share']:8.3f}  of the encodes' wall time in their own forward passes "
                  "(the ratio a quiet machine gives, whatever the forward's speed drift)")
            print(f"  preprocessing     {row['recipe_ms']:.2f} ms/image ({row['recipe']}) vs {row['processor_ms']:.2f} ms "
                  f"with the family's processor; fsyncs {row['sync_share']:.2%} of the encode")
    print("\nfamily         bare img/s  encode img/s  ratio  forward share")
    for row in rows:
        print(f"{row['family']:<13} {row['bare']:10.1f}  {row['e2e']:12.1f}  {row['ratio']:.3f}  {row['forward_share']:.3f}")
    me, kids = peak_rss_mib()
    print(f"peak RSS {me:.0f} MiB main, {kids:.0f} MiB largest worker")


if __name__ == "__main__":
    main()
