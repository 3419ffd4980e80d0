"""Results: one layout for every command's folder, one result type, and a record of the data measured.

Every command writes its output folder through this module, so the layout is the same
everywhere (README, "Evaluation")::

    OUT/report.txt            what the command printed
    OUT/metrics.json          every number; ``info.run`` says what was run, ``info.data`` on
                              which data (store or source, split, number of images, fingerprint)
    OUT/per_class.csv         \
    OUT/confusion_matrix.csv   > of the evaluation the folder holds, if it holds one
    OUT/predictions.csv       /  (key, label, prediction[, fold], proba_<class>...)
    OUT/index.html            the run's page, and OUT/plots/ its figures (:func:`render`)

``zero-shot``, ``evaluate`` and ``finetune --cv`` hold one evaluation (the CV's predictions are
out of fold, with ``folds.csv`` beside them); ``ablate-prompts`` adds ``ablation.csv`` and its
three CSVs are those of the rank-1 prompt; ``train-head`` keeps the head (``config.json``,
``model.safetensors``) and one sub-folder per evaluation, each in this layout (``cv/`` with
``folds.csv``, ``eval/`` or ``train/``); ``demo``, ``reproduce`` and ``generalisation`` have
``report.txt`` and ``metrics.json`` at the top and their steps below; ``finetune`` and
``wise-ft`` write them beside the model they save.

An evaluation folder is built beside its destination and swapped in whole
(:func:`results_dir`, :func:`clip_heads.fsutil.staged_dir`), so an interrupted run leaves the
previous results as they were. A folder already holding the results of a *different* run
(another store, prompt set, template choice or label map) is not replaced unless asked
(``overwrite=True``, ``--overwrite``); rerunning the same evaluation replaces its own results.
A folder that also holds a run's resumable work (fine-tune folds, a WiSE-FT curve's caches, a
model) is not swapped: :func:`results_files` replaces its result files one by one, each
atomically, ``metrics.json`` last; that command checks its own folder before writing.

Every evaluation command returns a :class:`Report` (``text``, ``metrics``, ``out_dir``); it
reads like the ``metrics`` mapping it wrote.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping as MappingABC
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence, Union

import numpy as np

from clip_heads.metrics import json_default
from clip_heads.tables import write_report

logger = logging.getLogger(__name__)

__all__ = ["PathLike", "REPORT", "METRICS", "PREDICTIONS", "PROBA", "INDEX", "PLOTS", "PLOTS_ENV", "Report",
           "store_fingerprint", "data_record", "source_record", "describe_data", "previous_run", "check_target",
           "results_dir", "results_files", "write_section", "write_summary", "write_json", "plots_enabled",
           "render", "slug", "default_out_dir"]

PathLike = Union[str, "os.PathLike[str]"]
REPORT, METRICS, PREDICTIONS = "report.txt", "metrics.json", "predictions.csv"
INDEX, PLOTS = "index.html", "plots"
PROBA = "proba"  # the predictions' probability matrix; predictions.csv has a proba_<class> column per class
PLOTS_ENV = "CLIP_HEADS_PLOTS"  # "0" turns figures off where a call does not say (batch sweeps, test suites)


# ---------------------------------------------------------------------------------------
# What a command returns
# ---------------------------------------------------------------------------------------
@dataclass(eq=False)
class Report(MappingABC):
    """What an evaluation command returns: ``text`` is what it prints, ``metrics`` what
    metrics.json holds, ``predictions`` the columns of predictions.csv (``key, label,
    prediction``, and ``proba``: the ``(n, n_classes)`` probabilities where the head has them),
    ``out_dir`` where it wrote (with its ``index.html``). Reads as the mapping ``metrics``
    (``report["accuracy"]``), so callers of the dicts some commands returned before still work.
    """

    kind: str
    text: str
    metrics: dict[str, Any]
    out_dir: Path | None = None
    cv: Any = None  # clip_heads.crossval.CVResult of train-head --cv
    predictions: dict[str, Any] | None = None

    def __str__(self) -> str:
        return self.text

    def __getitem__(self, key: str) -> Any:
        return self.metrics[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.metrics)

    def __len__(self) -> int:
        return len(self.metrics)

    @property
    def rows(self) -> list[dict]:
        """The ranked rows of an ablation or a WiSE-FT curve (empty for other reports)."""
        return list(self.metrics.get("rows", []))

    def summary(self) -> dict[str, Any]:
        """Headline numbers: accuracy, macro-/weighted-F1 (``*_std`` too for CV) per section."""
        def head(r: dict) -> dict[str, float]:
            return {"accuracy": r["accuracy"], "macro_f1": r["macro"]["f1"], "weighted_f1": r["weighted"]["f1"]}

        def cv(r: dict) -> dict[str, float]:
            return dict(head(r["mean"]), **{f"{k}_std": v for k, v in head(r["std"]).items()})

        m = self.metrics
        if self.kind == "ablation":
            return dict(m["rows"][0]) if m.get("rows") else {}
        if self.kind == "train":
            out: dict[str, Any] = {"cv": cv(m["cv"])} if "cv" in m else {}
            return dict(out, **{sec: head(m[sec]) for sec in ("eval", "train") if sec in m})
        if "mean" in m and "std" in m:
            return cv(m)
        return head(m) if "accuracy" in m else {}


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


def source_record(src: Any, positions: Sequence[int] | None = None) -> dict[str, Any]:
    """What a result measured on a dataset read straight from its images (a fine-tune's
    zero-shot folds): root, format, split, images used of those there, classes, fingerprint."""
    options = dict(getattr(src, "options", None) or {})
    return {"source_root": str(src.root), "source_format": src.format, "split": options.get("split"),
            "n_images": int(len(src) if positions is None else len(positions)), "source_images": int(len(src)),
            "n_classes": len(src.classes), "fingerprint": src.fingerprint()}


def describe_data(record: Mapping[str, Any]) -> str:
    """One line: ``N images (split S) of STORE, fingerprint abcdef123456``."""
    split = f", split {record['split']}" if record.get("split") else ""
    where = record.get("store") or record.get("source_root")
    return (f"{record['n_images']} images{split} of {Path(str(where)).name}, "
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


@contextlib.contextmanager
def results_files(out: PathLike) -> Iterator[Path]:
    """Write result files into ``out``, a folder that also holds a run's resumable work.

    The block writes into a staging folder inside ``out`` (as with :func:`results_dir`); when it
    ends without an error, each file is moved over its namesake in ``out`` atomically and
    durably, ``metrics.json`` last, and nothing else in ``out`` is touched. The one folder it
    may hold is ``plots/`` (:func:`render`), swapped in whole. On an error ``out`` keeps its
    previous files. The caller has checked that ``out`` is its own run's folder.
    """
    from clip_heads.fsutil import durable_replace, replace_dir, temp_sibling

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stage = temp_sibling(out / "results", "staging")
    stage.mkdir()
    try:
        yield stage
        files = sorted(p for p in stage.iterdir())
        folders = [p.name for p in files if not p.is_file() and p.name != PLOTS]
        if folders:
            raise ValueError(f"results_files writes files (and {PLOTS}/) only; {folders} are folders")
        if (stage / PLOTS).is_dir():
            replace_dir(stage / PLOTS, out / PLOTS)
        elif (out / PLOTS).is_dir() and (stage / INDEX).is_file():
            shutil.rmtree(out / PLOTS)  # a page drawn without figures: the old ones are of another run
        # metrics.json last: it marks them complete
        for p in sorted((p for p in files if p.is_file()), key=lambda p: p.name == METRICS):
            durable_replace(p, out / p.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def write_section(out: PathLike, report: dict, text: str,
                  predictions: Mapping[str, Any] | None = None) -> Path:
    """One evaluation in the layout: ``metrics.json``, ``per_class.csv``, ``confusion_matrix.csv``,
    ``report.txt`` (:func:`clip_heads.metrics.write_report`) and ``predictions.csv``, whose
    columns are the keys of ``predictions`` (``key, label, prediction[, fold]``), then, where
    ``predictions[PROBA]`` holds the ``(n, n_classes)`` probabilities, one ``proba_<class>``
    column per class of ``report`` (9 significant digits): the numbers its calibration and
    top-k accuracy were computed from."""
    out = write_report(report, out, text=text)
    if predictions is not None:
        columns = [c for c in predictions if c != PROBA]
        rows: Any = zip(*(predictions[c] for c in columns), strict=True)
        P = predictions.get(PROBA)
        header = list(columns)
        if P is not None:
            P = np.asarray(P, np.float64)
            classes = list(report["classes"])
            if P.shape[1] != len(classes):
                raise ValueError(f"{P.shape[1]} probability columns for the report's {len(classes)} classes")
            header += [f"proba_{c}" for c in classes]
            rows = (list(r) + [format(v, ".9g") for v in p] for r, p in zip(rows, P.tolist(), strict=True))
        with open(out / PREDICTIONS, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)
    return out


def write_summary(out: PathLike, metrics: dict, text: str) -> Path:
    """The top of a folder with sections: ``report.txt`` and ``metrics.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT).write_text(text)
    write_json(out / METRICS, metrics)
    return out


