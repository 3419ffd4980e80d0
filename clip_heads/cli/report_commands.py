"""Commands that run a whole study: demo, reproduce."""
from __future__ import annotations

import click

from ..catalog import DEFAULT_MODEL
from .app import friendly, main
from .options import Existing, NO_PLOTS, WORKERS, page, parse_floats


@main.command()
@click.option("--source", default=None, type=Existing(), help="Local cifar-100-python tarball or extracted folder, or an image-folder copy (skips the download).")
@click.option("--model", "-m", default=DEFAULT_MODEL, help="Hugging Face CLIP id or local directory.")
@click.option("--limit", default=1000, type=click.IntRange(min=1), help="Seeded sample of test images to encode.")
@click.option("--cv", default=10, type=click.IntRange(min=2), help="Folds of the heads' cross-validation.")
@click.option("--seed", default=0, help="Seed of the sample, the folds and training.")
@click.option("--out", "-o", "out_dir", default="cache/demo", type=click.Path(file_okay=False), help="Folder for the store and every report.")
@click.option("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--batch-size", "-b", default=64, type=click.IntRange(min=1), help="Images per forward pass.")
@WORKERS
@click.option("--url", default=None, hidden=True, help="Download URL of the tarball (tests).")
@click.option("--md5", default=None, hidden=True, help="Expected MD5 of the tarball (tests).")
@NO_PLOTS
@click.pass_context
@friendly
def demo(ctx, source, model, limit, cv, seed, out_dir, device, batch_size, workers, url, md5, no_plots):
    """The whole tool on real data: CIFAR-100 (downloaded, MD5-checked), encode, zero-shot, prompt ablation, 10-fold CV of heads."""
    from ..demo import CIFAR100_MD5, CIFAR100_URL, run_demo

    summary = run_demo(out_dir, source=source, model=model, limit=limit, cv=cv, seed=seed, device=device, batch_size=batch_size,
                       workers=workers, url=url or CIFAR100_URL, md5=md5 or CIFAR100_MD5, progress=ctx.obj["progress"],
                       plots=False if no_plots else None)
    click.echo(summary["headline"])
    click.echo(f"full tables (the papers' layout) in {out_dir}/report.txt; {page(out_dir)}")


@main.command()
@click.option("--fi", required=True, type=Existing(file_okay=False), help="FI / Image-Emotion dataset: the eight emotion class folders.")
@click.option("--cifar", required=True, type=Existing(), help="CIFAR-100 python tarball or extracted folder.")
@click.option("--out", "-o", "out_dir", default="cache/reproduce", type=click.Path(file_okay=False), help="Folder for stores, runs and tables.md.")
@click.option("--model", "-m", default=DEFAULT_MODEL, help="CLIP id or directory (the paper: openai/clip-vit-base-patch32).")
@click.option("--cv", default=10, type=click.IntRange(min=2), help="Folds of every cross-validation (the paper: 10).")
@click.option("--seed", default=0, help="Seed of the folds and of training.")
@click.option("--heads", default=",".join(("linear", "mlp", "contrastive", "tip-adapter")), help="Heads to cross-validate beside the paper's tables.")
@click.option("--no-finetune", is_flag=True, help="Skip Tables 3-5 (full fine-tunes of CLIP, a GPU job): zero-shot tables and heads only.")
@click.option("--cifar-split", default="all", type=click.Choice(["all", "train", "test"]), help="CIFAR-100 images to use (the paper: all 60,000).")
@click.option("--alphas", default="0,0.25,0.5,0.75,1", help="WiSE-FT mixing weights scored beside Table 5.")
@click.option("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--batch-size", "-b", default=64, type=click.IntRange(min=1), help="Images per forward pass when encoding.")
@click.option("--ft-batch-size", default=256, type=click.IntRange(min=2), help="Fine-tune contrastive batch (the paper: 256).")
@click.option("--micro-batch", default=None, type=click.IntRange(min=1), help="Fine-tune gradient accumulation micro-batch.")
@WORKERS
@NO_PLOTS
@click.pass_context
@friendly
def reproduce(ctx, fi, cifar, out_dir, model, cv, seed, heads, no_finetune, cifar_split, alphas, device, batch_size, ft_batch_size, micro_batch, workers, no_plots):
    """Bondielli & Passaro's Tables 1-5 (ours beside the paper's) and the frozen-CLIP heads, in one run."""
    from ..heads import list_heads
    from ..reproduce import reproduce as run

    names = [h.strip() for h in heads.split(",") if h.strip()]
    unknown = [h for h in names if h not in list_heads()]
    if unknown:
        raise click.BadParameter(f"unknown heads {unknown}; valid: {', '.join(list_heads())}", param_hint="--heads")
    result = run(fi, cifar, out_dir, model=model, cv=cv, seed=seed, heads=names, finetune=not no_finetune, alphas=parse_floats(alphas),
                 cifar_split=cifar_split, device=device, batch_size=batch_size, workers=workers,
                 finetune_options={"batch_size": ft_batch_size, "micro_batch": micro_batch}, progress=ctx.obj["progress"],
                 plots=False if no_plots else None)
    click.echo(result["text"])
    click.echo(f"written to {out_dir}/tables.md; {page(out_dir)}")

