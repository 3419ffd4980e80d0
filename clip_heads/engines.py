"""Where the images of an encode are decoded and embedded: this process, one worker per device, or Ray.

Every engine turns the same plan into the same stream. The plan is the run's item positions cut
into *blocks*: batches of ``batch_size`` aligned to multiples of it from the start of the run
(a resume whose cursor sits inside a batch first finishes that batch), exactly as an
uninterrupted single-process encode cuts them. An engine yields one :class:`BlockResult` per
block, in block order: the positions that decoded with their raw image embeddings, and the
ones that did not with their reasons (:class:`~clip_heads.loading.DecodedBatches`, the one
bad-image policy, decodes every block whatever the engine). The caller - the encode's single
writer, or ``predict`` - consumes them in order, so the journal, its cursor and its resume are
the same for every engine, and a run started by one engine can be finished by another.

* :func:`local_blocks` - the model in this process, decoding in ``DataLoader`` workers.
* :func:`device_blocks` - one worker process per device (``--devices cuda:0,cuda:1`` or
  ``cpu,cpu``), blocks dealt round robin; each worker's results come back through its own
  bounded queue, read in block order, so memory stays flat however uneven the devices are.
* :class:`clip_heads.ray_engine.RayEngine` - a Ray Data pipeline (``--engine ray``).

:class:`clip_heads.runner.Runner` picks one of them for a run.
"""
from __future__ import annotations

import logging
import os
import queue
import traceback
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

ENGINES = ("local", "ray")
_POLL_S = 1.0  # how often a waiting reader checks that its worker is still alive


@dataclass
class BlockResult:
    """One block of a run, decoded and embedded.

    ``index`` is the block's number in the plan, ``n`` the items it covers, ``good`` the source
    positions that decoded (rows of ``embeds``, raw float32 ``(len(good), dim)``, not
    normalised) and ``bad`` ``(position, reason)`` for the others. ``pre_embeds``: the image
    tower's pooled output before the projection, float32 ``(len(good), pre_dim)``, when the job
    asked for it (``--features pre-projection``), else None. ``views``: the raw embeddings of the
    job's ``views`` augmented views of each good image, float32 ``(len(good), K, dim)``
    (``encode --views K``), and ``pre_views`` their pre-projection features ``(len(good), K,
    pre_dim)`` when both were asked for; else None.
    """

    index: int
    n: int
    good: list[int]
    embeds: np.ndarray
    bad: list[tuple[int, str]] = field(default_factory=list)
    pre_embeds: np.ndarray | None = None
    views: np.ndarray | None = None
    pre_views: np.ndarray | None = None

    def message(self) -> tuple:
        """The block as plain data for a queue between processes (:meth:`from_message` inverts it)."""
        return ("block", self.index, self.n, self.good, self.embeds, self.bad, self.pre_embeds, self.views,
                self.pre_views)

    @classmethod
    def from_message(cls, msg: tuple) -> "BlockResult":
        _, index, count, good, emb, bad, pre, views, pre_views = msg
        return cls(index, count, list(good), emb, list(bad), pre, views, pre_views)


@dataclass
class EmbedJob:
    """What every engine needs: the source, the run's positions and its remaining blocks, the
    preprocessing recipe (the family's own: :func:`clip_heads.backbones.preprocess.image_recipe`),
    the model (as named, with the identity the writer recorded), and whether the pre-projection
    features are wanted too, and how many augmented views of each image (``views``, drawn with
    ``views_seed``: :mod:`clip_heads.augment`)."""

    source: Any
    positions: np.ndarray
    blocks: list[tuple[int, int]]  # [a, b) into positions
    preprocess: Any
    model: str
    identity: dict
    precision: str = "auto"
    pre_projection: bool = False
    decode: str = "exact"  # the JPEG decode path (clip_heads.loading.resolve_decode)
    uint8: bool = False  # ship uint8 crops, normalised on the embedding device
    views: int = 0  # augmented views per image (encode --views K)
    views_seed: int = 0

    def block_positions(self, k: int) -> np.ndarray:
        a, b = self.blocks[k]
        return self.positions[a:b]


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's or Slurm's share),
    not the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_workers(device: torch.device | str = "cpu") -> int:
    """Decoding processes that pay off. On a GPU every core but two (the main loop launching the
    forward, and the pin-memory and commit threads): one core decodes and preprocesses ~400
    Emotion6-sized JPEGs a second (bench_encode.py), a GPU embeds ViT-B/32 many times faster, so
    the decode is the limit and every core helps (at most 32: each holds its prefetched batches).
    On a CPU the forward pass already uses every core and decoding costs ~5% of it (ViT-B/32:
    ~3.5 ms vs ~70 ms an image on 2 cores), so a worker only takes cores from torch unless there
    are many."""
    cores = usable_cores()
    if torch.device(device).type == "cpu":
        return 0 if cores <= 4 else cores // 8
    return max(1, min(32, cores - 2))


