"""Applying a saved head at scale: encode and classify in one streaming pass, no store.

``predict(head_dir, source, out)`` (``clip-heads predict HEAD_DIR SOURCE --out predictions.parquet``)
runs the head's backbone over the source with any engine (:mod:`clip_heads.engines`: this
process, ``devices``, or ``engine="ray"``) and, block by block as the engine hands them back
in source order, turns the vectors into the same vectors a store would hold (L2-normalised,
rounded to the store dtype), scores them with ``Head.predict_proba`` and appends the rows to a
parquet file (``pyarrow.parquet.ParquetWriter``, one row group per ``row_group_rows``). Memory
does not grow with the number of images: a block of vectors, one unwritten row group, and the
``top_k`` best images per class, kept on the fly.

Rows, one per item of the source, in source order: ``key``, ``label`` (the source's class, when
it has one), ``prediction``, ``probability`` (of the prediction), ``p_<class>`` per head class,
and ``skipped`` (why an image could not be read; its prediction is then empty). The file's
schema metadata ``clip_heads`` records the head, its classes, the model identity and the
source. With ``top_k``, ``<out stem>.top<K>.json`` lists per class the K keys of highest
probability. The file appears at ``out`` only once complete (written beside it, then renamed).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

logger = logging.getLogger(__name__)

_INSTALL_HINT = "pip install 'clip-heads[parquet]' (or: pip install pyarrow)"


@dataclass
class PredictResult:
    path: Path
    n_rows: int
    n_skipped: int
    top_k_path: Path | None = None


class TopK:
    """Per class, the ``k`` items of highest probability seen so far (ties: the earlier item)."""

    def __init__(self, classes: Sequence[str], k: int) -> None:
        self.classes, self.k = list(classes), int(k)
        self.scores = np.full((len(self.classes), 0), -np.inf)
        self.order = np.zeros((len(self.classes), 0), np.int64)  # item number, to break ties
        self.keys = np.zeros((len(self.classes), 0), dtype=object)

    def update(self, probs: np.ndarray, keys: Sequence[str], first: int) -> None:
        """Fold in a block: ``probs`` ``(n, n_classes)`` of items ``first, first + 1, ...``."""
        if not len(keys) or not self.k:
            return
        n = len(keys)
        scores = np.concatenate([self.scores, probs.T.astype(np.float64)], axis=1)
        order = np.concatenate([self.order, np.broadcast_to(np.arange(first, first + n), (len(self.classes), n))], axis=1)
        names = np.concatenate([self.keys, np.broadcast_to(np.asarray(keys, dtype=object), (len(self.classes), n))], axis=1)
        # Best first: highest score, then earliest item.
        idx = np.lexsort((order, -scores), axis=1)[:, :self.k]
        self.scores = np.take_along_axis(scores, idx, 1)
        self.order = np.take_along_axis(order, idx, 1)
        self.keys = np.take_along_axis(names, idx, 1)

    def table(self) -> dict[str, list[dict[str, Any]]]:
        return {c: [{"key": str(k), "probability": float(s)} for k, s in zip(self.keys[i], self.scores[i], strict=True)]
                for i, c in enumerate(self.classes)}


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ValueError(f"predict writes parquet with pyarrow, which is not installed: {_INSTALL_HINT}") from e
    return pa, pq


def predict(
    head_dir: str | os.PathLike,
    source: str,
    out: str | os.PathLike,
    *,
    model: str | None = None,
    format: str = "auto",
    source_options: dict[str, Any] | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    dtype: str = "float16",
    normalize: bool = True,
    top_k: int = 0,
    engine: str = "local",
    devices: str | Sequence[str] | None = None,
    ray_options: dict[str, Any] | None = None,
    overwrite: bool = False,
    row_group_rows: int = 8192,
    progress: bool = True,
) -> PredictResult:
    """Score every image of ``source`` with the head saved in ``head_dir``; rows to ``out`` (parquet).

    Parameters
    ----------
    model : the model to embed with (any family); default the head's own (``backbone.model_id`` in its
        config). The model's identity (id, weights hash, dim) is checked against the head's.
    dtype, normalize : how the head's training vectors were stored (default: normalised, float16,
        as ``encode`` stores them); the vectors are made the same before they are scored.
    top_k : keep the ``top_k`` items of highest probability per class (``<out stem>.top<K>.json``).
    engine, devices, ray_options, batch_size, workers, device, precision : as :func:`clip_heads.encode`.
    """
    from tqdm.auto import tqdm

    from .backbones.model import Backbone, resolve_precision
    from .datasets import open_source
    from .engines import ENGINES, EmbedJob, parse_devices, plan_blocks, worker_model
    from .runner import Runner
    from .fsutil import durable_replace, exclusive_lock, temp_sibling
    from .heads.base import Head
    from .store import l2_normalize
    from .fsutil import remove_stale_siblings

    pa, pq = _pyarrow()
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1; got {batch_size}")
    if top_k < 0:
        raise ValueError(f"--top-k must be >= 0; got {top_k}")
    if dtype not in ("float16", "float32"):
        raise ValueError(f"unknown dtype {dtype!r}; valid: float16, float32")
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; valid: {', '.join(ENGINES)}")
    devices = parse_devices(devices)
    if devices and len(devices) == 1:
        device, devices = devices[0], None
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    head = Head.from_pretrained(head_dir)
    recorded = dict(getattr(head, "backbone_", None) or {})
    model = model or recorded.get("model_id")
    if not model:
        raise ValueError(f"the head in {head_dir} records no backbone model; name it with --model")
    classes = [str(c) for c in head.classes_]
    with exclusive_lock(out, "predict"):
        src = open_source(source, format=format, **(source_options or {}))
        backbone = Backbone(model, device=devices[0] if devices else device, precision=precision)
        head.check_backbone(backbone.model_id, backbone.identity["model_hash"], backbone.dim)
        runner = Runner(engine, backbone, devices, workers, ray_options, progress)
        remove_stale_siblings(out)
        tmp = temp_sibling(out, "build")
        n_rows = n_skipped = 0
        topk = TopK(classes, top_k)
        schema = pa.schema([("key", pa.string())] + ([("label", pa.string())] if src.classes else []) +
                           [("prediction", pa.string()), ("probability", pa.float32())] +
                           [(f"p_{c}", pa.float32()) for c in classes] + [("skipped", pa.string())],
                           metadata={"clip_heads": json.dumps({
                               "head": str(head_dir), "head_name": head.name, "classes": classes,
                               "model": backbone.identity, "source": src.describe(), "normalized": normalize,
                               "dtype": dtype})})
        try:
            positions = np.arange(len(src))
            job = EmbedJob(src, positions, plan_blocks(len(positions), 0, batch_size), backbone.preprocess,
                           worker_model(model) if backbone.model_id == str(model) else backbone.model_id,
                           backbone.identity, resolve_precision(runner.device, precision))
            rows = _Rows(schema, classes, bool(src.classes))
            bar = tqdm(total=len(src), unit="img", desc="predict", disable=not progress, smoothing=0.1)
            results = runner.blocks(job)
            try:
                with pq.ParquetWriter(tmp, schema) as pw:
                    for r in results:
                        probs = np.zeros((0, len(classes)))
                        if r.good:
                            X = l2_normalize(r.embeds) if normalize else r.embeds
                            probs = head.predict_proba(X.astype(dtype).astype(np.float32))
                            topk.update(probs, [src.keys[i] for i in r.good], n_rows)
                        rows.add(src, r, probs)
                        n_rows += r.n
                        n_skipped += len(r.bad)
                        if len(rows) >= row_group_rows:
                            pw.write_table(rows.flush())
                        bar.update(r.n)
                    if len(rows):
                        pw.write_table(rows.flush())
            finally:
                close = getattr(results, "close", None)
                if close is not None:
                    close()
                bar.close()
            durable_replace(tmp, out)
        finally:
            runner.close()
            tmp.unlink(missing_ok=True)
        top_path = None
        if top_k:
            from .fsutil import atomic_write_text

            top_path = out.with_name(f"{out.stem}.top{top_k}.json")
            atomic_write_text(top_path, json.dumps(topk.table(), indent=1) + "\n")
    logger.info("wrote %s: %d rows (%d skipped)", out, n_rows, n_skipped)
    return PredictResult(out, n_rows, n_skipped, top_path)


class _Rows:
    """The rows of the row group being built, in source order."""

    def __init__(self, schema, classes: list[str], labelled: bool) -> None:
        self.schema, self.classes, self.labelled = schema, classes, labelled
        self.prob_columns = {f"p_{c}": i for i, c in enumerate(classes)}
        self._clear()

    def _clear(self) -> None:
        self.cols: dict[str, list] = {name: [] for name in self.schema.names if name not in self.prob_columns}
        self.probs: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self.cols["key"])

    def add(self, src, r, probs: np.ndarray) -> None:
        at = {p: j for j, p in enumerate(r.good)}
        why = dict(r.bad)
        block = np.full((r.n, len(self.classes)), np.nan, np.float32)
        for row, p in enumerate(sorted(list(at) + list(why))):
            c = self.cols
            c["key"].append(src.keys[p])
            if self.labelled:
                lab = int(src.labels[p])
                c["label"].append(src.classes[lab] if lab >= 0 else None)
            if p in at:
                pr = probs[at[p]]
                best = int(np.argmax(pr))
                c["prediction"].append(self.classes[best])
                c["probability"].append(float(pr[best]))
                block[row] = pr
                c["skipped"].append(None)
            else:
                c["prediction"].append(None)
                c["probability"].append(None)
                c["skipped"].append(why[p])
        self.probs.append(block)

    def flush(self):
        import pyarrow as pa

        probs = np.concatenate(self.probs) if self.probs else np.zeros((0, len(self.classes)), np.float32)
        arrays = []
        for name in self.schema.names:
            if name in self.prob_columns:
                col = probs[:, self.prob_columns[name]]
                arrays.append(pa.array(col, pa.float32(), mask=np.isnan(col)))
            else:
                arrays.append(pa.array(self.cols[name], self.schema.field(name).type))
        table = pa.Table.from_arrays(arrays, schema=self.schema)
        self._clear()
        return table
