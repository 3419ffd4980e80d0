"""The `clip-heads` command line: parses options and calls the library, nothing more."""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import sys

import click

from .catalog import DECODE_PATHS, DEFAULT_MODEL, ENCODE_PRECISIONS, FEATURES, PRECISIONS

logger = logging.getLogger("clip_heads")

# Everything the library raises for bad input or a bad file becomes one line; clip_heads.errors
# chooses its exit code (2 for a bad value, 1 for failed work).
_USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, KeyError, NotADirectoryError, PermissionError)


class _LibraryError(click.ClickException):
    """A library error as click prints it (``Error: ...``), with the exit code chosen for it."""

    def __init__(self, error: BaseException, message: str) -> None:
        from .errors import exit_code

        super().__init__(message)
        self.exit_code = exit_code(error)


def friendly(fn):
    """Turn library errors into one clear line and a non-zero exit, no traceback: bad values
    (exit 2), bad input or a damaged file, a full disk, a store another process is writing
    (exit 1), and Ctrl-C (exit 130)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .fsutil import LockedError, is_disk_full
        from .interrupts import INTERRUPTED

        if hasattr(signal, "SIGXFSZ"):
            # Past the file-size limit a write fails with EFBIG (a clean "disk full" line)
            # instead of the kernel killing the process.
            with contextlib.suppress(ValueError):
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except KeyboardInterrupt:
            click.echo(INTERRUPTED, err=True)
            # Not sys.exit: a Ctrl-C that landed inside C-level code (an extension running
            # Python source while torch imports, say) leaves CPython's "unhandled interrupt"
            # flag set, and the interpreter would then end itself by SIGINT instead of 130.
            # Everything of ours was closed by the finally blocks the interrupt went through.
            from .interrupts import running_as_cli

            if not running_as_cli():  # click's test runner, or a program calling main() itself
                sys.exit(130)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
        except LockedError as e:
            raise _LibraryError(e, str(e)) from None
        except _USER_ERRORS as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            raise _LibraryError(e, str(msg)) from None
        except OSError as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            if is_disk_full(e) and "disk full" not in msg:
                msg = f"disk full: {msg}; free space and rerun the same command"
            raise click.ClickException(msg if "disk full" in msg or e.errno is None else f"{type(e).__name__}: {msg}") from None

    return wrapper


class _FailedWork(click.ClickException):
    """Failed work found while parsing (a path that is not there): exit 1, as the library's own."""

    exit_code = 1


