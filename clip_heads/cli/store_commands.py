"""Commands that build and read feature stores: encode, merge, predict, prompts, info, verify."""
from __future__ import annotations

import json
import sys

import click

from ..catalog import DECODE_PATHS, DEFAULT_MODEL, ENCODE_PRECISIONS, FEATURES, PRECISIONS
from .app import friendly, main
from .options import (ALLOW_OUTSIDE, Existing, LABEL_LEVEL, SPLIT, WORKERS, features_option, formats,
                      parse_devices_option, parse_shard, ray_options, source_options)


@main.command()
@click.argument("source", type=click.Path())
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="Store file to write (.h5).")
@click.option("--model", "-m", default=DEFAULT_MODEL, help="Hugging Face id or local directory saved with save_pretrained, of any supported family (CLIP, SigLIP, SigLIP 2, MetaCLIP 2, AltCLIP, Chinese-CLIP).")
@click.option("--format", "fmt", default="auto", type=click.Choice(formats()), help="Dataset format; auto detects the obvious ones.")
@click.option("--templates", "-t", multiple=True, help="Template set name or file (repeatable). Default: the dataset kind's sets.")
@click.option("--features", default="projected", metavar="LIST", callback=lambda ctx, param, value: features_option(value),
              help=f"Image features to store: projected, or projected,pre-projection (also the image tower's pooled output before its projection, and the projection). Names: {', '.join(FEATURES)}.")
@click.option("--views", default=0, type=click.IntRange(min=0), metavar="K", help="Also store K augmented views of each image (/images/views, N x K x dim): random resized crop (area 0.5-1, aspect 3/4-4/3) + horizontal flip (p 0.5), then the model's own preprocessing; seeded per image, so resumes, shards and engines write the same views. Costs about (K+1)x the encode. Heads train on them with --param use_views=true. [default: 0, none]")
@click.option("--views-seed", default=0, type=int, help="Seed of the --views draws (recorded in the store).")
@click.option("--batch-size", "-b", default=64, type=click.IntRange(min=1), help="Images per forward pass.")
@WORKERS
@click.option("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--precision", default="auto", type=click.Choice(ENCODE_PRECISIONS), help="auto = fp16 autocast on GPU; bf16 autocast on a CPU with bf16 units (AMX, AVX-512 BF16), else fp32. fp32 is exact.")
@click.option("--decode", default="auto", type=click.Choice(DECODE_PATHS), help="JPEG decode and resize: auto = DCT-domain reduced decode (PIL draft) and torch's uint8 resize, within cosine 0.9999 of exact; exact = the full decode and PIL resize (the processor's).")
@click.option("--dtype", default="float16", type=click.Choice(["float16", "float32"]), help="Stored image vector type.")
@click.option("--no-normalize", is_flag=True, help="Store raw projections instead of L2-normalised vectors.")
@click.option("--limit", default=None, type=click.IntRange(min=1), help="Encode a seeded sample of this many images.")
@click.option("--seed", default=0, help="Seed of the --limit sample.")
@SPLIT
@LABEL_LEVEL
@click.option("--source-option", "-O", "source_opts", multiple=True, metavar="KEY=VALUE",
              help="Any other option of the format (repeatable), e.g. -O agreement=5 (twitter1), -O ties=first (abstract), "
                   "-O attributes=false (emoset), -O image_column=img -O label_column=emotion (hf).")
@click.option("--shard", default=None, metavar="I/N|auto", help="Encode only slice I of N (one process per GPU or machine); join with `clip-heads merge`. auto: this Slurm array task's or torchrun rank's shard, written to OUT-stem.shard-I-of-N.h5; finished shards are skipped on a rerun.")
@click.option("--devices", default=None, metavar="LIST", help="One worker per device of this machine, one store: cuda:0,cuda:1,... or all (every GPU); cpu,cpu runs two CPU workers.")
@click.option("--engine", default="local", type=click.Choice(["local", "ray"]), help="local: this machine; ray: a Ray Data pipeline (pip install 'clip-heads[ray]').")
@click.option("--address", default=None, help="--engine ray: the Ray cluster to join (auto, or ray://HOST:10001). [default: start Ray on this machine]")
@click.option("--num-gpus-per-worker", default=None, type=click.FloatRange(min=0), help="--engine ray: GPUs per embedding worker; 0 for CPU workers. [default: 1 when the cluster has GPUs, else 0]")
@click.option("--embed-workers", default=None, type=click.IntRange(min=1), help="--engine ray: embedding workers. [default: as many as the GPUs allow; 1 on CPU]")
@click.option("--decode-cpus", default=None, type=click.IntRange(min=1), help="--engine ray: decoding workers, one CPU each. [default: the CPUs left, at most 8 per embedding worker]")
@click.option("--overwrite", is_flag=True, help="Start over, discarding an existing or unfinished store at --out.")
@ALLOW_OUTSIDE
@click.pass_context
@friendly
def encode(ctx, source, out, model, fmt, templates, features, views, views_seed, batch_size, workers, device, precision, decode, dtype, no_normalize, limit, seed, split, label_level, source_opts, shard, devices, engine, address, num_gpus_per_worker, embed_workers, decode_cpus, overwrite, allow_outside_root):
    """Encode every image of SOURCE and its prompts with a frozen vision-language model into the store --out.

    An interrupted run resumes when rerun with the same arguments (with any engine); a complete
    store is left as is.
    """
    from ..encode import encode as run

    options = source_options(fmt, split, label_level, allow_outside_root, source_opts)
    r = run(source, out, model=model, format=fmt, templates=templates or None, batch_size=batch_size, workers=workers,
            device=device, precision=precision, decode=decode, dtype=dtype, normalize=not no_normalize,
            overwrite=overwrite, limit=limit, seed=seed, source_options=options, shard=parse_shard(shard),
            progress=ctx.obj["progress"], features=features, devices=parse_devices_option(devices, engine),
            engine=engine, ray_options=ray_options(engine, address, num_gpus_per_worker, embed_workers, decode_cpus),
            views=views, views_seed=views_seed)
    click.echo(f"{r.status}: {r.path} ({r.n_images} images, {r.n_skipped} skipped"
               + (f"; {r.batches} batches encoded by this run" if r.status == "resumed" else "") + ")")


