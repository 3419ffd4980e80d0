"""Shards of one encode: which one this process is, where it goes, and whether it is done.

``--shard auto`` takes the shard from the scheduler that launched the process: a Slurm job
array (``SLURM_ARRAY_TASK_ID`` - ``SLURM_ARRAY_TASK_MIN``, stepped by ``SLURM_ARRAY_TASK_STEP``,
of ``SLURM_ARRAY_TASK_COUNT``) or torchrun / torch.distributed (``RANK`` of ``WORLD_SIZE``, and
``LOCAL_RANK`` picks the GPU). Every task runs the same command line, so the store of shard
``i`` of ``n`` is named after ``--out``: ``data.h5`` -> ``data.shard-00003-of-00064.h5``, and
``clip-heads merge data.h5`` finds them all.

A finished shard leaves a done-marker beside its store (``<shard store>.done``, JSON: a digest
of the arguments that made it and the store's ``created`` stamp). A rerun of the whole array
finds the marker and returns at once, before listing the source or hashing the model, so only
the shards that did not finish do any work. The marker trusts the arguments: after changing the
images under the same path, rerun with ``--overwrite``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping

logger = logging.getLogger(__name__)

SHARD_NAME = re.compile(r"(?P<stem>.+)\.shard-(?P<i>\d+)-of-(?P<n>\d+)(?P<suffix>\.[^.]*)?")
_SLURM = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT")
_TORCH = ("RANK", "WORLD_SIZE")


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"--shard auto: {name}={env[name]!r} is not an integer") from None


def auto_shard(env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """``(i, n)`` of this process from a Slurm job array or torchrun; ValueError when neither is set."""
    env = os.environ if env is None else env
    if all(k in env for k in _SLURM):
        task, count = _int(env, "SLURM_ARRAY_TASK_ID"), _int(env, "SLURM_ARRAY_TASK_COUNT")
        low = _int(env, "SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in env else 0
        step = _int(env, "SLURM_ARRAY_TASK_STEP") if "SLURM_ARRAY_TASK_STEP" in env else 1
        if step < 1 or (task - low) % step:
            raise ValueError(f"--shard auto: SLURM_ARRAY_TASK_ID={task} is not on the array's grid "
                             f"(min {low}, step {step})")
        i, n, where = (task - low) // step, count, "the Slurm array"
    elif all(k in env for k in _TORCH):
        i, n, where = _int(env, "RANK"), _int(env, "WORLD_SIZE"), "torchrun (RANK/WORLD_SIZE)"
    else:
        raise ValueError("--shard auto needs a Slurm job array (SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT, e.g. "
                         "sbatch --array=0-63) or torchrun (RANK and WORLD_SIZE); neither is set: use --shard I/N")
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"--shard auto: {where} gives shard {i} of {n}, which is not 0 <= I < N")
    return i, n


def auto_device(device: str, env: Mapping[str, str] | None = None) -> str:
    """Under torchrun, ``--device auto`` means this rank's GPU (``cuda:LOCAL_RANK``)."""
    env = os.environ if env is None else env
    if device != "auto" or "LOCAL_RANK" not in env:
        return device
    import torch

    return f"cuda:{_int(env, 'LOCAL_RANK')}" if torch.cuda.is_available() else device


def shard_path(out: str | os.PathLike, i: int, n: int) -> Path:
    """``data.h5`` -> ``data.shard-00003-of-00064.h5``."""
    out = Path(out)
    width = max(5, len(str(n - 1)))
    return out.with_name(f"{out.stem}.shard-{i:0{width}d}-of-{n:0{width}d}{out.suffix}")


def find_shards(out: str | os.PathLike) -> list[Path]:
    """The shard stores of ``out`` written by ``--shard auto``, in shard order; an error naming
    the missing ones when the set is not whole (or mixes shard counts)."""
    out = Path(out)
    found: dict[int, dict[int, Path]] = {}
    for p in out.parent.glob(f"{out.stem}.shard-*-of-*{out.suffix}"):
        m = SHARD_NAME.fullmatch(p.name)
        if m and m["stem"] == out.stem and (m["suffix"] or "") == out.suffix:
            found.setdefault(int(m["n"]), {})[int(m["i"])] = p
    if not found:
        raise FileNotFoundError(f"no shard stores of {out} ({shard_path(out, 0, 1).name.replace('00000-of-00001', 'I-of-N')}) "
                                f"in {out.parent}; name the shards: clip-heads merge {out} SHARD...")
    if len(found) > 1:
        raise ValueError(f"shard stores of {out} for different shard counts {sorted(found)} are in {out.parent}; "
                         "name the ones to merge")
    (n, have), = found.items()
    missing = [shard_path(out, i, n).name for i in range(n) if i not in have]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise FileNotFoundError(f"{len(missing)} of the {n} shard stores of {out} are missing: "
                                f"{', '.join(missing[:5])}{more}; rerun the array (finished shards are skipped)")
    return [have[i] for i in range(n)]


# ---------------------------------------------------------------------------------------
# Done-markers
# ---------------------------------------------------------------------------------------
def marker_path(store: str | os.PathLike) -> Path:
    return Path(f"{store}.done")


def run_digest(args: Mapping[str, Any]) -> str:
    """A digest of the arguments that decide a shard's content (json, keys sorted)."""
    return "sha256:" + hashlib.sha256(json.dumps(args, sort_keys=True, default=str).encode()).hexdigest()


def _created(store: Path) -> str | None:
    import h5py

    from .store import birth

    try:
        with h5py.File(store, "r", locking=False) as f:
            return birth(f.attrs) if f.attrs.get("complete", False) else None
    except (OSError, KeyError):
        return None


def is_done(store: str | os.PathLike, digest: str) -> dict | None:
    """The marker of ``store`` if it says this store was finished by a run with these arguments
    and the store at that path is still the one it finished; else None."""
    from .folders import read_json

    store, marker = Path(store), marker_path(store)
    if not marker.is_file() or not store.is_file():
        return None
    try:
        m = read_json(str(marker), "done-marker", max_bytes=1 << 16)
    except ValueError as e:
        logger.warning("ignoring %s: %s", marker, e)
        return None
    if not isinstance(m, dict) or m.get("run") != digest:
        return None
    return m if m.get("created") == _created(store) else None


def mark_done(store: str | os.PathLike, digest: str, **info: Any) -> Path:
    """Write the done-marker of a finished ``store`` (atomically)."""
    from .fsutil import atomic_write_text

    created = _created(Path(store))
    if created is None:
        raise ValueError(f"{store} is not a complete store; no done-marker written")
    return atomic_write_text(marker_path(store), json.dumps(dict(info, run=digest, created=created), sort_keys=True) + "\n")