class Existing(click.Path):
    """A path that must exist. A missing or unreadable one is failed work (issue 9: exit 1, one
    line naming the argument), the same code the library's FileNotFoundError gets; click's own
    ``Path(exists=True)`` would make it a usage error (exit 2)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(exists=True, **kwargs)

    def convert(self, value, param, ctx):
        try:
            return super().convert(value, param, ctx)
        except click.BadParameter as e:
            name = param.opts[0] if isinstance(param, click.Option) else param.human_readable_name if param else "path"
            raise _FailedWork(f"{name}: {e.message}") from None


class Renamed(click.Option):
    """An option that still accepts its former spelling ``old`` (kept for users' scripts): hidden
    from --help, and a one-line deprecation warning when used."""

    def __init__(self, *args, old: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.old = old

    def add_to_parser(self, parser, ctx) -> None:
        super().add_to_parser(parser, ctx)
        parser.add_option(obj=self, opts=[self.old], dest=f"{self.name}__old",
                          action="append" if self.multiple else "store", nargs=self.nargs)

    def handle_parse_result(self, ctx, opts, args):
        old_dest = f"{self.name}__old"
        if old_dest in opts:
            opts = dict(opts)
            if self.name in opts:
                raise click.UsageError(f"give {self.opts[0]} only ({self.old} is its former name)", ctx=ctx)
            opts[self.name] = opts.pop(old_dest)
            click.echo(f"Warning: {self.old} is deprecated; use {self.opts[0]}", err=True)  # shown under -q too
        return super().handle_parse_result(ctx, opts, args)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="clip-heads")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars and no INFO lines; warnings and errors still shown.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.pass_context
def main(ctx: click.Context, quiet: bool, verbose: bool) -> None:
    """Encode a dataset once with a frozen vision-language model, then train and evaluate light heads in seconds."""
    # -q silences progress, never warnings: a user must still see "k is larger than a class".
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("clip_heads").setLevel(level)
    for noisy in ("transformers", "httpx", "httpx2", "huggingface_hub", "urllib3", "h5py"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.ERROR)
    _library_progress_bars(ctx, not quiet)
    ctx.obj = {"progress": not quiet}


def _library_progress_bars(ctx: click.Context, on: bool) -> None:
    """transformers' and huggingface_hub's own bars ("Loading weights", downloads) follow -q as ours do.

    Neither library is imported for this (``clip-heads -q info`` stays light): the environment
    variable both read at import is set for this command, and libraries already imported (a
    second command in one process) are switched directly.
    """
    import os

    if not on:
        key, before = "HF_HUB_DISABLE_PROGRESS_BARS", os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")
        os.environ[key] = "1"
        ctx.call_on_close(lambda: os.environ.__setitem__(key, before) if before is not None else os.environ.pop(key, None))
    elif os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS"):
        return  # the user turned them off
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

        (enable_progress_bars if on else disable_progress_bars)()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        (hf_logging.enable_progress_bar if on else hf_logging.disable_progress_bar)()


def _formats() -> list[str]:
    from .datasets import list_formats

    return list_formats()


# Options several commands share, with one meaning and one help text each.
_WORKERS = click.option(
    "--workers", "-w", default=None, type=click.IntRange(min=0),
    help="DataLoader worker processes decoding images. [default: on a GPU every usable core but two, 1 to 32; on a "
         "CPU none up to 4 cores, else one per 8 cores]")
_SPLIT = click.option(
    "--split", default=None,
    help="The source's split to read: CIFAR-100 test, train or all [default: test]; EmoSet all, train, val or test; "
         "hf one split of a DatasetDict.")
_LABEL_LEVEL = click.option("--label-level", default=None, help="CIFAR-100: fine or coarse; WEBEmo: 2, 7 or 25.")

_ALLOW_OUTSIDE = click.option(
    "--allow-outside-root", is_flag=True,
    help="Read files that resolve outside the source's folder (manifest paths with .. or absolute paths elsewhere, symlinks out of the root).")


@main.command()
@click.argument("source", type=click.Path())
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="Store file to write (.h5).")
@click.option("--model", "-m", default=DEFAULT_MODEL, help="Hugging Face id or local directory saved with save_pretrained, of any supported family (CLIP, SigLIP, SigLIP 2, MetaCLIP 2, AltCLIP, Chinese-CLIP).")
@click.option("--format", "fmt", default="auto", type=click.Choice(_formats()), help="Dataset format; auto detects the obvious ones.")
@click.option("--templates", "-t", multiple=True, help="Template set name or file (repeatable). Default: the dataset kind's sets.")
@click.option("--features", default="projected", metavar="LIST", callback=lambda ctx, param, value: _features(value),
              help=f"Image features to store: projected, or projected,pre-projection (also the image tower's pooled output before its projection, and the projection). Names: {', '.join(FEATURES)}.")
@click.option("--batch-size", "-b", default=64, type=click.IntRange(min=1), help="Images per forward pass.")
@_WORKERS
@click.option("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--precision", default="auto", type=click.Choice(ENCODE_PRECISIONS), help="auto = fp16 autocast on GPU; bf16 autocast on a CPU with bf16 units (AMX, AVX-512 BF16), else fp32. fp32 is exact.")
@click.option("--decode", default="auto", type=click.Choice(DECODE_PATHS), help="JPEG decoding: auto = DCT-domain reduced decode (simplejpeg, else PIL draft) within cosine 0.9999 of exact; exact = the full decode.")
@click.option("--dtype", default="float16", type=click.Choice(["float16", "float32"]), help="Stored image vector type.")
@click.option("--no-normalize", is_flag=True, help="Store raw projections instead of L2-normalised vectors.")
@click.option("--limit", default=None, type=click.IntRange(min=1), help="Encode a seeded sample of this many images.")
@click.option("--seed", default=0, help="Seed of the --limit sample.")
@_SPLIT
@_LABEL_LEVEL
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
@_ALLOW_OUTSIDE
@click.pass_context
@friendly
def encode(ctx, source, out, model, fmt, templates, features, batch_size, workers, device, precision, decode, dtype, no_normalize, limit, seed, split, label_level, source_opts, shard, devices, engine, address, num_gpus_per_worker, embed_workers, decode_cpus, overwrite, allow_outside_root):
    """Encode every image of SOURCE and its prompts with a frozen vision-language model into the store --out.

    An interrupted run resumes when rerun with the same arguments (with any engine); a complete
    store is left as is.
    """
    from .encode import encode as run

    options = _source_options(fmt, split, label_level, allow_outside_root, source_opts)
    r = run(source, out, model=model, format=fmt, templates=templates or None, batch_size=batch_size, workers=workers,
            device=device, precision=precision, decode=decode, dtype=dtype, normalize=not no_normalize,
            overwrite=overwrite, limit=limit, seed=seed, source_options=options, shard=_parse_shard(shard),
            progress=ctx.obj["progress"], features=features, devices=_parse_devices(devices, engine),
            engine=engine, ray_options=_ray_options(engine, address, num_gpus_per_worker, embed_workers, decode_cpus))
    click.echo(f"{r.status}: {r.path} ({r.n_images} images, {r.n_skipped} skipped"
               + (f"; {r.batches} batches encoded by this run" if r.status == "resumed" else "") + ")")


def _parse_devices(text: str | None, engine: str) -> list[str] | None:
    from .engines import parse_devices

    if text is not None and engine != "local":
        raise click.BadParameter(f"--devices places one worker per device of this machine; --engine {engine} places "
                                 "its own workers", param_hint="--devices")
    try:
        return parse_devices(text)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--devices") from None


def _ray_options(engine: str, address, num_gpus, embed_workers, decode_cpus) -> dict | None:
    given = {k: v for k, v in (("address", address), ("num_gpus_per_worker", num_gpus), ("embed_workers", embed_workers),
                               ("decode_cpus", decode_cpus)) if v is not None}
    if engine != "ray":
        if given:
            flag = "--" + next(iter(given)).replace("_", "-")
            raise click.BadParameter(f"{flag} is an option of --engine ray", param_hint=flag)
        return None
    return given


def _features(value: str) -> str:
    from .catalog import parse_features

    try:
        return ",".join(parse_features(value))
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--features") from None


def _source_options(fmt: str, split: str | None, label_level: str | None, allow_outside_root: bool = False,
                    pairs: tuple[str, ...] = ()) -> dict:
    """--split / --label-level (CIFAR-100 and WEBEmo), --allow-outside-root and -O KEY=VALUE as the source's options."""
    options: dict = {"allow_outside_root": True} if allow_outside_root else {}
    if split is not None:
        options["split"] = split
    if label_level is not None:
        options["level" if fmt == "webemo" else "label_level"] = int(label_level) if label_level.isdigit() else label_level
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise click.BadParameter(f"{pair!r}: use KEY=VALUE, e.g. agreement=5", param_hint="--source-option")
        if key in options or key == "allow_outside_root":
            raise click.BadParameter(f"{key!r} is given twice (or has its own flag)", param_hint="--source-option")
        options[key] = value.strip()
    return options


def _parse_shard(text: str | None) -> tuple[int, int] | str | None:
    if text is None:
        return None
    if text.strip().lower() == "auto":
        from .sharding import auto_shard

        try:
            auto_shard()  # the scheduler's variables are there, or this is a usage error
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--shard") from None
        return "auto"
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not I/N, e.g. 0/4", param_hint="--shard") from None
    return i, n


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
    from .sharding import find_shards
    from .store import open_store
    from .writer import merge_stores

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
@click.option("--format", "fmt", default="auto", type=click.Choice(_formats()), help="Dataset format; auto detects the obvious ones.")
@click.option("--top-k", default=0, type=click.IntRange(min=0), help="Also keep the top-k images per class, on the fly (OUT-stem.topK.json).")
@click.option("--batch-size", "-b", default=64, type=click.IntRange(min=1), help="Images per forward pass.")
@_WORKERS
@click.option("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--precision", default="auto", type=click.Choice(PRECISIONS), help="auto = fp16 autocast on GPU, fp32 on CPU.")
@click.option("--dtype", default="float16", type=click.Choice(["float16", "float32"]), help="Round vectors as the head's training store did.")
@click.option("--no-normalize", is_flag=True, help="The head was trained on raw (not L2-normalised) vectors.")
@_SPLIT
@_LABEL_LEVEL
@click.option("--source-option", "-O", "source_opts", multiple=True, metavar="KEY=VALUE", help="Any other option of the format (repeatable).")
@click.option("--devices", default=None, metavar="LIST", help="One worker per device of this machine: cuda:0,cuda:1,..., all, or cpu,cpu.")
@click.option("--engine", default="local", type=click.Choice(["local", "ray"]), help="local: this machine; ray: a Ray Data pipeline.")
@click.option("--address", default=None, help="--engine ray: the Ray cluster to join.")
@click.option("--num-gpus-per-worker", default=None, type=click.FloatRange(min=0), help="--engine ray: GPUs per embedding worker.")
@click.option("--embed-workers", default=None, type=click.IntRange(min=1), help="--engine ray: embedding workers.")
@click.option("--decode-cpus", default=None, type=click.IntRange(min=1), help="--engine ray: decoding workers.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@_ALLOW_OUTSIDE
@click.pass_context
@friendly
def predict(ctx, head_dir, source, out, model, fmt, top_k, batch_size, workers, device, precision, dtype, no_normalize, split,
            label_level, source_opts, devices, engine, address, num_gpus_per_worker, embed_workers, decode_cpus, overwrite,
            allow_outside_root):
    """Encode SOURCE and classify it with the saved head HEAD_DIR in one streaming pass: one parquet row per image.

    No store is written: rows (key, prediction, probability, p_<class>, skipped) are appended as
    the images come, so memory stays flat however many there are.
    """
    from .predict import predict as run

    r = run(head_dir, source, out, model=model, format=fmt, top_k=top_k, batch_size=batch_size, workers=workers,
            device=device, precision=precision, dtype=dtype, normalize=not no_normalize,
            source_options=_source_options(fmt, split, label_level, allow_outside_root, source_opts),
            devices=_parse_devices(devices, engine), engine=engine,
            ray_options=_ray_options(engine, address, num_gpus_per_worker, embed_workers, decode_cpus),
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
    from .prompts import add_prompts

    names = add_prompts(store, list(templates), classes=classes, synonyms=synonyms, name=name, device=device,
                        overwrite=overwrite, progress=ctx.obj["progress"])
    click.echo(f"added prompt sets {', '.join(names)} to {store}")


@main.command()
@click.argument("store", type=Existing(dir_okay=False))
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
    from .verify import verify_store

    rep = verify_store(store)
    click.echo(rep.text)
    if not rep.ok:
        sys.exit(1)


_NO_PLOTS = click.option(
    "--no-plots", is_flag=True,
    help="Skip the figures (PNG + SVG in plots/) for speed; index.html and every number are written as always.")


def _page(out_dir) -> str:
    from pathlib import Path

    return f"report page: {Path(out_dir) / 'index.html'}"


def _heads() -> list[str]:
    from .catalog import list_heads

    return [h for h in list_heads() if h != "zero-shot"]


def _params(pairs: tuple[str, ...]) -> dict:
    """``--param key=value`` pairs; values parsed as JSON when they are (numbers, true, lists)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not key=value", param_hint="--param")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _template_ids(text: str | None):
    # "0,3" -> template ids; anything else is passed on as given (a name or a template text).
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")]
    return [int(p) for p in parts] if all(p.isdigit() for p in parts) else text


@main.command("zero-shot")
@click.argument("store", type=Existing(dir_okay=False))
@click.option("--prompts", "prompt_set", default=None, help="Prompt set of the store. [default: the store's default set]")
@click.option("--template-ids", "template_ids", cls=Renamed, old="--templates", default=None,
              help="Template ids of the prompt set (see `clip-heads info`), e.g. 0 or 0,3. [default: the ensemble of all]")
@click.option("--label-map", default=None, help="Built-in label map name or JSON file mapping the store's classes.")
@click.option("--top-k", default=0, type=click.IntRange(min=0), help="Also write the top-k images per class (JSON, and a PNG grid when images are reachable).")
@click.option("--out", "-o", "out_dir", default=None, type=click.Path(file_okay=False), help="Results folder. [default: cache/zero-shot/<store>[-<prompts>][-t<template ids>][-<label map>]]")
@click.option("--overwrite", is_flag=True, help="Replace an --out folder that holds the results of another run.")
@_NO_PLOTS
@friendly
def zero_shot(store, prompt_set, template_ids, label_map, top_k, out_dir, overwrite, no_plots):
    """Zero-shot classification of STORE by cosine to its prompt embeddings."""
    from pathlib import Path

    from .evaluate import run_zero_shot
    from .results import default_out_dir

    out_dir = out_dir or str(default_out_dir("zero-shot", Path(store).stem, prompt_set,
                                             template_ids and f"t{template_ids}", label_map))
    rep = run_zero_shot(store, prompt_set=prompt_set, template_ids=_template_ids(template_ids), out_dir=out_dir,
                        label_map=label_map, top_k=top_k, overwrite=overwrite, plots=False if no_plots else None)
    click.echo(rep.text)
    click.echo(f"written to {out_dir}; {_page(out_dir)}")


@main.command("train-head")
@click.argument("head", type=click.Choice(_heads()))
@click.argument("store", type=Existing(dir_okay=False))
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(file_okay=False), help="Folder for the head (config.json + model.safetensors) and its reports.")
@click.option("--cv", default=None, type=click.IntRange(min=2), help="Stratified K-fold cross-validation before the final fit (the papers use 10).")
@click.option("--eval-store", default=None, type=Existing(dir_okay=False), help="Evaluate the final head on another store (cross-dataset).")
@click.option("--label-map", default=None, help="Built-in label map name or JSON file from --eval-store's classes to STORE's.")
@click.option("--prompts", "prompt_set", default=None, help="Prompt set for text-side heads (contrastive, tip-adapter). [default: the store's default set]")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE", help="Head parameter, e.g. --param hidden=256 --param dropout=0.2 (repeatable).")
@click.option("--seed", default=0, help="Seed of the folds and of training.")
@_NO_PLOTS
@click.pass_context
@friendly
def train_head_cmd(ctx, head, store, out_dir, cv, eval_store, label_map, prompt_set, params, seed, no_plots):
    """Train HEAD on the cached vectors of STORE and save it to --out."""
    from .evaluate import train_head

    rep = train_head(head, store, out_dir, cv=cv, seed=seed, eval_store=eval_store, label_map=label_map,
                     head_params=_params(params), prompt_set=prompt_set, progress=ctx.obj["progress"],
                     plots=False if no_plots else None)
    click.echo(rep.text)
    click.echo(f"head and reports written to {out_dir}; {_page(out_dir)}")


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
@friendly
def few_shot(store, out_dir, heads, shots, seeds, prompt_set, params, protocol, test_fraction, overwrite):
    """Few-shot grid on STORE: K images per class from the training split, every head on the same samples, scored on the test split."""
    from .fewshot import run_few_shot

    per_head: dict = {}
    for key, value in _params(params).items():
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
                       overwrite=overwrite, protocol=protocol)
    click.echo(rep.text)
    click.echo(f"written to {out_dir}")


@main.command()
@click.argument("head_dir", type=Existing(file_okay=False))
@click.argument("store", type=Existing(dir_okay=False))
@click.option("--label-map", default=None, help="Built-in label map name or JSON file from STORE's classes to the head's.")
@click.option("--prompts", "prompt_set", default=None, help="Prompt set of STORE for text-side heads queried with its classes.")
@click.option("--out", "-o", "out_dir", default=None, type=click.Path(file_okay=False), help="Results folder. [default: cache/evaluate/<head>-on-<store>[-<label map>][-<prompts>]]")
@click.option("--overwrite", is_flag=True, help="Replace an --out folder that holds the results of another run.")
@_NO_PLOTS
@friendly
def evaluate(head_dir, store, label_map, prompt_set, out_dir, overwrite, no_plots):
    """Evaluate a saved head (HEAD_DIR) on STORE."""
    from pathlib import Path

    from .evaluate import evaluate_head
    from .results import default_out_dir

    out_dir = out_dir or str(default_out_dir("evaluate", f"{Path(head_dir).resolve().name}-on-{Path(store).stem}",
                                             label_map, prompt_set))
    rep = evaluate_head(head_dir, store, out_dir=out_dir, label_map=label_map, prompt_set=prompt_set, overwrite=overwrite,
                        plots=False if no_plots else None)
    click.echo(rep.text)
    click.echo(f"written to {out_dir}; {_page(out_dir)}")


@main.command("ablate-prompts")
@click.argument("store", type=Existing(dir_okay=False))
@click.option("--prompts", "prompt_sets", multiple=True, help="Prompt sets to ablate (repeatable). [default: all in the store]")
@click.option("--out", "-o", "out_dir", default=None, type=click.Path(file_okay=False), help="Results folder. [default: cache/ablate-prompts/<store>[-<prompt sets>]]")
@click.option("--overwrite", is_flag=True, help="Replace an --out folder that holds the results of another run.")
@_NO_PLOTS
@friendly
def ablate_prompts_cmd(store, prompt_sets, out_dir, overwrite, no_plots):
    """Rank every template (alone) and every prompt set (ensemble) of STORE by zero-shot accuracy."""
    from pathlib import Path

    from .ablation import ablate_prompts
    from .results import default_out_dir

    out_dir = out_dir or str(default_out_dir("ablate-prompts", Path(store).stem, *prompt_sets))
    rep = ablate_prompts(store, prompt_sets=list(prompt_sets) or None, out_dir=out_dir, overwrite=overwrite,
                         plots=False if no_plots else None)
    click.echo(rep.text)
    click.echo(f"written to {out_dir}; {_page(out_dir)}")


@main.command()
@click.argument("run_dirs", nargs=-1, required=True, type=Existing(file_okay=False))
@click.option("--by", default="head,model,prompt_set,store", help="Attributes that make a row (any of head, model, prompt_set, store); the protocol always does.")
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(file_okay=False), help="Folder for comparison.csv, comparison.md and comparison.png.")
@click.option("--allow-mixed-data", is_flag=True, help="Merge runs on different data (store fingerprints) into one row; the row says so.")
@click.option("--overwrite", is_flag=True, help="Replace an --out folder that holds another comparison or other results.")
@_NO_PLOTS
@friendly
def compare(run_dirs, by, out_dir, allow_mixed_data, overwrite, no_plots):
    """One table across the results folders RUN_DIRS (train-head, zero-shot, evaluate, ablate-prompts, finetune --cv, generalisation)."""
    from .compare import compare_runs, parse_by

    try:
        fields = parse_by(by)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--by") from None
    comp = compare_runs(run_dirs, by=fields, out_dir=out_dir, allow_mixed_data=allow_mixed_data, overwrite=overwrite,
                        plots=False if no_plots else None)
    click.echo(comp.to_markdown())
    click.echo(f"written to {out_dir}; {_page(out_dir)}")


@main.command()
@click.option("--source", default=None, type=Existing(), help="Local cifar-100-python tarball or extracted folder, or an image-folder copy (skips the download).")
@click.option("--model", "-m", default=DEFAULT_MODEL, help="Hugging Face CLIP id or local directory.")
@click.option("--limit", default=1000, type=click.IntRange(min=1), help="Seeded sample of test images to encode.")
@click.option("--cv", default=10, type=click.IntRange(min=2), help="Folds of the heads' cross-validation.")
@click.option("--seed", default=0, help="Seed of the sample, the folds and training.")
@click.option("--out", "-o", "out_dir", default="cache/demo", type=click.Path(file_okay=False), help="Folder for the store and every report.")
@click.option("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--batch-size", "-b", default=64, type=click.IntRange(min=1), help="Images per forward pass.")
@_WORKERS
@click.option("--url", default=None, hidden=True, help="Download URL of the tarball (tests).")
@click.option("--md5", default=None, hidden=True, help="Expected MD5 of the tarball (tests).")
@_NO_PLOTS
@click.pass_context
@friendly
def demo(ctx, source, model, limit, cv, seed, out_dir, device, batch_size, workers, url, md5, no_plots):
    """The whole tool on real data: CIFAR-100 (downloaded, MD5-checked), encode, zero-shot, prompt ablation, 10-fold CV of heads."""
    from .demo import CIFAR100_MD5, CIFAR100_URL, run_demo

    summary = run_demo(out_dir, source=source, model=model, limit=limit, cv=cv, seed=seed, device=device, batch_size=batch_size,
                       workers=workers, url=url or CIFAR100_URL, md5=md5 or CIFAR100_MD5, progress=ctx.obj["progress"],
                       plots=False if no_plots else None)
    click.echo(summary["headline"])
    click.echo(f"full tables (the papers' layout) in {out_dir}/report.txt; {_page(out_dir)}")


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers, e.g. 0,0.5,1") from None


@main.command()
@click.argument("source", type=click.Path())
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(file_okay=False), help="Model directory to write (loadable by `encode --model`).")
@click.option("--model", "-m", default=DEFAULT_MODEL, help="CLIP to start from: hub id or local directory.")
@click.option("--format", "fmt", default="auto", type=click.Choice(_formats()), help="Dataset format.")
@_SPLIT
@_LABEL_LEVEL
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
@_WORKERS
@click.option("--seed", default=0, help="Seed of training and of the folds (the heads' folds for the same seed).")
@click.option("--overwrite", is_flag=True, help="Start over instead of resuming a run in --out (with --cv: discard the scored folds).")
@_ALLOW_OUTSIDE
@click.pass_context
@friendly
def finetune(ctx, source, out_dir, model, fmt, split, label_level, templates, cv, epochs, batch_size, micro_batch, lr,
             weight_decay, warmup, precision, device, gradient_checkpointing, workers, seed, overwrite, allow_outside_root):
    """Fine-tune both CLIP towers on SOURCE paired with class captions (the papers' Emotion-CLIP recipe).

    An interrupted run resumes from its last checkpoint when rerun with the same arguments.
    """
    from .finetune import finetune as run
    from .finetune_cv import cross_validate_finetune

    opts = dict(format=fmt, source_options=_source_options(fmt, split, label_level, allow_outside_root), templates=templates, epochs=epochs,
                batch_size=batch_size, micro_batch=micro_batch, lr=lr, weight_decay=weight_decay, warmup=warmup,
                precision=precision, device=device, gradient_checkpointing=gradient_checkpointing, workers=workers,
                progress=ctx.obj["progress"])
    if cv:
        rep = cross_validate_finetune(source, out_dir, model, cv=cv, seed=seed, overwrite=overwrite, **opts)
        click.echo(rep.text)
        click.echo(f"{cv}-fold results written to {out_dir}")
        return
    r = run(source, out_dir, model, seed=seed, overwrite=overwrite, **opts)
    click.echo(f"{r.status}: {r.out_dir} ({r.n_train} images, {r.steps} steps, {len(r.skipped)} skipped); "
               f"encode with `clip-heads encode SOURCE --model {r.out_dir}`")


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
    from .wise_ft import interpolate, interpolate_sweep

    values = _floats(alphas)
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
@click.option("--a-format", default="auto", type=click.Choice(_formats()), help="Format of A (fine-tuned on).")
@click.option("--b-format", default="auto", type=click.Choice(_formats()), help="Format of B (zero-shot only).")
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
@_ALLOW_OUTSIDE
@_NO_PLOTS
@click.pass_context
@friendly
def generalisation(ctx, a_source, b_source, out_dir, model, a_format, b_format, a_split, b_split, alphas, holdout, finetuned,
                   epochs, batch_size, micro_batch, device, seed, allow_outside_root, no_plots):
    """B&P Table 5 and the WiSE-FT curve: fine-tune on A, zero-shot held-out A and all of B at every alpha."""
    from .wise_ft import generalisation as run

    if holdout.lower() == "none":
        hold = None
    elif holdout.isdigit() and int(holdout) >= 2:
        hold = int(holdout)
    else:
        raise click.BadParameter(f"{holdout!r}: use an integer K >= 2 or 'none'", param_hint="--holdout")
    result = run(a_source, b_source, out_dir, model, alphas=_floats(alphas), holdout=hold, seed=seed, finetuned=finetuned,
                 a_format=a_format, b_format=b_format, a_options=_source_options(a_format, a_split, None, allow_outside_root),
                 b_options=_source_options(b_format, b_split, None, allow_outside_root), epochs=epochs, batch_size=batch_size,
                 micro_batch=micro_batch, device=device, progress=ctx.obj["progress"], plots=False if no_plots else None)
    click.echo(result["text"])
    click.echo(f"written to {out_dir}/generalisation.txt; {_page(out_dir)}")


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
@_WORKERS
@_NO_PLOTS
@click.pass_context
@friendly
def reproduce(ctx, fi, cifar, out_dir, model, cv, seed, heads, no_finetune, cifar_split, alphas, device, batch_size, ft_batch_size, micro_batch, workers, no_plots):
    """Bondielli & Passaro's Tables 1-5 (ours beside the paper's) and the frozen-CLIP heads, in one run."""
    from .heads import list_heads
    from .reproduce import reproduce as run

    names = [h.strip() for h in heads.split(",") if h.strip()]
    unknown = [h for h in names if h not in list_heads()]
    if unknown:
        raise click.BadParameter(f"unknown heads {unknown}; valid: {', '.join(list_heads())}", param_hint="--heads")
    result = run(fi, cifar, out_dir, model=model, cv=cv, seed=seed, heads=names, finetune=not no_finetune, alphas=_floats(alphas),
                 cifar_split=cifar_split, device=device, batch_size=batch_size, workers=workers,
                 finetune_options={"batch_size": ft_batch_size, "micro_batch": micro_batch}, progress=ctx.obj["progress"],
                 plots=False if no_plots else None)
    click.echo(result["text"])
    click.echo(f"written to {out_dir}/tables.md; {_page(out_dir)}")


if __name__ == "__main__":  # pragma: no cover
    main()
