"""One pass of a frozen vision-language model (any family of :mod:`clip_heads.backbones`) over a dataset's images and its prompts, into a feature store.

Images are decoded and preprocessed in DataLoader worker processes a whole batch at a time
(order preserved), embedded under ``inference_mode`` and appended to the store as they come,
so memory stays constant in the number of images. Every batch is committed to the encode's
journal (:mod:`clip_heads.journal`) whole and synced before the cursor moves, in a writer thread
(:mod:`clip_heads.overlap`) while the next batch's forward runs; rerunning the same
command after any interruption - Ctrl-C, SIGKILL, a full disk - continues from the cursor, in
batches aligned as before, and ends with the same store an uninterrupted run writes. One
process writes a store at a time (its lock), and an existing store is replaced only once the
new one is complete.

Where the images are embedded is the engine's business (:mod:`clip_heads.engines`): this
process (the default), one worker per device (``devices=["cuda:0", "cuda:1"]``), or a Ray
cluster (``engine="ray"``, :mod:`clip_heads.ray_engine`). All of them cut the run into the same
blocks and hand them back in order to this one writer, so the store is the same whichever ran.
``shard="auto"`` takes the shard from a Slurm array or torchrun (:mod:`clip_heads.sharding`).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .backbones.model import Backbone
from .backbones.precision import PRECISION_NAMES, resolve_precision, same_precision
from .backbones.preprocess import Preprocess
from .catalog import DEFAULT_MODEL, parse_features
from .identity import check_identity, model_identity
from .datasets import open_source
from .engines import ENGINES, BlockResult, EmbedJob, default_workers, parse_devices, plan_blocks, worker_model  # noqa: F401
from .errors import BadValueError
from .fsutil import exclusive_lock
from .loading import resolve_decode
from .overlap import CommitThread
from .prompts import default_template_sets, encode_prompt_set, load_templates
from .store import (FEATURE_COLUMNS, PRE_EMBEDS, PRE_VIEWS, VIEWS, FeatureStore, StoreError, extras_spec, library_versions,
                    l2_normalize, validate_prompt_set_name)
from .journal import StoreWriter
from .runner import Runner

logger = logging.getLogger(__name__)

# Attributes that must agree between a partial or complete store and the run asked for, besides
# the model's identity (model_id, model_revision, model_hash), which backbone.check_identity compares.
_IDENTITY = ("source_fingerprint", "normalized", "dtype", "shard_index", "shard_count", "features")
_MODEL_IDENTITY = ("model_id", "model_revision", "model_hash")
_REMEDY = "use another --out, or --overwrite to start over"


class ViewsMismatchError(StoreError, BadValueError):
    """A store or journal holds views of another recipe than the run asks for (``--views``,
    ``--views-seed``): a bad value for that store (exit 2); nothing is written."""


@dataclass
class EncodeResult:
    path: Path
    n_images: int
    n_skipped: int
    status: str  # "encoded", "resumed", "up-to-date"
    batches: int = 0  # blocks of images this run decoded and embedded (a resume skips the committed ones)
    # Where this run's wall time went (local engine): data_wait_s (the forward waiting for decoded
    # blocks), forward_s, commit_s (the writer thread), commit_wait_s (the forward waiting for the disk), wall_s.
    timings: dict | None = None


def sample_positions(n: int, limit: int | None, seed: int) -> np.ndarray:
    """All item positions, or a seeded sample of ``limit`` of them kept in source order."""
    if limit is None or limit >= n:
        return np.arange(n)
    if limit <= 0:
        raise ValueError(f"--limit must be a positive number of images; got {limit}")
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def _check_matches(found: dict, wanted: dict, path: Path) -> None:
    found = dict(found, features=found.get("features") or "projected")  # stores before schema 2: projected only
    for k in _IDENTITY:
        if str(found.get(k)) != str(wanted.get(k)):
            raise StoreError(
                f"{path} was encoded with {k}={found.get(k)!r}, but this run has {k}={wanted.get(k)!r}; "
                "use another --out, or --overwrite to start over"
            )


def encode(
    source: str,
    out: str | os.PathLike,
    model: str = DEFAULT_MODEL,
    format: str = "auto",
    templates: Sequence[str] | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    decode: str = "auto",
    dtype: str = "float16",
    normalize: bool = True,
    overwrite: bool = False,
    limit: int | None = None,
    seed: int = 0,
    source_options: dict[str, Any] | None = None,
    shard: tuple[int, int] | str | None = None,
    progress: bool = True,
    backbone: Backbone | None = None,
    features: str | Sequence[str] = "projected",
    engine: str = "local",
    devices: str | Sequence[str] | None = None,
    ray_options: dict[str, Any] | None = None,
    views: int = 0,
    views_seed: int = 0,
) -> EncodeResult:
    """Encode every image of ``source`` and its prompt sets into the store ``out``.

    Parameters
    ----------
    source : image folder, CSV/TSV manifest, Emotion6 / FI / WEBEmo folder, CIFAR-100 python
        tarball/folder, webdataset tar shards (``data/{00000..00127}.tar``), parquet files, ...
    out : store path (``.h5``). An unfinished ``<out>.partial`` from an interrupted run is resumed.
    templates : template sets (names or files) for the prompt side; default: the set for the
        dataset's kind (emotion captions for emotion datasets, photo captions otherwise).
    limit, seed : encode a seeded sample of ``limit`` images (kept in source order).
    dtype : "float16" (default) or "float32" for the stored image vectors.
    normalize : store L2-normalised vectors (the default; the attribute records it).
    shard : ``(i, n)``: encode only the i-th of n contiguous slices of the images, so n
        processes (one per GPU or machine) share the work; join them with :func:`merge_stores`.
        ``"auto"``: the shard of this Slurm array task or torchrun rank, written to
        ``<out stem>.shard-I-of-N<suffix>``. A sharded encode leaves a done-marker, and a rerun
        of a finished shard returns at once.
    engine : "local" (this process, or one worker per device with ``devices``) or "ray".
    devices : several devices of this machine (``"cuda:0,cuda:1"``, ``"cpu,cpu"``, ``"all"``),
        one worker process each, ending with one store.
    ray_options : for ``engine="ray"``: ``address``, ``num_gpus_per_worker``, ``decode_cpus``,
        ``embed_workers``, ``threads`` (see :class:`clip_heads.ray_engine.RayEngine`).
    precision : "auto" (fp16 autocast on a GPU; on a CPU bf16 autocast where it has bf16 matrix
        units, else fp32), "fp32" (exact), "fp16", "bf16", "bf16-weights", "int8" (CPU); the store
        records what ran (:mod:`clip_heads.backbones.precision`), and a resume must match it.
    decode : "auto" (the fastest decode + resize within cosine 0.9999 of the reference: PIL's
        draft then torch's uint8 resize, "draft-torch"), "exact" (the full decode, equal to the
        model's processor), or a :data:`clip_heads.loading.DECODE_STEPS` name; recorded as the
        store's ``decode`` attribute, and a resume must match it.
    features : "projected" (default), or "projected,pre-projection" to also store the image
        tower's pooled output before the projection (``/images/pre_embeds``) and the projection
        itself (``/projection``; SigLIP has none: its pre-projection features are its embeddings,
        not normalised).
    views : also store ``views`` augmented views of each image (``/images/views``, ``(N, K, dim)``,
        normalised like the embeddings; with pre-projection features also ``/images/pre_views``):
        a random resized crop (area 0.5-1, aspect 3/4-4/3) and a horizontal flip (p = 0.5), then
        the family's own preprocessing (:mod:`clip_heads.augment`), through the same forward and
        precision. Drawn per image from ``views_seed`` and the image's key, so every engine, shard
        and resume writes the same views; the recipe is the store's ``views`` attribute, and a
        resume must match it. Costs about ``views + 1`` times the plain encode.
    """
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1; got {batch_size}")
    if dtype not in ("float16", "float32"):
        raise ValueError(f"unknown dtype {dtype!r}; valid: float16, float32")
    features = parse_features(features)
    from .augment import check_views_count, recipe

    views = check_views_count(views)
    if isinstance(views_seed, bool) or not isinstance(views_seed, (int, np.integer)):
        raise ValueError(f"--views-seed must be an integer; got {views_seed!r}")
    views_recipe = recipe(views, int(views_seed)) if views else None
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; valid: {', '.join(ENGINES)}")
    devices = parse_devices(devices)
    if devices and engine != "local":
        raise ValueError(f"--devices runs one worker per device of this machine; with --engine {engine} the engine "
                         "places the workers: drop --devices")
    if devices and len(devices) == 1:
        device, devices = devices[0], None
    if shard == "auto":
        from .sharding import auto_device, auto_shard, shard_path

        shard = auto_shard()
        out = shard_path(out, *shard)
        device = auto_device(device)
        logger.info("--shard auto: shard %d of %d, writing %s", shard[0], shard[1], out)
    out = Path(out)
    run_key = None
    if shard is not None:
        i, n = shard
        if not (n >= 1 and 0 <= i < n):
            raise ValueError(f"--shard {i}/{n} is invalid: use I/N with 0 <= I < N")
        from .sharding import is_done, run_digest

        run_key = run_digest({"source": os.path.abspath(os.fspath(source)), "format": format, "options": source_options or {},
                              "model": str(model), "templates": list(templates or []), "batch_size": batch_size,
                              "dtype": dtype, "normalize": normalize, "limit": limit, "seed": seed, "shard": list(shard),
                              # (the default's key stays as before, so earlier done-markers still count)
                              **({"features": list(features)} if features != ("projected",) else {}),
                              **({"views": views_recipe} if views else {})})
        done = None if overwrite else is_done(out, run_key)
        if done is not None:  # a rerun of the array: this shard finished; list nothing, load nothing
            logger.info("%s is done (its marker says so); nothing to do", out)
            return EncodeResult(out, int(done.get("rows", 0)), int(done.get("skipped", 0)), "up-to-date")
    part = StoreWriter.partial_path(out)
    # One writer per store, from the first moment: a second encode (or `prompts`) of the same
    # store fails at once, naming this one.
    with exclusive_lock(out, "encode", reentrant=True):
        src = open_source(source, format=format, **(source_options or {}))
        positions = sample_positions(len(src), limit, seed)
        if shard is not None:
            positions = np.array_split(positions, shard[1])[shard[0]]
        desc = dict(src.describe(), limit=limit, seed=seed if limit else None)
        fingerprint = src.fingerprint() + (f":limit={limit}:seed={seed}" if limit and limit < len(src) else "")
        template_sets = list(templates) if templates else list(default_template_sets(src.format, src.classes))
        for t in template_sets:  # a bad template fails now, not after the images
            validate_prompt_set_name(load_templates(t)[0])

        for name in FEATURE_COLUMNS:
            if name in src.extras:
                raise ValueError(f"{source} has a column named {name!r}, the name a store keeps image features under "
                                 f"({', '.join(FEATURE_COLUMNS)}); rename that column")
        wanted = {"source_fingerprint": fingerprint, "normalized": normalize, "dtype": dtype,
                  "shard_index": shard[0] if shard else None, "shard_count": shard[1] if shard else None,
                  "features": ",".join(features)}

        if out.exists() and not overwrite:
            with FeatureStore(out) as s:
                found = s.attrs
                # The model as it is now (its weights hashed, not loaded), against the one that encoded the store.
                check_identity(found, backbone.identity if backbone else model_identity(model), str(out), _REMEDY)
                _check_matches(found, wanted, out)
                _check_views(found, views_recipe, out)
                _check_precision(found, precision, out)
                _check_decode(found, decode, out)
                missing = [t for t in template_sets if Path(t).stem not in s.prompt_sets() and t not in s.prompt_sets()]
                n, n_skipped = len(s), s.progress["skipped"]
            _drop_finished_journal(out, found)
            if missing and templates:
                from .prompts import add_prompts

                add_prompts(str(out), missing, device=device, progress=progress)
            _mark(out, run_key, n, n_skipped)
            logger.info("%s is complete and up to date (%d images); nothing to do", out, n)
            return EncodeResult(out, n, n_skipped, "up-to-date")

        # Loading the model comes before anything is written or removed: a wrong --model
        # leaves an existing store (even with --overwrite) and any journal as they were.
        backbone = backbone or Backbone(model, device=devices[0] if devices else device, precision=precision)
        runner = Runner(engine, backbone, devices, workers, ray_options, progress)
        try:
            used_precision = resolve_precision(runner.device, precision)
            used_decode = resolve_decode(decode, backbone.preprocess)
            writer = None
            if part.exists():
                try:
                    found = StoreWriter.read_partial_attrs(out)
                    check_identity(found, backbone.identity, str(part), _REMEDY)
                    _check_matches(found, wanted, part)
                    _check_views(found, views_recipe, part)
                    if decode == "auto" and found.get("decode"):
                        # "auto" picks the path this journal was started with, even when an
                        # upgrade changed what auto means: the rows must all come from one path.
                        used_decode = resolve_decode(str(found["decode"]), backbone.preprocess)
                    _check_resume(found, used_precision, batch_size, part, used_decode)
                    writer, status = StoreWriter.resume(out), "resumed"
                except ValueError as e:  # StoreError, or check_identity's refusal
                    if not overwrite:
                        raise
                    logger.info("starting over (--overwrite): %s", e)
            if writer is None:
                attrs = dict(
                    backbone.provenance(features),
                    normalized=normalize,
                    versions=library_versions(),
                    source=desc,
                    source_fingerprint=fingerprint,
                    precision=used_precision,
                    decode=used_decode,
                    batch_size=batch_size,
                    views=views_recipe,
                )
                if shard is not None:
                    attrs.update(shard_index=shard[0], shard_count=shard[1])
                extras = {k: v[:1] for k, v in src.extras.items()}
                spec = extras_spec(extras, getattr(src, "extras_meta", None))
                if "pre-projection" in features:  # one more per-image column, at /images/pre_embeds
                    spec[PRE_EMBEDS] = ((backbone.pre_dim,), np.dtype(dtype), None)
                if views:  # (K, D) per image at /images/views, and the pooled output of each view
                    spec[VIEWS] = ((views, backbone.dim), np.dtype(dtype), None)
                    if "pre-projection" in features:
                        spec[PRE_VIEWS] = ((views, backbone.pre_dim), np.dtype(dtype), None)
                writer = StoreWriter.create(out, dim=backbone.dim, classes=src.classes, dtype=dtype, extras=spec,
                                            attrs=attrs)
                status = "encoded"

            try:
                job = EmbedJob(src, positions, plan_blocks(len(positions), writer.progress[0], batch_size),
                               backbone.preprocess, worker_model(model) if backbone.model_id == str(model) else backbone.model_id,
                               backbone.identity, used_precision, pre_projection="pre-projection" in features,
                               decode=used_decode, uint8=isinstance(backbone.preprocess, Preprocess),
                               views=views, views_seed=int(views_seed))
                t0 = time.perf_counter()
                batches = _stream(src, len(positions), writer, runner.blocks(job), normalize, progress, runner.stats)
                timings = dict(runner.stats, wall_s=time.perf_counter() - t0)
                sealed = writer.sealed_prompt_sets(template_sets)
                if sealed is not None:  # a run killed while finishing already encoded them
                    sets, default = sealed
                else:
                    sets = [encode_prompt_set(backbone, t, src.classes, progress=progress) for t in template_sets]
                    default = sets[0].name if sets else None
                n_images, n_skipped = writer.progress[1], writer.progress[2]
                writer.finish(sets, default_prompts=default, sources=template_sets)
            finally:
                writer.close()  # the committed prefix stays in <out>.partial for the next run
        finally:
            runner.close()
        _mark(out, run_key, n_images, n_skipped)
    logger.info("wrote %s: %d images, %d skipped", out, n_images, n_skipped)
    if timings.get("wall_s"):
        logger.info("encode time: %s", ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    return EncodeResult(out, n_images, n_skipped, status, batches, timings)


def _mark(out: Path, run_key: str | None, rows: int, skipped: int) -> None:
    if run_key is not None:
        from .sharding import mark_done

        mark_done(out, run_key, rows=rows, skipped=skipped)


def _flag_value(k: str, recorded: Any) -> str:
    """A recorded precision as the --precision value that asks for it ("bf16-autocast" -> bf16)."""
    if k == "precision":
        asked = {v: a for a, v in PRECISION_NAMES.items()}
        return asked.get(str(recorded), str(recorded))
    return str(recorded)


def _check_resume(found: dict, precision: str, batch_size: int, part: Path, decode: str = "exact") -> None:
    """What a resume must match beyond the store's identity: the rows already written were
    computed at this precision, from images decoded by this path, in batches of this size.
    (A journal from before the decode paths decoded exact.)"""
    found = dict(found, decode=found.get("decode") or "exact")
    for k, v in (("precision", precision), ("decode", decode), ("batch_size", batch_size)):
        same = same_precision(found.get(k), v) if k == "precision" else str(found.get(k)) == str(v)
        if not same:
            flag = f"--{k.replace('_', '-')}"
            theirs, ours = _flag_value(k, found.get(k)), _flag_value(k, v)
            raise StoreError(f"{part} was encoded with {flag} {theirs} ({k}={found.get(k)}), but this run has {flag} "
                             f"{ours}; rerun with {flag} {theirs} to resume, or --overwrite to start over")


def _views_flag(r: dict | None) -> str:
    if not r:
        return "no --views"
    return f"--views {r.get('views')} --views-seed {r.get('seed')} (recipe version {r.get('version', 1)})"


def _check_views(found: dict, wanted: dict | None, path: Path) -> None:
    """A store or journal holds the views of one recipe (K, seed, crop, flip, version): another is refused."""
    had = found.get("views")
    if isinstance(had, str):  # a journal's layout keeps it as the json the store will hold
        import json

        had = json.loads(had)
    if (had or None) != (wanted or None):
        more = "" if not had or not wanted or _views_flag(had) != _views_flag(wanted) else " (another crop or flip recipe)"
        raise ViewsMismatchError(f"{path} was encoded with {_views_flag(had)}, but this run has {_views_flag(wanted)}{more}; "
                         f"rerun with {_views_flag(had)} to resume or reuse it, or use another --out, or --overwrite to "
                         "start over")


def _check_precision(found: dict, precision: str, path: Path) -> None:
    # An explicit --precision that differs from a complete store's is refused; "auto" on another
    # kind of device is not (the store is what it is, and says so).
    had = str(found.get("precision", "auto"))
    if precision != "auto" and had != "auto" and not same_precision(had, PRECISION_NAMES.get(precision, precision)):
        raise StoreError(f"{path} was encoded with precision={had!r}, but this run has "
                         f"precision={precision!r}; use another --out, or --overwrite to start over")


def _check_decode(found: dict, decode: str, path: Path) -> None:
    # As for the precision: an explicit --decode must be what the store's vectors came from.
    had = str(found.get("decode") or "exact")
    if decode != "auto" and had != decode:
        raise StoreError(f"{path} was encoded with decode={had!r}, but this run has decode={decode!r}; use another "
                         "--out, or --overwrite to start over")


def _drop_finished_journal(out: Path, found: dict) -> None:
    """A run killed between moving the store into place and deleting its journal leaves the
    journal of the store itself: remove it. Any other journal is left, with a warning."""
    part = StoreWriter.partial_path(out)
    if not part.exists():
        return
    try:
        theirs = StoreWriter.read_partial_attrs(out)
    except StoreError as e:
        logger.warning("%s is left as it is: %s", part, e)
        return
    same = all(str(theirs.get(k)) == str(found.get(k)) for k in _IDENTITY + _MODEL_IDENTITY + ("created", "store_id"))
    if same:
        logger.info("removing %s: the store it built is in place", part)
        StoreWriter.discard(out)
    else:
        logger.warning("%s is an unfinished encode of other settings; it is left as it is (rerun that command, or "
                       "use --overwrite to replace %s with it)", part, out)


def _stream(src, n_positions: int, writer: StoreWriter, results, normalize: bool, progress: bool,
            stats: dict | None = None) -> int:
    """Commit the engine's blocks, in order, to the journal; the number of blocks this run embedded.

    The commits run in a writer thread (:class:`~clip_heads.overlap.CommitThread`) while this
    loop fetches the next block, so the forward never waits for the disk; what the journal holds
    is what was committed, and a kill loses only blocks the rerun embeds again."""
    from tqdm.auto import tqdm

    done = writer.progress[0]
    extras = src.extras
    count = 0
    bar = tqdm(total=n_positions, initial=done, unit="img", desc="encode", disable=not progress, smoothing=0.1)

    def commit(r: BlockResult) -> None:
        commit_block(writer, src, r, normalize, extras)
        bar.update(r.n)
        bar.set_postfix(skipped=writer.progress[2], refresh=False)

    try:
        with CommitThread(commit, depth=2, stats=stats) as committer:
            for r in results:
                committer.put(r)
                count += 1
    finally:
        close = getattr(results, "close", None)
        if close is not None:
            close()  # stops the engine's workers now, not when the generator is collected
        bar.close()
    return count


def commit_block(writer: StoreWriter, src, r: BlockResult, normalize: bool, extras=None) -> None:
    """One block's rows (with its pre-projection features when the engine computed them) and
    skips into the journal, committed whole."""
    extras = src.extras if extras is None else extras
    good = r.good
    if good:
        emb = l2_normalize(r.embeds) if normalize else r.embeds
        cols = {k: v[good] for k, v in extras.items()}
        if r.pre_embeds is not None:  # --features pre-projection: the pooled output, as it came (not normalised)
            cols[PRE_EMBEDS] = r.pre_embeds
        if r.views is not None:  # --views K: (rows, K, dim), normalised as the embeddings are
            cols[VIEWS] = l2_normalize(r.views) if normalize else r.views
        if r.pre_views is not None:
            cols[PRE_VIEWS] = r.pre_views
        writer.append(emb, [src.keys[i] for i in good], src.labels[good], cols)
    for i, reason in r.bad:
        logger.warning("skipped %s: %s", src.keys[i], reason)
        writer.skip(src.keys[i], reason)
    writer.commit(writer.progress[0] + r.n)
