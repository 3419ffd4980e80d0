"""The `clip-heads` command line: parses options and calls the library, nothing more."""
from __future__ import annotations

import functools
import json
import logging
import sys

import click

from .backbone import DEFAULT_MODEL, PRECISIONS

logger = logging.getLogger("clip_heads")

# Everything the library raises for bad input or a bad file becomes one line and exit 1.
_USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, KeyError, NotADirectoryError, PermissionError)


def friendly(fn):
    """Turn library errors into one clear line and a non-zero exit, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except KeyboardInterrupt:
            click.echo("interrupted: rerun the same command to resume where it stopped", err=True)
            sys.exit(130)
        except _USER_ERRORS as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            raise click.ClickException(str(msg)) from None
        except OSError as e:
            raise click.ClickException(f"{type(e).__name__}: {e}") from None

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="clip-heads")
@click.option("-q", "--quiet", is_flag=True, help="Only errors; no progress bars.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.pass_context
def main(ctx: click.Context, quiet: bool, verbose: bool) -> None:
    """Encode a dataset once with a frozen CLIP, then train and evaluate light heads in seconds."""
    level = logging.ERROR if quiet else logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("transformers", "httpx", "huggingface_hub", "urllib3", "h5py"):
        logging.getLogger(noisy).setLevel(max(level, logging.ERROR))
    ctx.obj = {"progress": not quiet}


def _formats() -> list[str]:
    from .datasets import list_formats

    return list_formats()


@main.command()
@click.argument("source", type=click.Path())
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="Store file to write (.h5).")
@click.option("--model", "-m", default=DEFAULT_MODEL, help="Hugging Face CLIP id or local directory saved with save_pretrained.")
@click.option("--format", "fmt", default="auto", type=click.Choice(_formats()), help="Dataset format; auto detects the obvious ones.")
@click.option("--templates", "-t", multiple=True, help="Template set name or file (repeatable). Default: the dataset kind's sets.")
@click.option("--batch-size", "-b", default=64, type=click.IntRange(min=1), help="Images per forward pass.")
@click.option("--workers", "-w", default=None, type=click.IntRange(min=0), help="DataLoader worker processes decoding images. [default: half the cores]")
@click.option("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--precision", default="auto", type=click.Choice(PRECISIONS), help="auto = fp16 autocast on GPU, fp32 on CPU.")
@click.option("--dtype", default="float16", type=click.Choice(["float16", "float32"]), help="Stored image vector type.")
@click.option("--no-normalize", is_flag=True, help="Store raw projections instead of L2-normalised vectors.")
@click.option("--limit", default=None, type=click.IntRange(min=1), help="Encode a seeded sample of this many images.")
@click.option("--seed", default=0, help="Seed of the --limit sample.")
@click.option("--split", default=None, help="CIFAR-100: test, train or all. [default: test]")
@click.option("--label-level", default=None, help="CIFAR-100: fine or coarse; WEBEmo: 2, 7 or 25.")
@click.option("--shard", default=None, metavar="I/N", help="Encode only slice I of N (one process per GPU or machine); join with `clip-heads merge`.")
@click.option("--overwrite", is_flag=True, help="Start over, discarding an existing or unfinished store at --out.")
@click.pass_context
@friendly
def encode(ctx, source, out, model, fmt, templates, batch_size, workers, device, precision, dtype, no_normalize, limit, seed, split, label_level, shard, overwrite):
    """Encode every image of SOURCE and its prompts with a frozen CLIP into the store --out.

    An interrupted run resumes when rerun with the same arguments; a complete store is left as is.
    """
    from .encode import encode as run

    options = {}
    if split is not None:
        options["split"] = split
    if label_level is not None:
        options["level" if fmt == "webemo" else "label_level"] = int(label_level) if label_level.isdigit() else label_level
    r = run(source, out, model=model, format=fmt, templates=templates or None, batch_size=batch_size, workers=workers,
            device=device, precision=precision, dtype=dtype, normalize=not no_normalize, overwrite=overwrite,
            limit=limit, seed=seed, source_options=options, shard=_parse_shard(shard), progress=ctx.obj["progress"])
    click.echo(f"{r.status}: {r.path} ({r.n_images} images, {r.n_skipped} skipped)")


def _parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not I/N, e.g. 0/4", param_hint="--shard") from None
    return i, n


@main.command()
@click.argument("out", type=click.Path(dir_okay=False))
@click.argument("shards", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@friendly
def merge(out, shards, overwrite):
    """Join the shard stores of one `encode --shard I/N` run into the store OUT, in source order."""
    from .store import merge_stores, open_store

    merge_stores(out, shards, overwrite=overwrite)
    with open_store(out) as s:
        click.echo(f"merged {len(shards)} shards into {out} ({len(s)} images)")


@main.command()
@click.argument("store", type=click.Path(exists=True, dir_okay=False))
@click.option("--templates", "-t", multiple=True, required=True, help="Template set name or file (repeatable).")
@click.option("--classes", default=None, help="Label set to write prompts for: a built-in name (fi, emotion6, ...), a file, or a comma list. [default: the store's classes]")
@click.option("--synonyms", default=None, type=click.Path(exists=True, dir_okay=False), help="JSON {class: [phrases]} expanding each class.")
@click.option("--name", default=None, help="Name of the prompt set (one --templates only). [default: the template set's name]")
@click.option("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--overwrite", is_flag=True, help="Replace prompt sets of the same name.")
@friendly
def prompts(store, templates, classes, synonyms, name, device, overwrite):
    """Add prompt sets to STORE, encoded by the store's own model (images are not touched)."""
    from .prompts import add_prompts

    names = add_prompts(store, list(templates), classes=classes, synonyms=synonyms, name=name, device=device, overwrite=overwrite)
    click.echo(f"added prompt sets {', '.join(names)} to {store}")


@main.command()
@click.argument("store", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@friendly
def info(store, as_json):
    """Print what is inside STORE: model, dim, counts per class, prompt sets, skipped images."""
    from .store import open_store

    with open_store(store, allow_incomplete=True) as s:
        d = s.summary()
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    click.echo(f"store      {d['path']}  (schema {d['schema_version']}, {'complete' if d['complete'] else 'INCOMPLETE'})")
    click.echo(f"model      {d['model_id']}  {d['model_hash']}")
    click.echo(f"vectors    {d['n_images']} x {d['dim']} {d['dtype']}, {'L2-normalised' if d['normalized'] else 'raw'}")
    src = d.get("source") or {}
    click.echo(f"source     {src.get('format', '?')} at {src.get('root', '?')}  (fingerprint {str(d['source_fingerprint'])[:12]})")
    click.echo(f"classes    {len(d['classes'])}")
    width = max((len(c) for c in d["classes"]), default=0)
    for c, n in d["classes"].items():
        click.echo(f"  {c:<{width}}  {n}")
    if d["extras"]:
        click.echo(f"extras     {', '.join(d['extras'])}")
    click.echo(f"prompts    {len(d['prompt_sets'])} sets")
    for n, p in d["prompt_sets"].items():
        click.echo(f"  {n}: {p['templates']} templates x {p['classes']} classes = {p['prompts']} prompts")
    click.echo(f"skipped    {d['n_skipped']}")
    for key, reason in d["skipped"]:
        click.echo(f"  {key}: {reason}")
    click.echo(f"versions   {', '.join(f'{k} {v}' for k, v in (d['versions'] or {}).items())}")
    click.echo(f"created    {d['created']}  completed {d['completed']}")


if __name__ == "__main__":  # pragma: no cover
    main()
