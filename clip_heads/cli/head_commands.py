"""Commands that evaluate heads on stores: zero-shot, train-head, few-shot, evaluate, ablate-prompts,
compare."""
from __future__ import annotations

import click

from .app import friendly, main
from .options import Existing, NO_PLOTS, Renamed, page, parse_params, parse_template_ids, trainable_heads


@main.command("zero-shot")
@click.argument("store", type=Existing(dir_okay=False))
@click.option("--prompts", "prompt_set", default=None, help="Prompt set of the store. [default: the store's default set]")
@click.option("--template-ids", "template_ids", cls=Renamed, old="--templates", default=None,
              help="Template ids of the prompt set (see `clip-heads info`), e.g. 0 or 0,3. [default: the ensemble of all]")
@click.option("--label-map", default=None, help="Built-in label map name or JSON file mapping the store's classes.")
@click.option("--top-k", default=0, type=click.IntRange(min=0), help="Also write the top-k images per class (JSON, and a PNG grid when images are reachable).")
@click.option("--out", "-o", "out_dir", default=None, type=click.Path(file_okay=False), help="Results folder. [default: cache/zero-shot/<store>[-<prompts>][-t<template ids>][-<label map>]]")
@click.option("--overwrite", is_flag=True, help="Replace an --out folder that holds the results of another run.")
@NO_PLOTS
@friendly
def zero_shot(store, prompt_set, template_ids, label_map, top_k, out_dir, overwrite, no_plots):
    """Zero-shot classification of STORE by cosine to its prompt embeddings."""
    from pathlib import Path

    from ..evaluate import run_zero_shot
    from ..results import default_out_dir

    out_dir = out_dir or str(default_out_dir("zero-shot", Path(store).stem, prompt_set,
                                             template_ids and f"t{template_ids}", label_map))
    rep = run_zero_shot(store, prompt_set=prompt_set, template_ids=parse_template_ids(template_ids), out_dir=out_dir,
                        label_map=label_map, top_k=top_k, overwrite=overwrite, plots=False if no_plots else None)
    click.echo(rep.text)
    click.echo(f"written to {out_dir}; {page(out_dir)}")


@main.command("train-head")
@click.argument("head", type=click.Choice(trainable_heads()))
@click.argument("store", type=Existing(dir_okay=False))
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(file_okay=False), help="Folder for the head (config.json + model.safetensors) and its reports.")
@click.option("--cv", default=None, type=click.IntRange(min=2), help="Stratified K-fold cross-validation before the final fit (the papers use 10).")
@click.option("--eval-store", default=None, type=Existing(dir_okay=False), help="Evaluate the final head on another store (cross-dataset).")
@click.option("--label-map", default=None, help="Built-in label map name or JSON file from --eval-store's classes to STORE's.")
@click.option("--prompts", "prompt_set", default=None, help="Prompt set for text-side heads (contrastive, tip-adapter). [default: the store's default set]")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE", help="Head parameter, e.g. --param hidden=256 --param dropout=0.2 (repeatable).")
@click.option("--seed", default=0, help="Seed of the folds and of training.")
@NO_PLOTS
@click.pass_context
@friendly
def train_head_cmd(ctx, head, store, out_dir, cv, eval_store, label_map, prompt_set, params, seed, no_plots):
    """Train HEAD on the cached vectors of STORE and save it to --out."""
    from ..evaluate import train_head

    rep = train_head(head, store, out_dir, cv=cv, seed=seed, eval_store=eval_store, label_map=label_map,
                     head_params=parse_params(params), prompt_set=prompt_set, progress=ctx.obj["progress"],
                     plots=False if no_plots else None)
    click.echo(rep.text)
    click.echo(f"head and reports written to {out_dir}; {page(out_dir)}")


@main.command("few-shot")
@click.argument("store", type=Existing(dir_okay=False))
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(file_okay=False), help="Results folder (few_shot.csv, the mean ± std table, few_shot.png, the samples and the split).")
@click.option("--heads", default="zs-lp,clap,lpp,gda,tip-adapter,linear", show_default=True, help="Comma-separated registered heads.")
@click.option("--shots", default="1,2,4,8,16", show_default=True, help="Comma-separated images per class; 'all' for the whole training split.")
@click.option("--seeds", default="1,2,3", show_default=True, help="Comma-separated seeds: one sample of the shots per seed.")
@click.option("--prompts", "prompt_set", default=None, help="Prompt set for the heads that use prompts. [default: the store's default set]")
@click.option("--param", "params", multiple=True, metavar="HEAD.KEY=VALUE", help="A head's parameter, e.g. --param gda.cv=3 (repeatable).")
@click.option("--protocol", default="auto", show_default=True, type=click.Choice(["auto", "split-column", "stratified", "fi"]), help="Which rows train and test: the store's split column if it has one (auto), only that, a seeded stratified split, or FI's seeded 80/5/15.")
@click.option("--test-fraction", default=0.3, show_default=True, type=float, help="Test share of the seeded stratified split.")
@click.option("--overwrite", is_flag=True, help="Replace an --out folder that holds the results of another run.")
@NO_PLOTS
@friendly
def few_shot(store, out_dir, heads, shots, seeds, prompt_set, params, protocol, test_fraction, overwrite, no_plots):
    """Few-shot grid on STORE: K images per class from the training split, every head on the same samples, scored on the test split."""
    from ..fewshot import run_few_shot

    per_head: dict = {}
    for key, value in parse_params(params).items():
        head, dot, name = key.partition(".")
        if not dot or not head or not name:
            raise click.BadParameter(f"{key!r} is not HEAD.KEY", param_hint="--param")
        per_head.setdefault(head, {})[name] = value
    try:
        seed_list = [int(s) for s in seeds.split(",")]
    except ValueError:
        raise click.BadParameter(f"{seeds!r} is not a comma-separated list of integers", param_hint="--seeds") from None
    rep = run_few_shot(store, out_dir, heads=[h.strip() for h in heads.split(",") if h.strip()], shots=shots,
                       seeds=seed_list, params=per_head, prompt_set=prompt_set, test_fraction=test_fraction,
                       overwrite=overwrite, protocol=protocol, plots=False if no_plots else None)
    click.echo(rep.text)
    click.echo(f"written to {out_dir}")


