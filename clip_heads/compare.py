"""``clip-heads compare``: one table across many runs.

:func:`read_run` turns a results folder (train-head, zero-shot, evaluate, few-shot: one entry
per head and shot count, ablate-prompts, fine-tune CV, generalisation: one entry per alpha and
side) into *entries*, one per evaluation it
holds, each with the attributes runs are
grouped by (head, model, prompt set, store) and its headline metrics (per fold where it has
folds). :func:`compare_runs` groups the entries and writes ``comparison.csv``,
``comparison.md`` and a grouped bar chart (``comparison.png``/``.svg``).

Rules:

* An evaluation's protocol (``cv``, ``held-out``, ``resubstitution``, ``test``) is always part
  of the group: a CV mean is never averaged with a score on training data.
* A group's value is the mean ± std (``ddof=0``) over its folds when it is one CV run (over its
  seeds for one few-shot cell), and over its runs (seeds) when it holds several, each run
  counting with its own (fold- or seed-mean) value.
* Runs measured on different data (store fingerprints) are never merged into one row unless
  ``allow_mixed_data``; the row's ``data`` column then lists every fingerprint. Group by
  ``store`` (the default) to give each data set its own row.
* A folder that cannot be read is reported by name with the reason (logged, listed in
  comparison.md and metrics.json); only when no folder can be read is it an error.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np

from .errors import BadValueError
from .report_folder import read_record

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
BY = ("head", "model", "prompt_set", "store")
METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "macro_precision", "macro_recall",
           "weighted_precision", "weighted_recall")
CHART_METRICS = ("accuracy", "macro_f1", "weighted_f1")
UNKNOWN = "unknown"
READABLE = "train-head, zero-shot, evaluate, few-shot, ablate-prompts, fine-tune CV and generalisation"


class MixedDataError(BadValueError):
    """Runs on different data would be merged into one row (a bad value: pass --allow-mixed-data)."""


@dataclass
class Entry:
    """One evaluation of one run: grouping attributes and metric values (one per fold for CV)."""

    run: str
    attrs: dict[str, str]
    values: dict[str, list[float]]
    data: str  # the fingerprint of the data scored ("unknown" where the run did not record it)
    data_name: str = ""
    seed: Any = None
    notes: list[str] = field(default_factory=list)
    over: str = "folds"  # what a run's several values are of: its CV folds, or (few-shot) its seeds


def _headline(r: dict) -> dict[str, float]:
    return {"accuracy": r["accuracy"], "balanced_accuracy": r.get("balanced_accuracy"),
            "macro_f1": r["macro"]["f1"], "weighted_f1": r["weighted"]["f1"],
            "macro_precision": r["macro"]["precision"], "macro_recall": r["macro"]["recall"],
            "weighted_precision": r["weighted"]["precision"], "weighted_recall": r["weighted"]["recall"]}


def _values(report: dict) -> dict[str, list[float]]:
    """Per-fold values of a CV report (recomputed from its folds), or the one value of a report."""
    reps = report["folds"] if report.get("kind") == "cv" else [report]
    rows = [_headline(r) for r in reps]
    return {m: [float(r[m]) for r in rows] for m in METRICS if all(r.get(m) is not None for r in rows)}


def _fingerprint(info: dict) -> tuple[str, str]:
    data = info.get("data") or {}
    fp = data.get("fingerprint")
    name = Path(str(data.get("store") or info.get("store") or "")).name
    return (str(fp) if fp else UNKNOWN), name


def _finetune_identity(folder: Path) -> dict:
    """A fine-tune CV's model and data, from its first fold's train_log.json."""
    for log in sorted(folder.glob("fold-*/train_log.json")):
        try:
            return json.loads(log.read_text()).get("identity") or {}
        except (OSError, ValueError):
            continue
    return {}


def read_run(folder: PathLike) -> list[Entry]:
    """The evaluations of one results folder as entries (see :func:`_read_run`); a record of a
    known kind with a section missing raises ``ValueError`` naming the missing key."""
    try:
        return _read_run(Path(folder))
    except KeyError as e:
        raise ValueError(f"{Path(folder) / 'metrics.json'} lacks {e} (written by another version, or cut short)") from e


def _read_run(folder: Path) -> list[Entry]:
    """The evaluations of one results folder as entries.

    Raises ``FileNotFoundError`` / ``ValueError`` naming the folder and what it lacks when it
    holds nothing this function can read (a demo's or reproduce's top folder: pass their step
    folders instead; a comparison; a file that is not JSON).
    """
    path = folder / "metrics.json"
    if not path.is_file():
        if (folder / "generalisation.json").is_file():
            raise ValueError(f"{folder} is a generalisation run written before its metrics.json was: rerun "
                             f"`clip-heads generalisation` with the same arguments (its scores are cached) to add it")
        raise FileNotFoundError(f"{folder} has no metrics.json: not a clip-heads results folder")
    m = read_record(path)
    info = m.get("info") or {}
    run = info.get("run") or {}
    command = run.get("command")
    name = str(folder)
    if command == "compare":
        raise ValueError(f"{folder} is a comparison, not a run")
    if command == "train-head":
        head, seed = info.get("head") or run.get("head"), info.get("seed", run.get("seed"))
        base = {"head": str(head), "model": str(info.get("model_id", UNKNOWN)),
                "prompt_set": str(run.get("prompt_set") or "(default)")}
        out = []
        for sec, protocol in (("cv", "cv"), ("eval", "held-out"), ("train", "resubstitution")):
            if sec not in m:
                continue
            rep = m[sec]
            sec_info = info if sec == "cv" else rep.get("info") or {}
            if sec == "eval" and sec_info.get("resubstitution"):
                protocol = "resubstitution"
            fp, dname = _fingerprint(sec_info if sec != "cv" else info)
            k = f"{rep['k']}-fold cv" if sec == "cv" else protocol
            out.append(Entry(name, dict(base, protocol=k, store=fp[:12]), _values(rep), fp, dname, seed))
        if not out:
            raise ValueError(f"{path} is a train-head record without a cv, eval or train section")
        return out
    if command in ("zero-shot", "evaluate"):
        fp, dname = _fingerprint(info)
        head = "zero-shot" if command == "zero-shot" else str(info.get("head", UNKNOWN))
        prompt = info.get("prompt_set") or run.get("prompt_set") or ("(default)" if command == "evaluate" else UNKNOWN)
        if command == "zero-shot" and run.get("templates") is not None:
            prompt = f"{prompt} t{','.join(map(str, run['templates']))}"
        protocol = "resubstitution" if info.get("resubstitution") else "test"
        return [Entry(name, {"head": head, "model": str(info.get("model_id", UNKNOWN)), "prompt_set": str(prompt),
                             "protocol": protocol, "store": fp[:12]}, _values(m), fp, dname)]
    if command == "ablate-prompts":
        top = m["rows"][0]
        fp, dname = _fingerprint(info)
        prompt = f"{top['prompt_set']}: {top['template']}"
        model = (m.get("rank1", {}).get("info") or {}).get("model_id") or UNKNOWN
        e = Entry(name, {"head": "zero-shot", "model": str(model), "prompt_set": prompt,
                         "protocol": "test, best of ablation", "store": fp[:12]}, _values(m["rank1"]), fp, dname,
                  notes=["rank-1 prompt chosen on the same data it is scored on (optimistic)"])
        return [e]
    if command == "generalisation":
        return _generalisation_entries(name, m, info, run)
    if command == "few-shot":
        return _few_shot_entries(folder, info, run)
    if m.get("kind") == "cv" and "folds" in m:  # fine-tune CV: summarize_folds written as is
        ident = _finetune_identity(folder)
        src = ident.get("source")
        fp = f"source:{src}" if src else UNKNOWN
        e = Entry(name, {"head": "finetune", "model": str(ident.get("model_id", UNKNOWN)),
                         "prompt_set": "(captions)" if ident.get("templates") else UNKNOWN,
                         "protocol": f"{m['k']}-fold cv", "store": fp[:19]}, _values(m), fp, "",
                  ident.get("seed", m.get("seed")))
        if not ident:
            e.notes.append("no fold train_log.json: model and data unknown")
        return [e]
    if "steps" in m or (folder / "tables.md").is_file() or any((folder / d / "metrics.json").is_file()
                                                               for d in ("zero-shot", "heads")):
        raise ValueError(f"{folder} is a demo/reproduce summary: pass the step folders under it")
    if command == "wise-ft":
        raise ValueError(f"{folder} holds WiSE-FT model blends, not scores: compare their generalisation run "
                         f"(`clip-heads generalisation`) or the zero-shot of a store each blend encoded")
    raise ValueError(f"{path} is not a results record compare can read (no info.run.command; "
                     f"readable: {READABLE})")


def _few_shot_entries(folder: Path, info: dict, run: dict) -> list[Entry]:
    """A few-shot grid: one entry per head and shot count, its values one per seed (from
    few_shot.csv, as fractions like every other run's)."""
    path = folder / "few_shot.csv"
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise ValueError(f"{folder} is a few-shot run without a readable few_shot.csv ({e})") from e
    fp, dname = _fingerprint(info)
    model = str(info.get("model_id") or UNKNOWN)
    prompt = str(run.get("prompt_set") or "(none)")
    cells: dict[tuple[str, str], dict[str, list[float]]] = {}
    for r in rows:
        cell = cells.setdefault((r["head"], r["shots"]), {"accuracy": [], "macro_f1": [], "seed": []})
        cell["accuracy"].append(float(r["accuracy"]))
        cell["macro_f1"].append(float(r["macro_f1"]))
        cell["seed"].append(r["seed"])
    if not cells:
        raise ValueError(f"{path} holds no scored head")
    split = run.get("split") or run.get("protocol") or "test split"
    out = []
    for (head, shots), v in cells.items():
        protocol = f"few-shot {shots}-shot" if shots != "all" else "few-shot all training images"
        e = Entry(str(folder), {"head": head, "model": model, "prompt_set": prompt, "protocol": protocol,
                                "store": fp[:12]}, {"accuracy": v["accuracy"], "macro_f1": v["macro_f1"]}, fp, dname,
                  ",".join(v["seed"]), notes=[f"few-shot: shots drawn from the training part, scored on the test "
                                                f"part ({split})"], over="seeds")
        out.append(e)
    return out


def _generalisation_entries(name: str, m: dict, info: dict, run: dict) -> list[Entry]:
    """A generalisation run: one entry per alpha and side (held-out A, all of B), each the
    zero-shot of that WiSE-FT blend (alpha 0: the zero-shot model, 1: the fine-tuned one)."""
    data = info.get("data") or {}
    out = []
    for alpha, sides in m["reports"].items():
        for side, protocol in (("a", f"held-out 1/{run.get('holdout')} of A (fine-tune data)"),
                               ("b", "zero-shot on B (other data)")):
            rep = sides.get(side)
            if not rep:
                continue  # nothing of A was held out
            d = data.get(side) or {}
            fp = f"source:{d['fingerprint']}" if d.get("fingerprint") else UNKNOWN
            head = f"WiSE-FT alpha {float(alpha):.2f}"
            out.append(Entry(name, {"head": head, "model": str(run.get("model", UNKNOWN)), "prompt_set": "(captions)",
                                    "protocol": protocol, "store": fp[:19]}, _values(rep), fp,
                             Path(str(d.get("source_root") or "")).name, run.get("seed"),
                             notes=[f"{head}: fine-tuned {run.get('finetuned')} blended with {run.get('model')}"]))
    if not out:
        raise ValueError(f"{name}/metrics.json is a generalisation record without any scored alpha")
    return out


@dataclass
class Comparison:
    """The grouped table: ``rows`` (dicts, in first-seen order), what could not be read."""

    by: list[str]
    rows: list[dict[str, Any]]
    unreadable: list[tuple[str, str]]
    metrics: list[str]

    def to_markdown(self, digits: int = 3) -> str:
        cols = [*self.by, "protocol", "data", "n"]
        head = "| " + " | ".join(cols + [m.replace("_", "-") for m in self.metrics]) + " |"
        lines = [head, "|" + "---|" * (len(cols) + len(self.metrics))]
        for r in self.rows:
            cells = [str(r[c]).replace("|", "\\|") for c in (*self.by, "protocol", "data_short")]
            cells.append(f"{r['n']} {r['over']}" if r["over"] else "1")
            for m in self.metrics:
                mean, std = r.get(f"{m}_mean"), r.get(f"{m}_std")
                cells.append("–" if mean is None else f"{mean:.{digits}f}" if r["n"] == 1
                             else f"{mean:.{digits}f} ± {std:.{digits}f}")
            lines.append("| " + " | ".join(cells) + " |")
        notes = ["", "mean ± std (ddof=0) over the folds of one CV run or the seeds of one few-shot cell, or over "
                 "the runs (seeds) of a row; "
                 "`data` is the fingerprint of the data scored (store content, or `source:` for a fine-tune's "
                 "dataset), `unknown` where the run did not record it."]
        for r in self.rows:
            if r["mixed_data"]:
                notes.append(f"- **mixed data** in row {r['label']!r}: {r['data_short']} (merged on request)")
            if r["merged_over"]:
                notes.append(f"- row {r['label']!r} merges runs differing in {r['merged_over']}")
            for n in r["notes"]:
                notes.append(f"- row {r['label']!r}: {n}")
        if self.unreadable:
            notes += ["", "Not read:"] + [f"- `{p}`: {why}" for p, why in self.unreadable]
        return "\n".join(lines + notes) + "\n"

    def chart_labels(self) -> tuple[list[str], dict[str, str]]:
        """One label per row (an attribute a line; a store by its file name and fingerprint) and
        the attributes every row shares, said once instead."""
        def show(r: dict, c: str) -> str:
            if c == "store":
                names = r["data_names"].replace(";", ", ")
                return f"{names} ({r['data_short']})" if names else r["data_short"]
            return str(r[c])

        cols = [*self.by, "protocol"]
        common = {c: show(self.rows[0], c) for c in cols
                  if len(self.rows) > 1 and len({show(r, c) for r in self.rows}) == 1}
        labels = ["\n".join(show(r, c) for c in cols if c not in common) + ("\n[mixed data]" if r["mixed_data"] else "")
                  for r in self.rows]
        return labels, common

    def to_csv(self) -> str:
        buf = io.StringIO()
        fields = [*self.by, "protocol", "data", "data_names", "n", "over", "mixed_data"]
        for m in self.metrics:
            fields += [f"{m}_mean", f"{m}_std"]
        fields += ["merged_over", "runs"]
        w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in self.rows:
            w.writerow({k: ("" if r.get(k) is None else r[k]) for k in fields})
        return buf.getvalue()


def _group_rows(entries: Sequence[Entry], by: Sequence[str], allow_mixed_data: bool) -> list[dict[str, Any]]:
    groups: dict[tuple, list[Entry]] = {}
    for e in entries:
        groups.setdefault(tuple(e.attrs[b] for b in by) + (e.attrs["protocol"],), []).append(e)
    rows = []
    for key, members in groups.items():
        label = " / ".join(key)
        data = sorted({e.data for e in members})
        mixed = len(data) > 1 or (UNKNOWN in data and len(members) > 1)
        if mixed and not allow_mixed_data:
            where = "; ".join(f"{e.run} ({e.data[:12]})" for e in members)
            raise MixedDataError(
                f"row {label!r} would merge runs on different (or unrecorded) data: {where}. Group by store "
                f"(--by ...,store) to give each its own row, or pass --allow-mixed-data to merge them anyway")
        metrics = [m for m in METRICS if all(m in e.values for e in members)]
        row: dict[str, Any] = dict(zip(by, key[:-1], strict=True), protocol=key[-1], label=label, data=";".join(data),
                                   data_short=", ".join(d[:12] for d in data), mixed_data=mixed,
                                   data_names=";".join(sorted({e.data_name for e in members if e.data_name})),
                                   runs=";".join(e.run for e in members),
                                   notes=sorted({n for e in members for n in e.notes}))
        if len(members) == 1:
            vals = {m: np.asarray(members[0].values[m]) for m in metrics}
            n = len(next(iter(vals.values()))) if vals else 1
            row["over"] = members[0].over if n > 1 else ""
        else:
            vals = {m: np.array([np.mean(e.values[m]) for e in members]) for m in metrics}
            n = len(members)
            seeds = [e.seed for e in members]
            row["over"] = "seeds" if len(set(map(str, seeds))) == n else "runs"
        row["n"] = n
        for m in metrics:
            row[f"{m}_mean"] = float(vals[m].mean())
            row[f"{m}_std"] = float(vals[m].std()) if n > 1 else None  # one number has no spread
        differing = [b for b in ("head", "model", "prompt_set", "store") if b not in by
                     and len({e.attrs[b] for e in members}) > 1]
        row["merged_over"] = ", ".join(f"{b} ({len({e.attrs[b] for e in members})})" for b in differing)
        rows.append(row)
    return rows


def parse_by(by: str | Sequence[str]) -> list[str]:
    """``"head,model"`` -> ``["head", "model"]``, each checked against :data:`BY`."""
    items = [b.strip() for b in (by.split(",") if isinstance(by, str) else by) if b.strip()]
    bad = [b for b in items if b not in BY]
    if bad or not items:
        raise ValueError(f"--by {','.join(items) or by!r}: {bad or 'nothing'} not among {', '.join(BY)}")
    return list(dict.fromkeys(items))


def compare_runs(run_dirs: Sequence[PathLike], by: str | Sequence[str] = BY, out_dir: PathLike | None = None,
                 allow_mixed_data: bool = False, overwrite: bool = False, plots: bool | None = None) -> Comparison:
    """Group the evaluations of ``run_dirs`` by ``by`` (and protocol) into one table.

    Writes ``comparison.csv``, ``comparison.md``, ``comparison.png``/``.svg`` (unless ``plots``
    is false, :func:`clip_heads.results.plots_enabled`), ``metrics.json`` (rows, what could not
    be read) and ``index.html`` to ``out_dir`` when given, as a results
    folder (:mod:`clip_heads.results`: built aside, swapped in; another run's folder is not
    replaced unless ``overwrite``). Raises :class:`MixedDataError` when a row would merge runs
    on different data and ``allow_mixed_data`` is false, ``ValueError`` when no run is readable.
    """
    by = parse_by(by)
    if not run_dirs:
        raise ValueError("no run folders to compare")
    entries, unreadable, seen = [], [], set()
    for d in run_dirs:
        key = os.path.realpath(d)
        if key in seen:
            continue
        seen.add(key)
        try:
            entries += read_run(d)
        except (OSError, ValueError) as e:
            why = str(e)
            logger.warning("compare: skipping %s: %s", d, why)
            unreadable.append((str(d), why))
    if not entries:
        raise ValueError("no run could be read: " + "; ".join(f"{p}: {w}" for p, w in unreadable))
    rows = _group_rows(entries, by, allow_mixed_data)
    metrics = [m for m in METRICS if any(r.get(f"{m}_mean") is not None for r in rows)]
    comp = Comparison(by, rows, unreadable, metrics)
    if out_dir is not None:
        _write(comp, Path(out_dir), [str(d) for d in run_dirs], allow_mixed_data, overwrite, plots)
    return comp


def _write(comp: Comparison, out: Path, runs: list[str], allow_mixed: bool, overwrite: bool,
           draw: bool | None = None) -> None:
    from clip_heads import plots
    from clip_heads.metrics import json_default
    from clip_heads.results import plots_enabled, render, results_dir

    for r in runs:  # the comparison replaces its folder whole: it must be no run and hold none
        ro, rr = out.resolve(), Path(r).resolve()
        if ro == rr or ro in rr.parents:
            raise ValueError(f"--out {out} is or holds the run folder {r}, which writing the comparison would "
                             f"replace; write it elsewhere")
    run = {"command": "compare", "runs": [os.path.abspath(r) for r in runs], "by": comp.by,
           "allow_mixed_data": allow_mixed}
    with results_dir(out, run, overwrite) as stage:
        (stage / "comparison.csv").write_text(comp.to_csv())
        (stage / "comparison.md").write_text(comp.to_markdown())
        shown = [m for m in CHART_METRICS if m in comp.metrics]
        if plots_enabled(draw):
            labels, common = comp.chart_labels()
            fig = plots.grouped_bars_figure(labels,
                {m.replace("_", "-"): [r.get(f"{m}_mean") for r in comp.rows] for m in shown},
                {m.replace("_", "-"): [r.get(f"{m}_std") if r["n"] > 1 else None for r in comp.rows] for m in shown},
                title="; ".join(f"{k}: {v}" for k, v in common.items()) + ("\n" if common else "")
                + "error bars: std over the folds or seeds of a row")
            plots.save_figure(fig, stage, "comparison")
        (stage / "metrics.json").write_text(json.dumps(
            {"info": {"run": run}, "rows": comp.rows, "unreadable": comp.unreadable}, indent=2, default=json_default))
        render(stage, plots=False, final=out)  # the page: the table and the chart above
