"""Commands that fine-tune the model itself: finetune, wise-ft, generalisation."""
from __future__ import annotations

import click

from ..catalog import DEFAULT_MODEL, PRECISIONS
from .app import friendly, main
from .options import (ALLOW_OUTSIDE, Existing, LABEL_LEVEL, NO_PLOTS, Renamed, SPLIT, WORKERS, formats, page,
                      parse_floats, source_options)


@main.command()
@click.argument("source", type=click.Path())
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(file_okay=False), help="Model directory to write (loadable by `encode --model`).")
@click.option("--model", "-m", default=DEFAULT_MODEL, help="CLIP to start from: hub id or local directory.")
@click.option("--format", "fmt", default="auto", type=click.Choice(formats()), help="Dataset format.")
@SPLIT
@LABEL_LEVEL
@click.option("--templates", "-t", default=None, help="Caption template set or file. [default: bp-emotion for emotion data, bp-photo otherwise]")
@click.option("--cv", default=None, type=click.IntRange(min=2), help="Run the paper's K-fold protocol (fine-tune on K-1 folds, zero-shot the held-out fold) instead of one fine-tune on everything.")
@click.option("--epochs", default=None, type=click.IntRange(min=1), help="[default: 3 for emotion data, 1 otherwise, as the paper]")
@click.option("--batch-size", default=256, type=click.IntRange(min=2), help="Contrastive batch (the paper: 256).")
@click.option("--micro-batch", default=None, type=click.IntRange(min=1), help="Accumulate gradients over micro-batches of this size when the batch does not fit.")
@click.option("--lr", default=2e-5, help="AdamW learning rate (the paper: 2e-5).")
@click.option("--weight-decay", default=0.2, help="AdamW weight decay (the paper: 0.2).")
@click.option("--warmup", default=0.1, help="Warm-up: a fraction of all steps (<1) or a number of steps; cosine decay after.")
@click.option("--precision", default="auto", type=click.Choice(PRECISIONS), help="auto = bf16/fp16 autocast on GPU, fp32 on CPU.")
@click.option("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--gradient-checkpointing", is_flag=True, help="Trade compute for memory.")
@WORKERS
@click.option("--seed", default=0, help="Seed of training and of the folds (the heads' folds for the same seed).")
@click.option("--overwrite", is_flag=True, help="Start over instead of resuming a run in --out (with --cv: discard the scored folds).")
@ALLOW_OUTSIDE
@NO_PLOTS
@click.pass_context
@friendly
def finetune(ctx, source, out_dir, model, fmt, split, label_level, templates, cv, epochs, batch_size, micro_batch, lr,
             weight_decay, warmup, precision, device, gradient_checkpointing, workers, seed, overwrite, allow_outside_root,
             no_plots):
    """Fine-tune both CLIP towers on SOURCE paired with class captions (the papers' Emotion-CLIP recipe).

    An interrupted run resumes from its last checkpoint when rerun with the same arguments.
    """
    from ..finetune import finetune as run
    from ..finetune_cv import cross_validate_finetune

    opts = dict(format=fmt, source_options=source_options(fmt, split, label_level, allow_outside_root), templates=templates, epochs=epochs,
                batch_size=batch_size, micro_batch=micro_batch, lr=lr, weight_decay=weight_decay, warmup=warmup,
                precision=precision, device=device, gradient_checkpointing=gradient_checkpointing, workers=workers,
                progress=ctx.obj["progress"], plots=False if no_plots else None)
    if cv:
        rep = cross_validate_finetune(source, out_dir, model, cv=cv, seed=seed, overwrite=overwrite, **opts)
        click.echo(rep.text)
        click.echo(f"{cv}-fold results written to {out_dir}; {page(out_dir)}")
        return
    r = run(source, out_dir, model, seed=seed, overwrite=overwrite, **opts)
    click.echo(f"{r.status}: {r.out_dir} ({r.n_train} images, {r.steps} steps, {len(r.skipped)} skipped); "
               f"encode with `clip-heads encode SOURCE --model {r.out_dir}`; {page(r.out_dir)}")