def plan_blocks(n: int, done: int, batch_size: int) -> list[tuple[int, int]]:
    """The blocks ``[a, b)`` still to encode of a run of ``n`` items whose first ``done`` are
    committed: batches aligned to multiples of ``batch_size`` from 0, the first one shorter when
    ``done`` is not aligned."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1; got {batch_size}")
    out, a = [], done
    while a < n:
        b = min(n, (a // batch_size + 1) * batch_size)
        out.append((a, b))
        a = b
    return out


def worker_model(model: str) -> str:
    """The model as a worker elsewhere must name it: a directory by its absolute path (a
    worker's current folder is not ours), a hub id as it is."""
    return os.path.abspath(model) if os.path.isdir(model) else model


def check_worker_identity(found: dict, expected: dict, where: str) -> None:
    """A worker must embed with the weights the writer recorded (same hash, same revision)."""
    for k in ("model_hash", "model_revision"):
        if str(found.get(k)) != str(expected.get(k)):
            raise ValueError(f"the model loaded on {where} has {k}={found.get(k)!r}, but the store records "
                             f"{k}={expected.get(k)!r}: every worker must see the same weights (a shared folder "
                             "or the same hub revision)")


def decode_block(source, positions: np.ndarray, preprocess, decode: str = "exact", uint8: bool = False,
                 views: int = 0, views_seed: int = 0) -> dict:
    """One block through :class:`~clip_heads.loading.DecodedBatches` (the one bad-image policy),
    decoded by ``decode``'s path, its crops uint8 when ``uint8``, with ``views`` augmented views
    of each image (``view_pixels``) when asked."""
    from .loading import DecodedBatches

    return DecodedBatches(source, positions, max(1, len(positions)), preprocess, decode=decode, uint8=uint8,
                          views=views, views_seed=views_seed)[0]


def job_decode_block(job: "EmbedJob", k: int) -> dict:
    """Block ``k`` of ``job`` decoded (with its views when the job has them)."""
    return dict(decode_block(job.source, job.block_positions(k), job.preprocess, job.decode, job.uint8, job.views,
                             job.views_seed), index=k)


class _Blocks:
    """Map-style dataset over blocks for a ``DataLoader``: item ``j`` is block ``indices[j]``."""

    def __init__(self, job: EmbedJob, indices: Sequence[int]) -> None:
        self.job, self.indices = job, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> dict:
        return job_decode_block(self.job, self.indices[j])


def _loader(job: EmbedJob, indices: Sequence[int], workers: int, pin: bool):
    from torch.utils.data import DataLoader

    # Pinned batches let the host-to-device copy run asynchronously (towers.image_inputs copies
    # with non_blocking=True). Many workers prefetch less each: memory stays ~ 16 batches.
    return DataLoader(_Blocks(job, indices), batch_size=None, num_workers=workers, pin_memory=pin,
                      prefetch_factor=max(2, 16 // workers) if workers else None, persistent_workers=False)


def embed_pixels(backbone, pixels: Any, n_good: int, pre_projection: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """One block's preprocessed pixels (a tensor, or a NaFlex batch dict) -> float32
    ``(embeddings, pre-projection features or None)`` as numpy; empty rows where none decoded."""
    if not n_good:
        return (np.zeros((0, backbone.dim), np.float32),
                np.zeros((0, backbone.pre_dim), np.float32) if pre_projection else None)
    if pre_projection:
        emb, pre = backbone.image_features(pixels, pre_projection=True)
    else:
        emb, pre = backbone.encode_pixels(pixels), None
    emb = emb.cpu().numpy().astype(np.float32, copy=False)
    return emb, (pre.cpu().numpy().astype(np.float32, copy=False) if pre is not None else None)


def _rows(pixels: Any, a: int, b: int) -> Any:
    return {k: v[a:b] for k, v in pixels.items()} if isinstance(pixels, dict) else pixels[a:b]


def embed_views(backbone, view_pixels: Any, n_good: int, k: int, pre_projection: bool
                ) -> tuple[np.ndarray, np.ndarray | None]:
    """A block's ``n_good * k`` preprocessed views (image by image) -> float32 ``(n_good, k, dim)``
    embeddings (and ``(n_good, k, pre_dim)`` pre-projection features, or None), embedded
    ``max(1, n_good)`` views per forward: the block's own batch size, so a forward never holds
    more than a plain one, and every engine cuts the same block into the same forwards."""
    step, total = max(1, n_good), n_good * k
    embs, pres = [], []
    for a in range(0, total, step):
        e, p = embed_pixels(backbone, _rows(view_pixels, a, min(total, a + step)), min(total, a + step) - a,
                            pre_projection)
        embs.append(e)
        pres.append(p)
    emb = (np.concatenate(embs) if embs else np.zeros((0, backbone.dim), np.float32)).reshape(n_good, k, backbone.dim)
    if not pre_projection:
        return emb, None
    pre = (np.concatenate(pres) if pres else np.zeros((0, backbone.pre_dim), np.float32)).reshape(n_good, k, backbone.pre_dim)
    return emb, pre


def embed_batch(backbone, batch: dict, pre_projection: bool = False, views: int = 0) -> BlockResult:
    """One decoded block (:func:`job_decode_block`) embedded: its rows, and its views when it has them."""
    good = [int(i) for i in batch["good"]]
    emb, pre = embed_pixels(backbone, batch["pixels"], len(good), pre_projection)
    v = pv = None
    if views:
        v, pv = embed_views(backbone, batch["view_pixels"], len(good), views, pre_projection)
    return BlockResult(int(batch["index"]), int(batch["n"]), good, emb, [(int(i), str(r)) for i, r in batch["bad"]], pre,
                       v, pv)


def _embed(backbone, batch: dict, job: "EmbedJob") -> BlockResult:
    return embed_batch(backbone, batch, job.pre_projection, job.views)


def _tensors(px: Any) -> list:
    return list(px.values()) if isinstance(px, dict) else [px]


def _to_device(batch: dict, device: torch.device, stream) -> tuple[dict, Any]:
    """``batch``'s pixels copied to the GPU on ``stream`` (asynchronous from pinned memory), and
    the event the forward must wait for."""
    moved = {}
    with torch.cuda.stream(stream):
        for name in ("pixels", "view_pixels"):
            px = batch.get(name)
            if px is not None:
                moved[name] = ({k: v.to(device, non_blocking=True) for k, v in px.items()} if isinstance(px, dict)
                               else px.to(device, non_blocking=True))
        done = torch.cuda.Event()
        done.record(stream)
    return dict(batch, **moved), done


def _on_current_stream(batch: dict, done) -> dict:
    """Make the forward's stream wait for the copy, and keep the copy's memory from being reused
    before that stream is done with it."""
    current = torch.cuda.current_stream()
    current.wait_event(done)
    for name in ("pixels", "view_pixels"):
        for t in _tensors(batch.get(name)) if batch.get(name) is not None else []:
            t.record_stream(current)
    return batch


def local_blocks(job: EmbedJob, backbone, workers: int, stats: dict | None = None) -> Iterator[BlockResult]:
    """The blocks of ``job`` embedded by ``backbone`` in this process, decoded by ``workers``
    DataLoader processes (0: in this process). On a GPU the next block's copy to the device runs
    on a stream of its own while the current block's forward runs.

    ``stats`` gains ``data_wait_s`` (this loop blocked on the next decoded block: the device
    idle for want of data; with 0 workers, the decoding itself) and ``forward_s`` (the forward
    passes and the copy of their vectors back)."""
    import time

    stats = {} if stats is None else stats
    stats.setdefault("data_wait_s", 0.0)
    stats.setdefault("forward_s", 0.0)
    if not job.blocks:
        return
    cuda = backbone.device.type == "cuda"
    stream = torch.cuda.Stream(device=backbone.device) if cuda else None
    batches = iter(_loader(job, range(len(job.blocks)), workers, cuda))

    def fetch():
        t = time.perf_counter()
        batch = next(batches, None)
        stats["data_wait_s"] += time.perf_counter() - t
        if batch is None or not cuda or not batch["good"]:
            return batch, None
        return _to_device(batch, backbone.device, stream)

    batch, done = fetch()
    while batch is not None:
        ahead, ahead_done = fetch() if cuda else (None, None)  # its copy overlaps this forward
        t = time.perf_counter()
        if done is not None:
            batch = _on_current_stream(batch, done)
        r = _embed(backbone, batch, job)
        stats["forward_s"] += time.perf_counter() - t
        yield r
        batch, done = (ahead, ahead_done) if cuda else fetch()


# ---------------------------------------------------------------------------------------
# One worker process per device
# ---------------------------------------------------------------------------------------
def parse_devices(text: str | Sequence[str] | None) -> list[str] | None:
    """``"cuda:0,cuda:1"``, ``"cpu,cpu"`` or ``"all"`` (every CUDA device) as a list of device names."""
    if text is None:
        return None

    items = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if str(t).strip()]
    if items == ["all"]:
        n = torch.cuda.device_count()
        if not n:
            raise ValueError("--devices all: no CUDA device is visible (CUDA_VISIBLE_DEVICES, drivers); name the "
                             "devices, e.g. --devices cpu,cpu")
        return [f"cuda:{i}" for i in range(n)]
    if not items:
        raise ValueError(f"--devices {text!r} names no device; use e.g. cuda:0,cuda:1, cpu,cpu or all")
    out = []
    for t in items:
        try:
            d = torch.device(t)
        except RuntimeError:
            raise ValueError(f"--devices: {t!r} is not a device; use cpu, cuda:N or all") from None
        if d.type not in ("cpu", "cuda"):
            raise ValueError(f"--devices: {t!r} is a {d.type} device; one worker per device takes cpu or cuda:N")
        if d.type == "cuda":
            if d.index is None:
                raise ValueError(f"--devices: name each GPU with its index (cuda:0,cuda:1), not {t!r}")
            if d.index >= torch.cuda.device_count():
                raise ValueError(f"--devices: {t} does not exist ({torch.cuda.device_count()} CUDA devices visible)")
        out.append(str(d))
    if len({torch.device(d).type for d in out}) > 1:
        raise ValueError(f"--devices {','.join(out)} mixes CPUs and GPUs; one store is encoded at one precision on "
                         "one kind of device")
    return out


def _device_worker(rank: int, device: str, job: EmbedJob, indices: list[int], out: Any, workers: int,
                   threads: int | None, parent: int) -> None:
    """Runs in a spawned process: load the model on ``device``, embed its blocks in order, and
    put each result on ``out`` (bounded: it waits while the writer is behind)."""
    from .fsutil import die_with_parent

    die_with_parent()
    if os.getppid() != parent:
        return
    try:
        import torch

        from .backbones.model import Backbone  # any family: the registry picks its classes from config.json

        if threads:
            torch.set_num_threads(threads)
        backbone = Backbone(job.model, device=device, precision=job.precision)
        check_worker_identity(backbone.identity, job.identity, f"worker {rank} ({device})")
        for batch in _loader(job, indices, workers, torch.device(device).type == "cuda"):
            out.put(_embed(backbone, batch, job).message())
        out.put(("done",))
    except BaseException as e:  # reported to the writer, which decides; a bug keeps its traceback
        out.put(("error", type(e).__name__, str(e), traceback.format_exc(limit=12)))


def device_blocks(job: EmbedJob, devices: Sequence[str], workers: int = 0, threads: int | None = None,
                  max_ahead: int = 2) -> Iterator[BlockResult]:
    """The blocks of ``job``, block ``k`` embedded by the worker on ``devices[k % len(devices)]``.

    Each worker is a spawned process (CUDA cannot be forked) holding its own model, decoding
    its own blocks with ``workers`` DataLoader processes; it runs at most ``max_ahead`` blocks
    ahead of the writer. A worker that fails stops the run with its error; the others are
    stopped, and what was committed stays committed.
    """
    import multiprocessing as mp

    if not job.blocks:
        return
    n = len(devices)
    if threads is None and all(d == "cpu" for d in devices):
        threads = max(1, (os.cpu_count() or 1) // n)  # the CPU workers share the cores, not oversubscribe them
    ctx = mp.get_context("spawn")
    queues = [ctx.Queue(maxsize=max_ahead) for _ in devices]
    procs = [ctx.Process(target=_device_worker, name=f"clip-heads-encode-{d}",
                         args=(w, d, job, list(range(w, len(job.blocks), n)), queues[w], workers, threads, os.getpid()))
             for w, d in enumerate(devices)]
    try:
        for p in procs:
            p.start()
        for k in range(len(job.blocks)):
            w = k % n
            msg = _next(queues[w], procs[w], devices[w])
            if msg[0] == "error":
                _raise_worker_error(devices[w], *msg[1:])
            if msg[0] != "block" or msg[1] != k:
                raise RuntimeError(f"worker on {devices[w]} sent {msg[0]} {msg[1:2]} where block {k} was due")
            yield BlockResult.from_message(msg)
        for w in range(n):  # each worker's last word, so that it leaves on its own
            msg = _next(queues[w], procs[w], devices[w])
            if msg[0] == "error":
                _raise_worker_error(devices[w], *msg[1:])
        for p in procs:
            p.join(30)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(10)
        for q in queues:
            q.close()
            q.cancel_join_thread()


def _next(q, proc, device: str):
    while True:
        try:
            return q.get(timeout=_POLL_S)
        except queue.Empty:
            if not proc.is_alive():
                try:  # it may have put its last words just before exiting
                    return q.get(timeout=_POLL_S)
                except queue.Empty:
                    raise RuntimeError(f"the encode worker on {device} died (exit code {proc.exitcode}) without a "
                                       "word; what was committed is safe: rerun the same command") from None


_ONE_LINE = {"ValueError", "StoreError", "FileNotFoundError", "BadImage"}


def _raise_worker_error(device: str, kind: str, message: str, tb: str):
    if kind in _ONE_LINE:
        raise ValueError(f"{device}: {message}")
    if kind == "KeyboardInterrupt":
        raise KeyboardInterrupt
    raise RuntimeError(f"the encode worker on {device} failed with {kind}: {message}\n{tb}")
