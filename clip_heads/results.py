"""Results folders: one layout for every evaluation command, and a record of the data measured.

Every command that scores something writes its output folder through this module, so the
layout is the same everywhere (README, "Evaluation")::

    OUT/report.txt            what the command printed
    OUT/metrics.json          every number; ``info.run`` says what was evaluated, ``info.data``
                              on which data (store, split, number of images, fingerprint)
    OUT/per_class.csv         \
    OUT/confusion_matrix.csv   > of the evaluation the folder holds
    OUT/predictions.csv       /  (key, label, prediction[, fold])

``zero-shot`` and ``evaluate`` hold one evaluation; ``ablate-prompts`` adds ``ablation.csv``
and its three CSVs are those of the rank-1 prompt; ``train-head`` keeps the head
(``config.json``, ``model.safetensors``) and one sub-folder per evaluation, each in this
layout (``cv/`` with ``folds.csv``, ``eval/`` or ``train/``); ``demo`` and ``reproduce``
have ``report.txt`` and ``metrics.json`` at the top and one sub-folder per step.

A folder is built beside its destination and swapped in whole (:func:`clip_heads.fsutil.staged_dir`),
so an interrupted run leaves the previous results as they were. A folder already holding the
results of a *different* run (another store, prompt set, template choice or label map) is not
replaced unless asked (``overwrite=True``, ``--overwrite``); rerunning the same evaluation
replaces its own results.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence, Union

import numpy as np

from clip_heads.metrics import json_default, write_report

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
REPORT, METRICS, PREDICTIONS = "report.txt", "metrics.json", "predictions.csv"


# ---------------------------------------------------------------------------------------
# What data a result measured
# ---------------------------------------------------------------------------------------
def store_fingerprint(store: Any) -> str:
    """Content fingerprint of a store's data: sha256 hex of the model identity (id, revision,
    hash), the source fingerprint, the class names, and every key and label in order.

    Two encodes of the same images with the same model have the same fingerprint, wherever the
    files lie and whatever their vector dtype; another sample, label set or model does not.
    ``store`` is a path or an open :class:`clip_heads.store.FeatureStore`.
    """
    from clip_heads.store import FeatureStore, open_store

    if isinstance(store, FeatureStore):
        return _fingerprint(store)
    with open_store(store) as s:
        return _fingerprint(s)


def _fingerprint(s: Any) -> str:
    a = s.attrs
    head = {"model_id": a.get("model_id"), "model_revision": a.get("model_revision"),
            "model_hash": a.get("model_hash"), "dim": a.get("dim"),
            "source_fingerprint": a.get("source_fingerprint"), "classes": s.classes}
    h = hashlib.sha256(json.dumps(head, sort_keys=True, default=str).encode())
    for key in s.keys:
        h.update(key.encode() + b"\0")
    h.update(np.ascontiguousarray(s.labels, dtype="<i8").tobytes())
    return h.hexdigest()


def data_record(store: PathLike, split: str | None = None) -> dict[str, Any]:
    """What a result was measured on: store path, split, image count, classes, fingerprint.

    ``split`` overrides the split recorded in the store's source options (the demo knows it
    opened the ``test/`` folder of an image-folder copy, say).
    """
    from clip_heads.store import open_store

    with open_store(store) as s:
        src = s.attrs.get("source") or {}
        labels = s.labels
        record = {
            "store": str(store),
            "split": split or (src.get("options") or {}).get("split"),
            "n_images": int(len(labels)),
            "n_labelled": int((labels >= 0).sum()),
            "n_classes": len(s.classes),
            "source_format": src.get("format"),
            "source_root": src.get("root"),
            "source_images": src.get("n"),
            "limit": src.get("limit"),
            "n_skipped": s.progress["skipped"],
            "fingerprint": _fingerprint(s),
        }
    return record


def describe_data(record: Mapping[str, Any]) -> str:
    """One line: ``N images (split S) of STORE, fingerprint abcdef123456``."""
    split = f", split {record['split']}" if record.get("split") else ""
    return (f"{record['n_images']} images{split} of {Path(str(record['store'])).name}, "
            f"fingerprint {str(record['fingerprint'])[:12]}")


# ---------------------------------------------------------------------------------------
# Writing a folder
# ---------------------------------------------------------------------------------------
def _normal(run: Mapping[str, Any]) -> dict:
    return json.loads(json.dumps(dict(run), default=json_default, sort_keys=True))


def _describe_run(run: Mapping[str, Any] | None) -> str:
    if not run:
        return "no record of what was run"
    return ", ".join(f"{k}={v}" for k, v in run.items() if v not in (None, [], ""))


def previous_run(out: PathLike) -> dict | None:
    """The ``info.run`` record of the results in ``out``, or None."""
    path = Path(out) / METRICS
    try:
        info = json.loads(path.read_text()).get("info") or {}
    except (OSError, ValueError, AttributeError):
        return None
    return info.get("run") if isinstance(info, dict) else None


def check_target(out: PathLike, run: Mapping[str, Any], overwrite: bool = False) -> None:
    """Refuse to replace a folder holding anything but the results of this same ``run``.

    Raises ``FileExistsError`` naming both runs (or ``NotADirectoryError`` for a file), unless
    ``overwrite``. An empty or missing folder is always fine.
    """
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise NotADirectoryError(f"output folder {out} is a file")
    if overwrite or not any(out.iterdir()):
        return
    prev = previous_run(out)
    if prev == _normal(run):
        return
    held = f"the results of another run ({_describe_run(prev)})" if prev else "files that are not results of this run"
    raise FileExistsError(f"{out} holds {held}; this run is {_describe_run(_normal(run))}. Pass --overwrite "
                          f"(overwrite=True) to replace them, or choose another --out")


@contextlib.contextmanager
def results_dir(out: PathLike, run: Mapping[str, Any], overwrite: bool = False,
                keep_existing: bool = False) -> Iterator[Path]:
    """Build the results folder ``out`` in a staging folder and swap it in when the block ends.

    :func:`check_target` runs first. ``keep_existing`` starts from a copy of what ``out``
    holds (train-head keeps files a user put beside the head); by default the folder is
    replaced whole. On an error the previous folder is left as it was.
    """
    from clip_heads.fsutil import staged_dir

    check_target(out, run, overwrite)
    with staged_dir(out, copy_existing=keep_existing) as stage:
        yield stage


def write_section(out: PathLike, report: dict, text: str,
                  predictions: Mapping[str, Sequence[Any]] | None = None) -> Path:
    """One evaluation in the layout: ``metrics.json``, ``per_class.csv``, ``confusion_matrix.csv``,
    ``report.txt`` (:func:`clip_heads.metrics.write_report`) and ``predictions.csv``, whose
    columns are the keys of ``predictions`` (``key, label, prediction[, fold]``)."""
    out = write_report(report, out, text=text)
    if predictions is not None:
        columns = list(predictions)
        with open(out / PREDICTIONS, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(columns)
            w.writerows(zip(*(predictions[c] for c in columns)))
    return out


def write_summary(out: PathLike, metrics: dict, text: str) -> Path:
    """The top of a folder with sections: ``report.txt`` and ``metrics.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT).write_text(text)
    (out / METRICS).write_text(json.dumps(metrics, indent=2, default=json_default))
    return out


def slug(value: Any, limit: int = 40) -> str:
    """A file-name-safe piece naming a value (a prompt set, a label map file, template ids)."""
    text = str(value)
    if isinstance(value, (str, os.PathLike)) and (os.sep in text or text.endswith((".json", ".txt"))):
        text = Path(text).stem  # a file: its name says what it is
    keep = "".join(ch if ch.isalnum() or ch in "._-" else "-" for ch in text).strip("-.") or "x"
    if len(keep) > limit:
        keep = keep[: limit - 9] + "-" + hashlib.sha256(text.encode()).hexdigest()[:8]
    return keep


def default_out_dir(command: str, *parts: Any, root: PathLike = "cache") -> Path:
    """``cache/<command>/<part>-<part>...``: the CLI's default output folder, named after what
    is evaluated so that different evaluations never share one (empty parts are left out)."""
    names = [slug(p) for p in parts if p not in (None, "", [], ())]
    return Path(root) / command / ("-".join(names) or "default")
