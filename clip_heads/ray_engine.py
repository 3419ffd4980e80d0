"""The Ray Data engine (``encode --engine ray``, ``predict --engine ray``): a streaming pipeline
over a local or remote Ray cluster, writing through the same journal as every other engine.

The run's remaining blocks (:func:`clip_heads.engines.plan_blocks`: the batches a single-process
encode would make) become a Ray dataset of one row per block. A pool of CPU actors decodes and
preprocesses each block (each actor holds the source listing once, and decodes through
:class:`~clip_heads.loading.DecodedBatches`, the one bad-image policy); a pool of embedding
actors, one per GPU (or CPU workers when the cluster has no GPU), turns the pixels into
vectors with the model the store records (each actor hashes the weights it loaded and refuses a
mismatch). Ray Data streams the two stages with backpressure, and ``preserve_order`` hands
the blocks back to this process in plan order; here they are committed to the journal one by
one, so a run killed at any point resumes after its last committed block, with nothing
finished done again.

Ray is an optional extra (``pip install "clip-heads[ray]"``); ``import clip_heads`` never
imports it. Without ``address`` a Ray already started in this process is used, else a local one
is started for the run (all the cores here) and stopped after it; ``address="auto"`` (or
``ray://host:10001``) joins a running cluster, whose workers must have clip-heads installed and
see the source and the model at the same paths (a shared filesystem, or a hub id in each
node's cache).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Iterator

import numpy as np

from .engines import BlockResult, EmbedJob, check_worker_identity, decode_block, embed_pixels, embed_views

logger = logging.getLogger(__name__)

_INSTALL_HINT = 'pip install "clip-heads[ray]" (or: pip install "ray[data]")'


def pack_arrays(x: Any) -> tuple[list, bytes]:
    """A block's pixels - a tensor, or a NaFlex batch dict of tensors (patches, their mask, the
    patch grid) - as ``(layout, raw bytes)``: plain data between Ray's stages, each array's
    own dtype kept. ``layout`` lists ``[key, dtype, shape]`` (key None for a bare tensor)."""
    items = list(x.items()) if isinstance(x, dict) else [(None, x)]
    layout, parts = [], []
    for k, v in items:
        a = np.ascontiguousarray(v.numpy() if hasattr(v, "numpy") else np.asarray(v))
        layout.append([k, a.dtype.str, list(a.shape)])
        parts.append(a.tobytes())
    return layout, b"".join(parts)


def unpack_arrays(layout: list, raw: bytes) -> Any:
    """The inverse of :func:`pack_arrays`: a tensor, or a dict of tensors."""
    import torch

    out, at = {}, 0
    for k, dt, shape in layout:
        dtype = np.dtype(dt)
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        out[k] = torch.from_numpy(np.frombuffer(raw, dtype, offset=at, count=size // dtype.itemsize).reshape(shape).copy())
        at += size
    return out[None] if list(out) == [None] else out


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise ValueError(f"--engine ray needs Ray Data, which is not installed: {_INSTALL_HINT}") from e
    return ray


class _Decoder:
    """CPU actor: one block's images decoded and preprocessed by the family's recipe, the pixels
    (a NaFlex batch's patches, mask and grid too) as raw bytes."""

    def __init__(self, source, preprocess, decode: str = "exact", uint8: bool = False, views: int = 0,
                 views_seed: int = 0) -> None:
        self.source, self.preprocess, self.decode, self.uint8 = source, preprocess, decode, uint8
        self.views, self.views_seed = views, views_seed

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        metas, pixels, views = [], [], []
        for _block, pos in zip(batch["block"], batch["positions"], strict=True):
            d = decode_block(self.source, np.asarray(pos, np.int64), self.preprocess, self.decode, self.uint8,
                             self.views, self.views_seed)
            layout, raw = pack_arrays(d["pixels"]) if d["good"] else ([], b"")
            vlayout, vraw = pack_arrays(d["view_pixels"]) if d["good"] and self.views else ([], b"")
            metas.append(json.dumps({"n": d["n"], "good": d["good"], "bad": d["bad"], "layout": layout,
                                     "view_layout": vlayout}))
            pixels.append(raw)
            views.append(vraw)
        return {"block": np.asarray(batch["block"], np.int64), "meta": np.asarray(metas, dtype=object),
                "pixels": np.asarray(pixels, dtype=object), "views": np.asarray(views, dtype=object)}


class _Embedder:
    """GPU (or CPU) actor: the model the store records (any family), embedding one block's
    pixels, and taking the pre-projection features too when the job asks for them."""

    def __init__(self, model: str, identity: dict, precision: str, device: str, threads: int | None,
                 pre_projection: bool = False, views: int = 0) -> None:
        import torch

        from .backbones.model import Backbone

        if device == "cpu":
            torch.set_num_threads(max(1, threads or (os.cpu_count() or 1)))
        self.backbone = Backbone(model, device=device, precision=precision)
        self.pre_projection, self.views = pre_projection, views
        import socket

        check_worker_identity(self.backbone.identity, identity, f"Ray worker {socket.gethostname()}:{os.getpid()}")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        metas, embeds, pres, views = [], [], [], []
        for meta, raw, raw_views in zip(batch["meta"], batch["pixels"], batch["views"], strict=True):
            m = json.loads(meta)
            x = unpack_arrays(m["layout"], raw) if m["good"] else None
            e, pre = embed_pixels(self.backbone, x, len(m["good"]), self.pre_projection)
            v = pv = None
            if self.views:  # the views' embeddings (and pooled outputs), then the block's, as raw float32
                vx = unpack_arrays(m["view_layout"], raw_views) if m["good"] else None
                v, pv = embed_views(self.backbone, vx, len(m["good"]), self.views, self.pre_projection)
            metas.append(json.dumps({"n": m["n"], "good": m["good"], "bad": m["bad"], "dim": int(e.shape[1]),
                                     "pre_dim": None if pre is None else int(pre.shape[1]), "views": self.views}))
            embeds.append(np.ascontiguousarray(e).tobytes())
            pres.append(b"" if pre is None else np.ascontiguousarray(pre).tobytes())
            views.append(b"".join(np.ascontiguousarray(a).tobytes() for a in (v, pv) if a is not None))
        return {"block": np.asarray(batch["block"], np.int64), "meta": np.asarray(metas, dtype=object),
                "embeds": np.asarray(embeds, dtype=object), "pre": np.asarray(pres, dtype=object),
                "views": np.asarray(views, dtype=object)}


def _unpack_views(raw: bytes, n: int, k: int, dim: int, pre_dim: int | None) -> tuple:
    """A block's views (and their pre-projection features) from the embedding actor's bytes."""
    if not k:
        return None, None
    flat = np.frombuffer(raw, np.float32)
    v = flat[:n * k * dim].reshape(n, k, dim)
    pv = None if pre_dim is None else flat[n * k * dim:].reshape(n, k, pre_dim)
    return v, pv


class RayEngine:
    """A connection to Ray for one run, and the resources its actors take.

    Parameters
    ----------
    address : None (a Ray started in this process, else a local one for this run), ``"auto"``
        (the running cluster) or a ``ray://`` address.
    num_gpus_per_worker : GPUs per embedding actor; default 1 when the cluster has GPUs, else 0
        (CPU actors).
    embed_workers : embedding actors; default: as many as the cluster's GPUs allow, 1 on CPU.
    decode_cpus : decoding actors (one CPU each); default: the cluster's CPUs left over by the
        embedding actors, at most 8 per embedding actor.
    threads : torch threads of a CPU embedding actor; default: the node's cores / embed_workers.
    """

    def __init__(self, address: str | None = None, num_gpus_per_worker: float | None = None,
                 embed_workers: int | None = None, decode_cpus: int | None = None, threads: int | None = None,
                 progress: bool = True) -> None:
        import torch

        ray = self._ray = _ray()
        self.started = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False}
            if address:
                kwargs["address"] = address
            logger.info("starting Ray%s", f" at {address}" if address else " on this machine")
            ray.init(**kwargs)
            self.started = True  # ours to shut down after the run (for a cluster: to disconnect from it)
        elif address:
            logger.info("Ray is already running in this process; using it rather than %s", address)
        try:
            res = ray.cluster_resources()
            gpus, cpus = float(res.get("GPU", 0)), float(res.get("CPU", 0))
            g = (1.0 if gpus >= 1 else 0.0) if num_gpus_per_worker is None else float(num_gpus_per_worker)
            if g < 0 or (g > 0 and gpus < g):
                raise ValueError(f"--num-gpus-per-worker {g:g}: the Ray cluster has {gpus:g} GPUs; use 0 for CPU workers")
            if embed_workers is None:
                embed_workers = max(1, int(gpus // g)) if g else 1
            if embed_workers < 1 or (decode_cpus is not None and decode_cpus < 1):
                raise ValueError(f"Ray workers must be >= 1; got {embed_workers} embedding and {decode_cpus} decoding")
            if decode_cpus is None:
                decode_cpus = int(min(max(1, cpus - embed_workers), 8 * embed_workers))
            if embed_workers + decode_cpus > cpus:
                raise ValueError(f"{embed_workers} embedding + {decode_cpus} decoding workers need "
                                 f"{embed_workers + decode_cpus} CPUs; the Ray cluster has {cpus:g}: lower --decode-cpus")
        except BaseException:
            self.close()
            raise
        self.num_gpus, self.embed_workers, self.decode_cpus, self.threads = g, embed_workers, decode_cpus, threads
        self.device = torch.device("cuda" if g else "cpu")
        self.progress = progress
        logger.info("Ray: %d embedding worker(s) on %s (%g GPU each), %d decoding worker(s)", embed_workers,
                    self.device.type, g, decode_cpus)

    def blocks(self, job: EmbedJob) -> Iterator[BlockResult]:
        """The blocks of ``job``, in plan order, from the Ray pipeline."""
        if not job.blocks:
            return
        ray = self._ray
        ctx = ray.data.DataContext.get_current()
        saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars)
        ctx.execution_options.preserve_order = True  # blocks come back in plan order
        ctx.enable_progress_bars = False  # the encode's own bar counts images
        try:
            items = [{"block": k, "positions": job.block_positions(k).tolist()} for k in range(len(job.blocks))]
            ds = ray.data.from_items(items, override_num_blocks=len(items))
            ds = ds.map_batches(_Decoder, fn_constructor_kwargs={"source": job.source, "preprocess": job.preprocess,
                                                                   "decode": job.decode, "uint8": job.uint8,
                                                                   "views": job.views, "views_seed": job.views_seed},
                                batch_size=1, batch_format="numpy", num_cpus=1,
                                compute=ray.data.ActorPoolStrategy(size=self.decode_cpus))
            ds = ds.map_batches(_Embedder, fn_constructor_kwargs={
                "model": job.model, "identity": job.identity, "precision": job.precision,
                "device": self.device.type, "pre_projection": job.pre_projection, "views": job.views, "threads": self.threads or (
                    None if self.num_gpus else max(1, (os.cpu_count() or 1) // self.embed_workers))},
                batch_size=1, batch_format="numpy", num_cpus=1, num_gpus=self.num_gpus,
                compute=ray.data.ActorPoolStrategy(size=self.embed_workers))
            expected = 0
            it = iter(ds.iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=1))
            try:
                for batch in it:
                    for k, meta, raw, raw_pre, raw_views in zip(batch["block"], batch["meta"], batch["embeds"], batch["pre"],
                                                                batch["views"], strict=True):
                        if int(k) != expected:
                            raise RuntimeError(f"Ray returned block {int(k)} where block {expected} was due")
                        m = json.loads(meta)
                        emb = np.frombuffer(raw, np.float32).reshape(len(m["good"]), m["dim"])
                        pre = (None if m["pre_dim"] is None else
                               np.frombuffer(raw_pre, np.float32).reshape(len(m["good"]), m["pre_dim"]))
                        v, pv = _unpack_views(raw_views, len(m["good"]), m["views"], m["dim"], m["pre_dim"])
                        yield BlockResult(int(k), int(m["n"]), [int(i) for i in m["good"]], emb,
                                          [(int(i), str(r)) for i, r in m["bad"]], pre, v, pv)
                        expected += 1
            finally:
                close = getattr(it, "close", None)
                if close is not None:
                    close()  # stops the pipeline and its actors now
        finally:
            ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved

    def close(self) -> None:
        if self.started and self._ray.is_initialized():
            self._ray.shutdown()
            self.started = False
