"""What several commands share: path and option types, option decorators with one meaning and
one help text each, and the parsing of option values into the library's arguments."""
from __future__ import annotations

import json

import click

from ..errors import FAILURE_EXIT

__all__ = ["ALLOW_OUTSIDE", "Existing", "LABEL_LEVEL", "NO_PLOTS", "Renamed", "SPLIT", "WORKERS",
           "features_option", "formats", "page", "parse_devices_option", "parse_floats",
           "parse_params", "parse_shard", "parse_template_ids", "ray_options", "source_options",
           "trainable_heads"]


class _FailedWork(click.ClickException):
    """Failed work found while parsing (a path that is not there): exit 1, as the library's own."""

    exit_code = FAILURE_EXIT


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


def formats() -> list[str]:
    from ..datasets import list_formats

    return list_formats()


# Options several commands share, with one meaning and one help text each.
WORKERS = click.option(
    "--workers", "-w", default=None, type=click.IntRange(min=0),
    help="DataLoader worker processes decoding images. [default: on a GPU every usable core but two, 1 to 32; on a "
         "CPU none up to 4 cores, else one per 8 cores]")


SPLIT = click.option(
    "--split", default=None,
    help="The source's split to read: CIFAR-100 test, train or all [default: test]; EmoSet all, train, val or test; "
         "hf one split of a DatasetDict.")


LABEL_LEVEL = click.option("--label-level", default=None, help="CIFAR-100: fine or coarse; WEBEmo: 2, 7 or 25.")


ALLOW_OUTSIDE = click.option(
    "--allow-outside-root", is_flag=True,
    help="Read files that resolve outside the source's folder (manifest paths with .. or absolute paths elsewhere, symlinks out of the root).")


def parse_devices_option(text: str | None, engine: str) -> list[str] | None:
    from ..engines import parse_devices

    if text is not None and engine != "local":
        raise click.BadParameter(f"--devices places one worker per device of this machine; --engine {engine} places "
                                 "its own workers", param_hint="--devices")
    try:
        return parse_devices(text)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--devices") from None


def ray_options(engine: str, address, num_gpus, embed_workers, decode_cpus) -> dict | None:
    given = {k: v for k, v in (("address", address), ("num_gpus_per_worker", num_gpus), ("embed_workers", embed_workers),
                               ("decode_cpus", decode_cpus)) if v is not None}
    if engine != "ray":
        if given:
            flag = "--" + next(iter(given)).replace("_", "-")
            raise click.BadParameter(f"{flag} is an option of --engine ray", param_hint=flag)
        return None
    return given


def features_option(value: str) -> str:
    from ..catalog import parse_features

    try:
        return ",".join(parse_features(value))
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--features") from None


def source_options(fmt: str, split: str | None, label_level: str | None, allow_outside_root: bool = False,
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


def parse_shard(text: str | None) -> tuple[int, int] | str | None:
    if text is None:
        return None
    if text.strip().lower() == "auto":
        from ..sharding import auto_shard

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


NO_PLOTS = click.option(
    "--no-plots", is_flag=True,
    help="Skip the figures (PNG + SVG in plots/) for speed; index.html and every number are written as always.")


def page(out_dir) -> str:
    from pathlib import Path

    return f"report page: {Path(out_dir) / 'index.html'}"


def trainable_heads() -> list[str]:
    from ..catalog import list_heads

    return [h for h in list_heads() if h != "zero-shot"]


def parse_params(pairs: tuple[str, ...]) -> dict:
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


def parse_template_ids(text: str | None):
    # "0,3" -> template ids; anything else is passed on as given (a name or a template text).
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")]
    return [int(p) for p in parts] if all(p.isdigit() for p in parts) else text


def parse_floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers, e.g. 0,0.5,1") from None

