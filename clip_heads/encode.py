"""One pass of a frozen vision-language model (any family of :mod:`clip_heads.backbones`) over a dataset's images and its prompts, into a feature store.

Images are decoded and preprocessed in DataLoader worker processes a whole batch at a time
(order preserved), embedded under ``inference_mode`` and appended to the store as they come,
so memory stays constant in the number of images. Every batch is committed to the encode's
journal (:mod:`clip_heads.journal`) whole and synced before the cursor moves; rerunning the same
command after any interruption - Ctrl-C, SIGKILL, a full disk - continues from the cursor, in
batches aligned as before, and ends with the same store an uninterrupted run writes. One
process writes a store at a time (its lock), and an existing store is replaced only once the
new one is complete.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from .backbones.model import Backbone, resolve_precision
from .catalog import DEFAULT_MODEL, parse_features
from .identity import check_identity, model_identity
from .datasets import open_source
from .fsutil import exclusive_lock
from .loading import DecodedBatches
from .prompts import default_template_sets, encode_prompt_set, load_templates
from .store import PRE_EMBEDS, FeatureStore, StoreError, extras_spec, library_versions, l2_normalize, validate_prompt_set_name
from .journal import StoreWriter

logger = logging.getLogger(__name__)

# Attributes that must agree between a partial or complete store and the run asked for, besides
# the model's identity (model_id, model_revision, model_hash), which backbone.check_identity compares.
_IDENTITY = ("source_fingerprint", "normalized", "dtype", "shard_index", "shard_count", "features")
_MODEL_IDENTITY = ("model_id", "model_revision", "model_hash")
_REMEDY = "use another --out, or --overwrite to start over"


@dataclass
class EncodeResult:
    path: Path
    n_images: int
    n_skipped: int
    status: str  # "encoded", "resumed", "up-to-date"


def sample_positions(n: int, limit: int | None, seed: int) -> np.ndarray:
    """All item positions, or a seeded sample of ``limit`` of them kept in source order."""
    if limit is None or limit >= n:
        return np.arange(n)
    if limit <= 0:
        raise ValueError(f"--limit must be a positive number of images; got {limit}")
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def default_workers(device: torch.device | str = "cpu") -> int:
    """Decoding processes that pay off: on a GPU, half the cores keep it fed; on a CPU the
    forward pass already uses every core and decoding costs ~5% of it (ViT-B/32: ~3.5 ms vs
    ~70 ms an image on 2 cores), so a worker only takes cores from torch unless there are many."""
    cores = os.cpu_count() or 2
    if torch.device(device).type == "cpu":
        return 0 if cores <= 4 else cores // 8
    return max(1, min(8, cores // 2))


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
    dtype: str = "float16",
    normalize: bool = True,
    overwrite: bool = False,
    limit: int | None = None,
    seed: int = 0,
    source_options: dict[str, Any] | None = None,
    shard: tuple[int, int] | None = None,
    progress: bool = True,
    backbone: Backbone | None = None,
    features: str | Sequence[str] = "projected",
) -> EncodeResult:
    """Encode every image of ``source`` and its prompt sets into the store ``out``.

    Parameters
    ----------
    source : image folder, CSV/TSV manifest, Emotion6 / FI / WEBEmo folder, or CIFAR-100 python tarball/folder.
    out : store path (``.h5``). An unfinished ``<out>.partial`` from an interrupted run is resumed.
    templates : template sets (names or files) for the prompt side; default: the set for the
        dataset's kind (emotion captions for emotion datasets, photo captions otherwise).
    limit, seed : encode a seeded sample of ``limit`` images (kept in source order).
    dtype : "float16" (default) or "float32" for the stored image vectors.
    normalize : store L2-normalised vectors (the default; the attribute records it).
    shard : ``(i, n)``: encode only the i-th of n contiguous slices of the images, so n
        processes (one per GPU or machine) share the work; join them with :func:`merge_stores`.
    features : "projected" (default), or "projected,pre-projection" to also store the image
        tower's pooled output before the projection (``/images/pre_embeds``) and the projection
        itself (``/projection``; SigLIP has none: its pre-projection features are its embeddings,
        not normalised).
    """
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1; got {batch_size}")
    if dtype not in ("float16", "float32"):
        raise ValueError(f"unknown dtype {dtype!r}; valid: float16, float32")
    features = parse_features(features)
    out = Path(out)
    part = StoreWriter.partial_path(out)
    # One writer per store, from the first moment: a second encode (or `prompts`) of the same
    # store fails at once, naming this one.
    with exclusive_lock(out, "encode", reentrant=True):
        src = open_source(source, format=format, **(source_options or {}))
        positions = sample_positions(len(src), limit, seed)
        if shard is not None:
            i, n = shard
            if not (n >= 1 and 0 <= i < n):
                raise ValueError(f"--shard {i}/{n} is invalid: use I/N with 0 <= I < N")
            positions = np.array_split(positions, n)[i]
        desc = dict(src.describe(), limit=limit, seed=seed if limit else None)
        fingerprint = src.fingerprint() + (f":limit={limit}:seed={seed}" if limit and limit < len(src) else "")
        template_sets = list(templates) if templates else list(default_template_sets(src.format))
        for t in template_sets:  # a bad template fails now, not after the images
            validate_prompt_set_name(load_templates(t)[0])

        if PRE_EMBEDS in src.extras:
            raise ValueError(f"{source} has a column named {PRE_EMBEDS!r}, the name a store keeps pre-projection "
                             "features under; rename that column")
        wanted = {"source_fingerprint": fingerprint, "normalized": normalize, "dtype": dtype,
                  "shard_index": shard[0] if shard else None, "shard_count": shard[1] if shard else None,
                  "features": ",".join(features)}

        if out.exists() and not overwrite:
            with FeatureStore(out) as s:
                found = s.attrs
                # The model as it is now (its weights hashed, not loaded), against the one that encoded the store.
                check_identity(found, backbone.identity if backbone else model_identity(model), str(out), _REMEDY)
                _check_matches(found, wanted, out)
                _check_precision(found, precision, out)
                missing = [t for t in template_sets if Path(t).stem not in s.prompt_sets() and t not in s.prompt_sets()]
                n, n_skipped = len(s), s.progress["skipped"]
            _drop_finished_journal(out, found)
            if missing and templates:
                from .prompts import add_prompts

                add_prompts(str(out), missing, device=device, progress=progress)
            logger.info("%s is complete and up to date (%d images); nothing to do", out, n)
            return EncodeResult(out, n, n_skipped, "up-to-date")

        # Loading the model comes before anything is written or removed: a wrong --model
        # leaves an existing store (even with --overwrite) and any journal as they were.
        backbone = backbone or Backbone(model, device=device, precision=precision)
        used_precision = resolve_precision(backbone.device, precision)
        writer = None
        if part.exists():
            try:
                found = StoreWriter.read_partial_attrs(out)
                check_identity(found, backbone.identity, str(part), _REMEDY)
                _check_matches(found, wanted, part)
                _check_resume(found, used_precision, batch_size, part)
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
                batch_size=batch_size,
            )
            if shard is not None:
                attrs.update(shard_index=shard[0], shard_count=shard[1])
            extras = {k: v[:1] for k, v in src.extras.items()}
            spec = extras_spec(extras, getattr(src, "extras_meta", None))
            if "pre-projection" in features:  # one more per-image column, at /images/pre_embeds
                spec[PRE_EMBEDS] = ((backbone.pre_dim,), np.dtype(dtype), None)
            writer = StoreWriter.create(out, dim=backbone.dim, classes=src.classes, dtype=dtype, extras=spec, attrs=attrs)
            status = "encoded"

        try:
            _stream(src, positions, writer, backbone, batch_size, workers, normalize, progress,
                    "pre-projection" in features)
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
    logger.info("wrote %s: %d images, %d skipped", out, n_images, n_skipped)
    return EncodeResult(out, n_images, n_skipped, status)


def _check_resume(found: dict, precision: str, batch_size: int, part: Path) -> None:
    """What a resume must match beyond the store's identity: the rows already written were
    computed at this precision and in batches of this size."""
    for k, v in (("precision", precision), ("batch_size", batch_size)):
        if str(found.get(k)) != str(v):
            flag = f"--{k.replace('_', '-')}"
            raise StoreError(f"{part} was encoded with {flag} {found.get(k)}, but this run has {flag} {v}; rerun with "
                             f"{flag} {found.get(k)} to resume, or --overwrite to start over")


def _check_precision(found: dict, precision: str, path: Path) -> None:
    # An explicit --precision that differs from a complete store's is refused; "auto" on another
    # kind of device is not (the store is what it is, and says so).
    if precision != "auto" and str(found.get("precision", "auto")) not in ("auto", precision):
        raise StoreError(f"{path} was encoded with precision={found.get('precision')!r}, but this run has "
                         f"precision={precision!r}; use another --out, or --overwrite to start over")


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
    same = all(str(theirs.get(k)) == str(found.get(k)) for k in _IDENTITY + _MODEL_IDENTITY + ("created",))
    if same:
        logger.info("removing %s: the store it built is in place", part)
        StoreWriter.discard(out)
    else:
        logger.warning("%s is an unfinished encode of other settings; it is left as it is (rerun that command, or "
                       "use --overwrite to replace %s with it)", part, out)


def _stream(src, positions, writer: StoreWriter, backbone: Backbone, batch_size, workers, normalize, progress,
            pre_projection: bool = False) -> None:
    from tqdm.auto import tqdm

    done = writer.progress[0]
    todo = positions[done:]
    if not len(todo):
        return
    workers = default_workers(backbone.device) if workers is None else workers
    # Batches stay aligned to multiples of batch_size from the start of the run: a resume whose
    # cursor sits inside a batch first finishes that batch, so every batch holds the same images
    # as in an uninterrupted run (and the store is bit-identical to one).
    head = min(len(todo), (-done) % batch_size)
    parts = ([(todo[:head], head)] if head else []) + [(todo[head:], batch_size)]

    def loader(pos, size):
        return DataLoader(
            DecodedBatches(src, pos, size, backbone.preprocess),
            batch_size=None,
            num_workers=workers,
            pin_memory=backbone.device.type == "cuda",
            prefetch_factor=4 if workers else None,
            persistent_workers=False,
        )

    extras = src.extras
    bar = tqdm(total=len(positions), initial=done, unit="img", desc="encode", disable=not progress, smoothing=0.1)
    for pos, size in parts:
        if not len(pos):
            continue
        for batch in loader(pos, size):
            good = batch["good"]
            if good:
                if pre_projection:
                    emb, pre = backbone.image_features(batch["pixels"], pre_projection=True)
                else:
                    emb, pre = backbone.encode_pixels(batch["pixels"]), None
                emb = emb.cpu().numpy()
                emb = l2_normalize(emb) if normalize else emb
                cols = {k: v[good] for k, v in extras.items()}
                if pre is not None:
                    cols[PRE_EMBEDS] = pre.cpu().numpy()
                writer.append(emb, [src.keys[i] for i in good], src.labels[good], cols)
            for i, reason in batch["bad"]:
                logger.warning("skipped %s: %s", src.keys[i], reason)
                writer.skip(src.keys[i], reason)
            done += batch["n"]
            writer.commit(done)
            bar.update(batch["n"])
            bar.set_postfix(skipped=writer.progress[2], refresh=False)
    bar.close()
