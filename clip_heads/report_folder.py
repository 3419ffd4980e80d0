"""A results folder's figures and page: what :func:`clip_heads.results.render` runs on every folder.

:func:`render_folder` reads a folder's ``metrics.json`` (nothing else: a folder can be redrawn at
any time), draws the figures its evaluations have (:mod:`clip_heads.plots`) into ``plots/``, and
writes its ``index.html`` (:func:`clip_heads.report_page.write_index`) with the provenance
:func:`provenance_from_metrics` reads from the record and its store.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Sequence, Union

from clip_heads.report_page import INDEX, evaluation_sections, write_index

__all__ = ["FIGURE_ORDER", "provenance_from_metrics", "read_record", "render_folder"]

PathLike = Union[str, "os.PathLike[str]"]
FIGURE_ORDER = ("training", "wise_ft", "wise_ft_calibration", "ablation", "comparison", "confusion_matrix", "per_class", "fold_spread", "reliability",
                "soft_labels", "top_k")


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name in ("clip-heads", "numpy", "scikit-learn", "torch", "transformers", "h5py", "matplotlib"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


_PROVENANCE = (("store", "store"), ("model_id", "model"), ("prompt_set", "prompt set"), ("templates", "templates"),
               ("scoring", "scoring"), ("head", "head"), ("head_params", "head parameters"), ("seed", "seed"),
               ("head_dir", "head folder"), ("trained_on", "trained on"), ("eval_store", "evaluation store"),
               ("resubstitution", "resubstitution"), ("prompt_sets", "prompt sets"),
               ("skipped", "prompt sets skipped (other label sets)"))


def provenance_from_metrics(metrics: dict, read_store: bool = True) -> dict[str, Any]:
    """What a metrics.json says about its run, in reading order.

    ``info`` (top level, or an evaluation section's) gives the command, store, data record,
    model, prompt set, head, parameters, seed and label map; a CV report gives its folds; every
    other field of the run record (``info.run``) follows as it is. With ``read_store`` the
    store's own attributes add the model's revision and weights hash and the library versions
    it was encoded with (or say the store can no longer be read). The versions of this process
    are added as ``report rendered with``.
    """
    info = dict(metrics.get("info") or {})
    for sec in ("eval", "train"):
        if not info and isinstance(metrics.get(sec), dict):
            info = dict(metrics[sec].get("info") or {})
    run = info.get("run") or {}
    prov: dict[str, Any] = {"command": run.get("command") or ("fine-tune CV" if metrics.get("kind") == "cv" else None)}
    used = {"command"}
    for k, label in _PROVENANCE:
        v = info.get(k, run.get(k))
        used.add(k)
        if v not in (None, "", [], {}):
            prov[label] = v
    if run.get("label_map"):
        prov["label map"] = run["label_map"]
    used.add("label_map")
    cv = metrics.get("cv") if isinstance(metrics.get("cv"), dict) else metrics if metrics.get("kind") == "cv" else None
    if cv is not None:
        prov["CV folds"] = f"{cv.get('k')} (stratified, seed {cv.get('seed', run.get('seed', 'not recorded'))})"
        used.add("cv")
    for k, v in run.items():  # the rest of what was run (a fine-tune's recipe, a generalisation's datasets...)
        if k not in used and v not in (None, "", [], {}):
            prov[k.replace("_", " ")] = v
    for k in ("model", "settings"):  # a fine-tune CV's model identity; a generalisation's settings
        if isinstance(info.get(k), dict) or isinstance(metrics.get(k), dict):
            extra = info.get(k) if isinstance(info.get(k), dict) else metrics[k]
            prov[f"{k} record"] = {a: b for a, b in extra.items() if a not in ("a_templates", "b_templates")}
    if info.get("data"):
        prov["data"] = info["data"]
    store = info.get("store") or run.get("store")
    if read_store and store:
        prov.update(_store_provenance(store))
    prov["report rendered with"] = _versions()
    return {k: v for k, v in prov.items() if v is not None}


def _store_provenance(store: str) -> dict[str, Any]:
    from clip_heads.store import open_store

    try:
        with open_store(store) as s:
            a = s.attrs
    except (OSError, ValueError, KeyError) as e:
        return {"store attributes": f"not read ({type(e).__name__}: {e})"}
    return {"model revision": a.get("model_revision"), "model weights hash": a.get("model_hash"),
            "encoded with": a.get("versions"), "store created": a.get("created")}


def _read_metrics(out: Path) -> tuple[dict, Path]:
    metrics_path, gen = out / "metrics.json", out / "generalisation.json"
    source = metrics_path if metrics_path.is_file() else gen if gen.is_file() else None
    if source is None:
        raise FileNotFoundError(f"{out} has no metrics.json (nor generalisation.json): not a clip-heads results folder")
    return read_record(source), source


def read_record(path: Path) -> dict:
    """A results folder's JSON record (metrics.json and the like) as a mapping, or a one-line
    ValueError naming the file: not JSON, or JSON that is not an object."""
    try:
        record = json.loads(path.read_text())
    except ValueError as e:  # UnicodeDecodeError too
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(record, dict):
        raise ValueError(f"{path} holds a {type(record).__name__}, not a results record")
    return record


def _curve_points(out: Path, metrics: dict) -> tuple[list[dict] | None, tuple[str, str]]:
    """The paper's points for a generalisation curve (by its datasets' formats, else by the
    folder's name as reproduce names them) and the names of A and B."""
    from clip_heads.paper import PAPER_CURVES, paper_experiment, paper_points

    data = (metrics.get("info") or {}).get("data") or {}
    a, b = data.get("a") or {}, data.get("b") or {}
    exp = paper_experiment(a.get("source_format"), b.get("source_format"))
    if exp is None and out.name in PAPER_CURVES:  # an older folder without data records, named as reproduce names it
        exp = out.name
    names = tuple(f"{side} = {Path(str(d['source_root'])).name}" if d.get("source_root") else side
                  for side, d in (("A", a), ("B", b)))
    return (paper_points(exp) if exp else None), names  # type: ignore[return-value]


def _ordered(paths: Iterable[Path]) -> list[Path]:
    rank = {stem: i for i, stem in enumerate(FIGURE_ORDER)}
    return sorted(paths, key=lambda p: (len(p.parts), rank.get(p.stem, len(rank)), str(p)))


def _pages_below(out: Path, depth: int = 2, pattern: str = "*") -> list[tuple[str, str]]:
    """``(relative path, label)`` of the results pages in the folders below ``out`` (a demo's
    or reproduce's steps, a fine-tune CV's folds: ``pattern`` names the first level), with each
    one's command and headline accuracy."""
    found = []
    for page in [p for d in range(1, depth + 1) for p in sorted(out.glob(pattern + "/" + "*/" * (d - 1) + INDEX))]:
        if page.parent.name == "plots":
            continue
        label = page.parent.relative_to(out).as_posix()
        try:
            m = json.loads((page.parent / "metrics.json").read_text())
        except (OSError, ValueError):
            m = {}
        run = ((m.get("info") or {}).get("run") or {}) if isinstance(m, dict) else {}
        acc = _headline_accuracy(m) if isinstance(m, dict) else None
        label += f": {run['command']}" if run.get("command") else ""
        label += f", fold {run['fold']} of {run.get('cv')}" if run.get("fold") else ""
        label += f", accuracy {acc:.3f}" if acc is not None else ""
        found.append((page.relative_to(out).as_posix(), label))
    return found


def _headline_accuracy(m: dict) -> float | None:
    for r in (m, m.get("cv"), m.get("eval"), m.get("rank1"), m.get("train")):
        if isinstance(r, dict):
            r = r.get("mean", r) if r.get("kind") == "cv" else r
            if isinstance(r.get("accuracy"), (int, float)):
                return float(r["accuracy"])
    return None


def render_folder(out_dir: PathLike, digits: int = 3, plots: bool = True, title: str | None = None,
                  name: str | None = None, final: PathLike | None = None, notes: Sequence[str] | None = None) -> Path:
    """Draw the plots of a results folder and write its ``index.html``; returns the page's path.

    Reads ``metrics.json`` (or an older generalisation's ``generalisation.json``) and draws what
    it holds into ``out_dir/plots/`` (replaced whole): every evaluation's confusion matrix,
    per-class bars, fold spread (CV), reliability diagram (where it has a ``calibration``) and
    soft-label figure (where its ``soft_labels`` have the per-class numbers); an ablation's
    ranked bars; a generalisation's WiSE-FT curve, with the paper's points where its datasets
    are FI and CIFAR-100. A section with a folder of its own (train-head's ``cv/``, ``eval/``,
    ``train/``) is rendered there, with its own page, and shown on this one; a ``top_k.png``, a
    ``comparison.png`` and a ``few_shot.png`` beside metrics.json are shown; the pages of the
    folders below (a demo's or reproduce's steps) are linked. ``plots=False`` writes the page without figures
    (and removes a ``plots/`` folder, whose figures would be of another run). A fine-tune CV's
    ``fold-NN/`` pages are linked. ``final`` is the folder a staging ``out_dir`` becomes: the
    pages below are looked for there. ``notes`` replace the page's default note (that figures were
    not drawn, with ``plots=False``).
    """
    from clip_heads import plots as P
    from clip_heads.fsutil import staged_dir

    out = Path(out_dir).absolute()  # figures are passed on by absolute path; the page refers to them relatively
    metrics, source = _read_metrics(out)
    figures: list[Path] = []
    links: list[tuple[str, str]] = []
    sections = evaluation_sections(metrics)
    own = [(key[0], rep) for _, key, rep in sections if key and (out / key[0] / "metrics.json").is_file()]
    for sec, _ in own:
        render_folder(out / sec, digits=digits, plots=plots)
        links.append((f"{sec}/{INDEX}", f"{sec}/: its own page"))
        if plots:
            figures += _ordered((out / sec / "plots").rglob("*.png"))
    rows = metrics.get("rows") if isinstance(metrics.get("rows"), list) else []
    if plots:
        written: list[Path] = []
        with staged_dir(out / "plots") as stage:
            if rows and "alpha" in rows[0]:
                points, names = _curve_points(out, metrics)
                written += P.save_figure(P.wise_ft_figure(metrics, points, names=names), stage, "wise_ft")
                if any(r.get("b_ece") is not None for r in rows):
                    written += P.save_figure(P.wise_ft_calibration_figure(metrics, names=names), stage,
                                             "wise_ft_calibration")
            if rows and "rank" in rows[0]:
                written += P.save_figure(P.ablation_figure(rows), stage, "ablation")
            if metrics.get("kind") == "finetune" and any(v is not None for v in
                                                         (metrics.get("loss_curve") or {}).get("loss", [])):
                written += P.save_figure(P.training_figure(metrics), stage, "training")
            for heading, key, rep in sections:
                if key and key[0] in dict(own):
                    continue
                above = (f"Rank-1 prompt of the ablation: {rows[0]['prompt_set']}: {rows[0]['template']}"
                         if key == ("rank1",) and rows else heading if len(key) > 1 else None)
                # A section's figures in a folder named by its key path (plots/cv/, plots/reports/1.00/b/).
                written += P.write_run_plots(rep, stage.joinpath(*map(str, key)), title=above)
        figures = _ordered([out / "plots" / p.relative_to(stage) for p in written if p.suffix == ".png"]) + figures
        if not written:
            shutil.rmtree(out / "plots", ignore_errors=True)
    elif (out / "plots").is_dir():
        shutil.rmtree(out / "plots")
    if metrics.get("kind") == "few-shot":  # the curve first, then each head's figures together
        order = [str(h) for h in (metrics.get("pooled") or {}).get("heads") or {}]
        figures = [out / "few_shot.png"] * (out / "few_shot.png").is_file() + sorted(figures, key=lambda p: (
            order.index(p.parent.name) if p.parent.name in order else len(order),
            FIGURE_ORDER.index(p.stem) if p.stem in FIGURE_ORDER else len(FIGURE_ORDER), str(p)))
    else:
        figures += [out / name for name in ("comparison.png", "top_k.png", "few_shot.png") if (out / name).is_file()]
    home = Path(final).absolute() if final is not None else out
    if not sections and not rows:
        links += _pages_below(home)
    elif metrics.get("kind") == "cv":  # a fine-tune CV: each fold's held-out evaluation has its page
        links += _pages_below(home, depth=1, pattern="fold-[0-9]*")
    if source.name == "metrics.json":
        prov = provenance_from_metrics(metrics)
    else:
        prov = {"command": "generalisation", **{k: v for k, v in metrics.get("settings", {}).items()
                                                if k not in ("a_templates", "b_templates")}}
    blocks = []
    if (out / "tables.md").is_file():  # reproduce: the paper's tables, ours beside the paper's
        blocks.append(("Tables", (out / "tables.md").read_text()))
    elif isinstance(metrics.get("headline"), str):  # demo: what it printed
        blocks.append(("Headline", metrics["headline"]))
    drawable = bool(sections) or bool(rows and ("rank" in rows[0] or "alpha" in rows[0])) \
        or metrics.get("kind") == "finetune"
    if notes is None:
        notes = [] if plots or not drawable else [
            "Figures were not drawn for this run (--no-plots); clip_heads.report_folder.render_folder(FOLDER) draws "
            "them from its metrics.json."]
    return write_index(out, prov, metrics, figures, title=title, digits=digits, links=links, notes=notes,
                       blocks=blocks, name=name, link_root=home)