@main.command("wise-ft")
@click.argument("zero_shot_model")
@click.argument("finetuned_model", type=Existing(file_okay=False))
@click.option("--alphas", "alphas", cls=Renamed, old="--alpha", default="0.5", help="Mixing weight(s) in [0, 1], comma-separated: 0 = zero-shot, 1 = fine-tuned.")
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(file_okay=False), help="Model directory (one alpha) or folder of alpha-X.XX/ directories (several); never an input.")
@friendly
def wise_ft(zero_shot_model, finetuned_model, alphas, out_dir):
    """Robust fine-tuning (WiSE-FT): write (1-alpha)*ZERO_SHOT_MODEL + alpha*FINETUNED_MODEL as model directories.

    Models of different architectures are refused; a warning says when neither was fine-tuned from the other.
    """
    from ..wise_ft import interpolate, interpolate_sweep

    values = parse_floats(alphas)
    if len(values) == 1:
        click.echo(f"wrote {interpolate(zero_shot_model, finetuned_model, values[0], out_dir)}")
    else:
        for p in interpolate_sweep(zero_shot_model, finetuned_model, values, out_dir):
            click.echo(f"wrote {p}")


@main.command()
@click.argument("a_source", type=click.Path())
@click.argument("b_source", type=click.Path())
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(file_okay=False), help="Folder for the fine-tuned model and the table.")
@click.option("--model", "-m", default=DEFAULT_MODEL, help="CLIP to start from.")
@click.option("--a-format", default="auto", type=click.Choice(formats()), help="Format of A (fine-tuned on).")
@click.option("--b-format", default="auto", type=click.Choice(formats()), help="Format of B (zero-shot only).")
@click.option("--a-split", default=None, help="--split of A (the source's split, as for encode).")
@click.option("--b-split", default=None, help="--split of B.")
@click.option("--alphas", default="0,0.25,0.5,0.75,1", help="WiSE-FT mixing weights to score.")
@click.option("--holdout", default="10", help="Hold out 1/K of A to score in-domain accuracy, or 'none' to train on all of A (the paper's Table 5).")
@click.option("--finetuned", default=None, type=Existing(file_okay=False), help="Use this fine-tuned model instead of training one.")
@click.option("--epochs", default=None, type=click.IntRange(min=1), help="[default: 3 for emotion data, 1 otherwise]")
@click.option("--batch-size", default=256, type=click.IntRange(min=2), help="Contrastive batch.")
@click.option("--micro-batch", default=None, type=click.IntRange(min=1), help="Gradient accumulation micro-batch.")
@click.option("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--seed", default=0, help="Seed of the hold-out fold and of training.")
@ALLOW_OUTSIDE
@NO_PLOTS
@click.pass_context
@friendly
def generalisation(ctx, a_source, b_source, out_dir, model, a_format, b_format, a_split, b_split, alphas, holdout, finetuned,
                   epochs, batch_size, micro_batch, device, seed, allow_outside_root, no_plots):
    """B&P Table 5 and the WiSE-FT curve: fine-tune on A, zero-shot held-out A and all of B at every alpha."""
    from ..wise_ft import generalisation as run

    if holdout.lower() == "none":
        hold = None
    elif holdout.isdigit() and int(holdout) >= 2:
        hold = int(holdout)
    else:
        raise click.BadParameter(f"{holdout!r}: use an integer K >= 2 or 'none'", param_hint="--holdout")
    result = run(a_source, b_source, out_dir, model, alphas=parse_floats(alphas), holdout=hold, seed=seed, finetuned=finetuned,
                 a_format=a_format, b_format=b_format, a_options=source_options(a_format, a_split, None, allow_outside_root),
                 b_options=source_options(b_format, b_split, None, allow_outside_root), epochs=epochs, batch_size=batch_size,
                 micro_batch=micro_batch, device=device, progress=ctx.obj["progress"], plots=False if no_plots else None)
    click.echo(result["text"])
    click.echo(f"written to {out_dir}/generalisation.txt; {page(out_dir)}")