@main.command()
@click.argument("out", type=click.Path(dir_okay=False))
@click.argument("shards", nargs=-1, type=Existing(dir_okay=False))
@click.option("--copy", is_flag=True, help="Copy every vector into one self-contained file instead of a store over the shard files.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@friendly
def merge(out, shards, copy, overwrite):
    """Join the shard stores of one `encode --shard` run into the store OUT, in source order.

    Without SHARDS, the ones `--shard auto` wrote for OUT (OUT-stem.shard-I-of-N.h5). By default
    OUT reads the shards' rows in place (HDF5 virtual datasets, no vector copied): keep the
    shards beside it, and move them together with it.
    """
    from ..sharding import find_shards
    from ..store import open_store
    from ..writer import merge_stores

    shards = list(shards) or [str(p) for p in find_shards(out)]
    merge_stores(out, shards, overwrite=overwrite, copy=copy)
    with open_store(out) as s:
        how = "copied" if copy else "over the shard files, nothing copied"
        click.echo(f"merged {len(shards)} shards into {out} ({len(s)} images; {how})")


@main.command()
@click.argument("head_dir", type=Existing(file_okay=False))
@click.argument("source", type=click.Path())
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="Predictions file to write (.parquet).")
@click.option("--model", "-m", default=None, help="CLIP to embed with. [default: the head's own backbone]")
@click.option("--format", "fmt", default="auto", type=click.Choice(formats()), help="Dataset format; auto detects the obvious ones.")
@click.option("--top-k", default=0, type=click.IntRange(min=0), help="Also keep the top-k images per class, on the fly (OUT-stem.topK.json).")
@click.option("--batch-size", "-b", default=64, type=click.IntRange(min=1), help="Images per forward pass.")
@WORKERS
@click.option("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--precision", default="auto", type=click.Choice(PRECISIONS), help="auto = fp16 autocast on GPU, fp32 on CPU.")
@click.option("--dtype", default="float16", type=click.Choice(["float16", "float32"]), help="Round vectors as the head's training store did.")
@click.option("--no-normalize", is_flag=True, help="The head was trained on raw (not L2-normalised) vectors.")
@SPLIT
@LABEL_LEVEL
@click.option("--source-option", "-O", "source_opts", multiple=True, metavar="KEY=VALUE", help="Any other option of the format (repeatable).")
@click.option("--devices", default=None, metavar="LIST", help="One worker per device of this machine: cuda:0,cuda:1,..., all, or cpu,cpu.")
@click.option("--engine", default="local", type=click.Choice(["local", "ray"]), help="local: this machine; ray: a Ray Data pipeline.")
@click.option("--address", default=None, help="--engine ray: the Ray cluster to join.")
@click.option("--num-gpus-per-worker", default=None, type=click.FloatRange(min=0), help="--engine ray: GPUs per embedding worker.")
@click.option("--embed-workers", default=None, type=click.IntRange(min=1), help="--engine ray: embedding workers.")
@click.option("--decode-cpus", default=None, type=click.IntRange(min=1), help="--engine ray: decoding workers.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@ALLOW_OUTSIDE
@click.pass_context
@friendly
def predict(ctx, head_dir, source, out, model, fmt, top_k, batch_size, workers, device, precision, dtype, no_normalize, split,
            label_level, source_opts, devices, engine, address, num_gpus_per_worker, embed_workers, decode_cpus, overwrite,
            allow_outside_root):
    """Encode SOURCE and classify it with the saved head HEAD_DIR in one streaming pass: one parquet row per image.

    No store is written: rows (key, prediction, probability, p_<class>, skipped) are appended as
    the images come, so memory stays flat however many there are.
    """
    from ..predict import predict as run

    r = run(head_dir, source, out, model=model, format=fmt, top_k=top_k, batch_size=batch_size, workers=workers,
            device=device, precision=precision, dtype=dtype, normalize=not no_normalize,
            source_options=source_options(fmt, split, label_level, allow_outside_root, source_opts),
            devices=parse_devices_option(devices, engine), engine=engine,
            ray_options=ray_options(engine, address, num_gpus_per_worker, embed_workers, decode_cpus),
            overwrite=overwrite, progress=ctx.obj["progress"])
    click.echo(f"wrote {r.path}: {r.n_rows} rows ({r.n_skipped} skipped)" + (f"; top {top_k} per class in {r.top_k_path}" if r.top_k_path else ""))


@main.command()
@click.argument("store", type=Existing(dir_okay=False))
@click.option("--templates", "-t", multiple=True, required=True, help="Template set name or file (repeatable).")
@click.option("--classes", default=None, help="Label set to write prompts for: a built-in name (fi, emotion6, ...), a file, or a comma list. [default: the store's classes]")
@click.option("--synonyms", default=None, type=Existing(dir_okay=False), help="JSON {class: [phrases]} expanding each class.")
@click.option("--name", default=None, help="Name of the prompt set (one --templates only). [default: the template set's name]")
@click.option("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--overwrite", is_flag=True, help="Replace prompt sets of the same name.")
@click.pass_context
@friendly
def prompts(ctx, store, templates, classes, synonyms, name, device, overwrite):
    """Add prompt sets to STORE, encoded by the store's own model (images are not touched)."""
    from ..prompts import add_prompts

    names = add_prompts(store, list(templates), classes=classes, synonyms=synonyms, name=name, device=device,
                        overwrite=overwrite, progress=ctx.obj["progress"])
    click.echo(f"added prompt sets {', '.join(names)} to {store}")


@main.command()
@click.argument("store", type=Existing(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@friendly
def info(store, as_json):
    """Print what is inside STORE: model, dim, counts per class, prompt sets, skipped images."""
    from ..store import open_store

    with open_store(store, allow_incomplete=True) as s:
        d = s.summary()
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    click.echo(f"store      {d['path']}  (schema {d['schema_version']}, {'complete' if d['complete'] else 'INCOMPLETE'})")
    click.echo(f"model      {d['model_id']}  {d['model_hash']}")
    rule = d.get("scoring") or {}
    click.echo(f"family     {d.get('family', 'clip')}, scoring {rule.get('scoring', 'softmax')} at logit_scale "
               f"{rule.get('logit_scale', 'unrecorded (100)')}" + (f", logit_bias {rule['logit_bias']}" if "logit_bias" in rule else "")
               + f"; features {d.get('features', 'projected')}")
    click.echo(f"vectors    {d['n_images']} x {d['dim']} {d['dtype']}, {'L2-normalised' if d['normalized'] else 'raw'}")
    src = d.get("source") or {}
    click.echo(f"source     {src.get('format', '?')} at {src.get('root', '?')}  (fingerprint {str(d['source_fingerprint'])[:12]})")
    click.echo(f"classes    {len(d['classes'])}")
    width = max((len(c) for c in d["classes"]), default=0)
    for c, n in d["classes"].items():
        click.echo(f"  {c:<{width}}  {n}")
    if d["extras"]:
        click.echo(f"extras     {', '.join(d['extras'])}")
    v = d.get("views")
    if v:
        click.echo(f"views      {v['count']} per image{' (+ pre-projection)' if v.get('pre_projection') else ''}: "
                   f"{v.get('crop', '?')} crop, scale {v.get('scale')}, ratio {[round(r, 4) for r in v.get('ratio', [])]}, "
                   f"flip p {v.get('flip')}, seed {v.get('seed')}, recipe version {v.get('version', 1)}")
    click.echo(f"prompts    {len(d['prompt_sets'])} sets")
    for n, p in d["prompt_sets"].items():
        click.echo(f"  {n}: {p['templates']} templates x {p['classes']} classes = {p['prompts']} prompts")
        for t in p["template_texts"][:5]:
            click.echo(f"      {t}")
        if len(p["template_texts"]) > 5:
            click.echo(f"      ... and {len(p['template_texts']) - 5} more")
    click.echo(f"skipped    {d['n_skipped']}")
    for key, reason in d["skipped"]:
        click.echo(f"  {key}: {reason}")
    click.echo(f"versions   {', '.join(f'{k} {v}' for k, v in (d['versions'] or {}).items())}")
    click.echo(f"created    {d['created']}  completed {d['completed']}")


@main.command()
@click.argument("store", type=Existing(dir_okay=False))
@friendly
def verify(store):
    """Read every chunk of STORE and check its counts, ranges and checksums (exit 1 on any problem)."""
    from ..verify import verify_store

    rep = verify_store(store)
    click.echo(rep.text)
    if not rep.ok:
        sys.exit(1)