@main.command()
@click.argument("head_dir", type=Existing(file_okay=False))
@click.argument("store", type=Existing(dir_okay=False))
@click.option("--label-map", default=None, help="Built-in label map name or JSON file from STORE's classes to the head's.")
@click.option("--prompts", "prompt_set", default=None, help="Prompt set of STORE for text-side heads queried with its classes.")
@click.option("--out", "-o", "out_dir", default=None, type=click.Path(file_okay=False), help="Results folder. [default: cache/evaluate/<head>-on-<store>[-<label map>][-<prompts>]]")
@click.option("--overwrite", is_flag=True, help="Replace an --out folder that holds the results of another run.")
@NO_PLOTS
@friendly
def evaluate(head_dir, store, label_map, prompt_set, out_dir, overwrite, no_plots):
    """Evaluate a saved head (HEAD_DIR) on STORE."""
    from pathlib import Path

    from ..evaluate import evaluate_head
    from ..results import default_out_dir

    out_dir = out_dir or str(default_out_dir("evaluate", f"{Path(head_dir).resolve().name}-on-{Path(store).stem}",
                                             label_map, prompt_set))
    rep = evaluate_head(head_dir, store, out_dir=out_dir, label_map=label_map, prompt_set=prompt_set, overwrite=overwrite,
                        plots=False if no_plots else None)
    click.echo(rep.text)
    click.echo(f"written to {out_dir}; {page(out_dir)}")


@main.command("ablate-prompts")
@click.argument("store", type=Existing(dir_okay=False))
@click.option("--prompts", "prompt_sets", multiple=True, help="Prompt sets to ablate (repeatable). [default: all in the store]")
@click.option("--out", "-o", "out_dir", default=None, type=click.Path(file_okay=False), help="Results folder. [default: cache/ablate-prompts/<store>[-<prompt sets>]]")
@click.option("--overwrite", is_flag=True, help="Replace an --out folder that holds the results of another run.")
@NO_PLOTS
@friendly
def ablate_prompts_cmd(store, prompt_sets, out_dir, overwrite, no_plots):
    """Rank every template (alone) and every prompt set (ensemble) of STORE by zero-shot accuracy."""
    from pathlib import Path

    from ..ablation import ablate_prompts
    from ..results import default_out_dir

    out_dir = out_dir or str(default_out_dir("ablate-prompts", Path(store).stem, *prompt_sets))
    rep = ablate_prompts(store, prompt_sets=list(prompt_sets) or None, out_dir=out_dir, overwrite=overwrite,
                         plots=False if no_plots else None)
    click.echo(rep.text)
    click.echo(f"written to {out_dir}; {page(out_dir)}")


@main.command()
@click.argument("run_dirs", nargs=-1, required=True, type=Existing(file_okay=False))
@click.option("--by", default="head,model,prompt_set,store", help="Attributes that make a row (any of head, model, prompt_set, store); the protocol always does.")
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(file_okay=False), help="Folder for comparison.csv, comparison.md and comparison.png.")
@click.option("--allow-mixed-data", is_flag=True, help="Merge runs on different data (store fingerprints) into one row; the row says so.")
@click.option("--overwrite", is_flag=True, help="Replace an --out folder that holds another comparison or other results.")
@NO_PLOTS
@friendly
def compare(run_dirs, by, out_dir, allow_mixed_data, overwrite, no_plots):
    """One table across the results folders RUN_DIRS (train-head, zero-shot, evaluate, few-shot, ablate-prompts, finetune --cv, generalisation)."""
    from ..compare import compare_runs, parse_by

    try:
        fields = parse_by(by)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--by") from None
    comp = compare_runs(run_dirs, by=fields, out_dir=out_dir, allow_mixed_data=allow_mixed_data, overwrite=overwrite,
                        plots=False if no_plots else None)
    click.echo(comp.to_markdown())
    click.echo(f"written to {out_dir}; {page(out_dir)}")