def write_json(path: PathLike, data: Any) -> Path:
    """``data`` as indented JSON (numpy values and paths as plain JSON)."""
    path = Path(path)
    path.write_text(json.dumps(data, indent=2, default=json_default))
    return path


def plots_enabled(plots: bool | None = None) -> bool:
    """Whether to draw figures: ``plots`` when a call says, else the environment's
    ``CLIP_HEADS_PLOTS`` (``0``, ``false``, ``no`` or ``off`` turn them off; on by default)."""
    if plots is not None:
        return bool(plots)
    return os.environ.get(PLOTS_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def render(out: PathLike, plots: bool | None = None, final: PathLike | None = None, title: str | None = None,
           notes: Sequence[str] | None = None) -> Path:
    """Draw the figures of the results folder ``out`` into ``out/plots/`` and write
    ``out/index.html`` (:func:`clip_heads.report_folder.render_folder`), from what its
    ``metrics.json`` holds. Every command calls it on the folder it writes, last, inside its
    staging folder where it has one (``final`` is the folder the staging folder becomes, whose
    name the page shows). ``plots=False`` writes the page without figures; ``notes`` replace the
    page's note saying so."""
    from clip_heads.report_folder import render_folder

    return render_folder(out, plots=plots_enabled(plots), title=title,
                         name=Path(final).name if final is not None else None, final=final, notes=notes)


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
