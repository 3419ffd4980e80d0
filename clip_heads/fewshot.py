"""The few-shot protocol: ``clip-heads few-shot STORE --heads ... --shots 1,2,4,8,16 --seeds 1,2,3``.

For every seed and shot count, K images per class are drawn from the training split
(:func:`clip_heads.protocols.sample_shots`: by seed alone, so every head at a (seed, K) gets the
same images), each head is fitted on them only and scored on the whole test split. The split is
the store's own ``split`` column (``train``/``test``; ``val`` rows are left out), or a seeded
stratified one (:func:`clip_heads.protocols.store_split`), recorded in ``split.csv``.

**Honesty.** A head never sees a test vector before it is scored: it is built and fitted on the
K shots alone, and a head that chooses hyper-parameters carves its validation from the shots or
uses its validation-free rule (each head's docstring says which); at one shot, where no split
can be carved, linear and tip-adapter take fixed values (:data:`ONE_SHOT_FIXED`). What each head chose is
written to ``choices.json``; the test suite checks it is unchanged when every test vector is
replaced by noise.

**Calibration and figures.** Every fit's test probabilities (its ``predict_proba``, columns in
the store's class order) are scored by :func:`clip_heads.calibration.calibration_of`: ECE (15
bins), Brier and NLL per (head, shots, seed) in few_shot.csv, their mean ± std over seeds in
metrics.json (``calibration_table``) and report.txt. At the largest shot count (the column a
reader compares; ``all`` is the largest) each head's test predictions are kept for every seed
(nothing else is) and pooled: metrics.json's ``pooled.heads.<head>`` is the
:func:`clip_heads.metrics.classification_report` of the concatenated seeds' predictions with its
``calibration``, and the page draws that head's confusion matrix, per-class bars and
reliability diagram from it (one section per head, :func:`clip_heads.results.render`).

Writes, through :func:`clip_heads.results.results_dir` (a folder swapped in whole):
``few_shot.csv`` (head, shots, seed, accuracy, macro_f1, fit_seconds, ece, brier, nll; the last
three empty for a head without probabilities), ``few_shot.md`` and
``report.txt`` (mean ± std of accuracy over seeds, rows heads, columns shots: the layout of
CoOp's and Tip-Adapter's tables; then ECE, Brier and NLL in the same layout and the pooled
largest-shot numbers), ``few_shot.png``/``.svg`` (accuracy against shots per head,
error bars over seeds), ``samples.json`` (the keys drawn per seed and shot count),
``split.csv``, ``choices.json``, ``metrics.json`` (the run and the tables' numbers, the pooled
reports), ``plots/`` and ``index.html`` (:func:`clip_heads.results.render`).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from clip_heads.errors import BadValueError
from clip_heads.metrics import json_default
from clip_heads.protocols import Split, sample_shots, store_split
from clip_heads.results import PathLike, Report, data_record, plots_enabled, render, results_dir
# The store's per-image augmented views, (n, K, dim) (encode --views K), and their pre-projection
# features (n, K, pre_dim), prolip's views, as the evaluations read them.
from clip_heads.scoring import VIEWS_COLUMN, load_views

logger = logging.getLogger(__name__)

__all__ = ["run_few_shot", "FewShotData", "load_few_shot_data", "parse_shots", "fitted_choices", "aligned_proba",
           "largest_shots", "DEFAULT_HEADS", "DEFAULT_SHOTS", "DEFAULT_SEEDS"]

DEFAULT_HEADS = ("zs-lp", "clap", "lpp", "gda", "tip-adapter", "linear")
DEFAULT_SHOTS = (1, 2, 4, 8, 16)
DEFAULT_SEEDS = (1, 2, 3)
CSV_COLUMNS = ("head", "shots", "seed", "accuracy", "macro_f1", "fit_seconds", "ece", "brier", "nll")
CALIBRATION = ("ece", "brier", "nll")  # per fit, from calibration_of; None where a head has no probabilities
PROBABILITIES = "each head's predict_proba, columns in the store's class order"
# At one shot per class no validation split can be carved from the shots, and the heads that
# choose on one (linear's C, tip-adapter's alpha and beta) take fixed values instead, unless the
# user gave them: linear's C = 1 (scikit-learn's default), Tip-Adapter's alpha = 1, beta = 5.5
# (the values its paper starts from on ImageNet). Recorded in choices.json with the rest.
ONE_SHOT_FIXED: dict[str, dict[str, float]] = {"linear": {"C": 1.0}, "tip-adapter": {"alpha": 1.0, "beta": 5.5}}


class FewShotData:
    """A store's labelled rows and what the heads need, read once for the whole grid."""

    def __init__(self, path: Path, X: np.ndarray, y: np.ndarray, classes: list[str], keys: list[str],
                 split_column: np.ndarray | None, prompts: Any, scoring: Any, pre: np.ndarray | None,
                 projection: np.ndarray | None, views: np.ndarray | None = None,
                 pre_views: np.ndarray | None = None) -> None:
        self.path, self.X, self.y, self.classes, self.keys = path, X, y, classes, keys
        self.split_column, self.prompts, self.scoring = split_column, prompts, scoring
        self.pre, self.projection, self.views, self.pre_views = pre, projection, views, pre_views


def load_few_shot_data(path: PathLike, prompt_set: str | None = None, pre_projection: bool = False,
                       views: bool = False, pre_views: bool = False) -> FewShotData:
    """Read store ``path``: vectors, labels, keys, its ``split`` column, a prompt set, its scoring
    rule, (``pre_projection``) the pre-projection features and projection that ``prolip`` needs,
    (``views``) the augmented views ``(n, K, dim)`` of the ``views`` column and (``pre_views``)
    their pre-projection features ``(n, K, pre_dim)``, prolip's views."""
    from clip_heads import zeroshot
    from clip_heads.heads.prolip import NO_PROJECTION
    from clip_heads.heads.views import NO_VIEWS
    from clip_heads.protocols import SPLIT_COLUMN
    from clip_heads.store import open_store

    path = Path(path)
    with open_store(path) as s:
        X, y, classes = s.arrays()
        keys = s.keys
        split = s.extra(SPLIT_COLUMN) if SPLIT_COLUMN in s.extra_names() else None
        prompts = s.prompt_set(prompt_set) if s.prompt_sets() or prompt_set else None
        scoring = zeroshot.ScoringRule.from_attrs(s.attrs)
        pre = projection = None
        if pre_projection:
            if not getattr(s, "has_pre_embeds", False) or s.projection() is None:
                raise BadValueError(f"store {path}: {NO_PROJECTION}")
            pre, projection = s.pre_embeddings(), s.projection()
        if (views or pre_views) and VIEWS_COLUMN not in s.extra_names():
            raise BadValueError(f"store {path}: {NO_VIEWS}")
    V = load_views(path, labelled_only=False) if views else None
    PV = load_views(path, pre_projection=True, labelled_only=False) if pre_views else None
    labelled = y >= 0
    if labelled.sum() == 0:
        raise BadValueError(f"store {path} has no labelled samples for a few-shot run")
    keep = np.flatnonzero(labelled)
    return FewShotData(path, X[keep], y[keep], classes, [keys[i] for i in keep],
                       None if split is None else np.asarray(split)[keep], prompts, scoring,
                       None if pre is None else pre[keep], projection, None if V is None else V[keep],
                       None if PV is None else PV[keep])


def parse_shots(spec: Any) -> list[int | str]:
    """``"1,2,4,all"`` or a sequence -> ``[1, 2, 4, "all"]``; a one-line error for anything else."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[int | str] = []
    for item in items:
        text = str(item).strip().lower()
        if text == "all":
            out.append("all")
            continue
        try:
            k = int(text)
        except ValueError:
            k = 0
        if k < 1 or str(k) != text:
            raise BadValueError(f"shots must be positive integers or 'all', got {item!r} in {spec!r}")
        out.append(k)
    if not out or len(set(map(str, out))) != len(out):
        raise BadValueError(f"shots must list distinct shot counts, got {spec!r}")
    return out


def fitted_choices(head: Any) -> dict[str, Any]:
    """What a fitted head chose or learned that is a hyper-parameter or a stopping point: its
    public fitted scalars (``alpha_``, ``C_``, ``best_epoch_``, ``reg_`` ...) and short vectors
    (CLAP's multipliers), JSON-ready. Weights and curves are left out."""
    out = {}
    for name, value in sorted(vars(head).items()):
        if not name.endswith("_") or name.startswith("_") or name in ("classes_", "n_features_in_"):
            continue
        if isinstance(value, (bool, int, float, str)) or value is None:
            out[name] = value
        elif isinstance(value, dict) and all(isinstance(v, (int, float)) for v in value.values()):
            out[name] = {str(k): float(v) for k, v in value.items()}
        elif isinstance(value, (list, np.ndarray)) and np.ndim(value) == 1 and len(value) <= 64 \
                and not name.endswith("curve_") and not name.endswith("scores_"):
            out[name] = [float(v) for v in value]
    return out


def _head_params(name: str, d: FewShotData, params: Mapping[str, Any], seed: int,
                 shots: int | str = "all") -> dict[str, Any]:
    from clip_heads import zeroshot
    from clip_heads.heads import get_head

    cls = get_head(name)
    p = dict(params)
    if shots == 1:
        for k, v in ONE_SHOT_FIXED.get(name, {}).items():
            p.setdefault(k, v)
    p.setdefault("random_state", seed)
    if cls.zero_shot_scoring:
        for k in ("scoring", "logit_scale", "logit_bias"):
            p.setdefault(k, getattr(d.scoring, k))
    if cls.uses_prompts and p.get("prompt_embeds") is None:
        if d.prompts is None:
            raise BadValueError(f"head {name!r} needs class prompts, but store {d.path} has no prompt set (add one "
                                f"with `clip-heads prompts`)")
        V = zeroshot.class_vectors(d.prompts, classes=d.classes)
        p["prompt_embeds"] = {c: v for c, v in zip(d.classes, V, strict=True)}
    if getattr(cls, "uses_pre_projection", False):
        p.setdefault("projection", d.projection)
    return p


PROTOCOLS = ("auto", "split-column", "stratified", "fi")


def protocol_split(protocol: str, d: FewShotData, seed: int, test_fraction: float) -> Split:
    """The rows that train and test under ``protocol`` (see :func:`run_few_shot`)."""
    from clip_heads.protocols import fi_split

    if protocol not in PROTOCOLS:
        raise BadValueError(f"unknown protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")
    if protocol == "split-column" and d.split_column is None:
        raise BadValueError(f"protocol 'split-column': store {d.path} has no split column")
    if protocol == "fi":
        return fi_split(d.y, seed)
    column = None if protocol == "stratified" else d.split_column
    return store_split(d.y, column, seed=seed, test_fraction=test_fraction)


def _table(rows: list[dict], heads: Sequence[str], shots: Sequence[Any]) -> tuple[str, dict]:
    """Markdown mean ± std (over seeds) of accuracy in %, rows heads, columns shots; and the numbers."""
    numbers: dict[str, dict[str, dict[str, float]]] = {}
    lines = ["| head | " + " | ".join(f"{k} shots" if k != "all" else "all" for k in shots) + " |",
             "|---|" + "---|" * len(shots)]
    for h in heads:
        cells = []
        for k in shots:
            acc = np.asarray([r["accuracy"] for r in rows if r["head"] == h and r["shots"] == k]) * 100
            mean, std = float(acc.mean()), float(acc.std(ddof=1)) if len(acc) > 1 else 0.0
            numbers.setdefault(h, {})[str(k)] = {"mean": mean, "std": std, "n_seeds": int(len(acc))}
            cells.append(f"{mean:.1f} ± {std:.1f}")
        lines.append(f"| {h} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n", numbers


def largest_shots(shots: Sequence[int | str]) -> int | str:
    """The largest of parsed shot counts (``"all"`` above every integer): the column pooled and drawn."""
    return max(shots, key=lambda k: (k == "all", k if k != "all" else 0))


def _calibration_tables(rows: list[dict], heads: Sequence[str], shots: Sequence[Any]) -> tuple[str, dict]:
    """Markdown mean ± std (over seeds) of ECE, Brier and NLL, rows heads, columns shots; and the
    numbers (``{head: {shots: {metric: {mean, std, n_seeds}}}}``; None for a head without
    probabilities). std with ddof=1, as the accuracy table."""
    numbers: dict[str, dict[str, dict[str, Any]]] = {}
    blocks = []
    titles = {"ece": "ECE (15 bins)", "brier": "Brier score (range [0, 2])", "nll": "NLL (natural log)"}
    for m in CALIBRATION:
        lines = [f"{titles[m]}, mean ± std over seeds", "",
                 "| head | " + " | ".join(f"{k} shots" if k != "all" else "all" for k in shots) + " |",
                 "|---|" + "---|" * len(shots)]
        for h in heads:
            cells = []
            for k in shots:
                v = [r[m] for r in rows if r["head"] == h and r["shots"] == k]
                cell = numbers.setdefault(h, {}).setdefault(str(k), {})
                if any(x is None for x in v) or not v:
                    cell[m] = None
                    cells.append("–")
                    continue
                a = np.asarray(v, np.float64)
                mean, std = float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0
                cell[m] = {"mean": mean, "std": std, "n_seeds": int(len(a))}
                cells.append(f"{mean:.4f} ± {std:.4f}")
            lines.append(f"| {h} | " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks), numbers


def _pooled_reports(kept: Mapping[str, list[tuple[np.ndarray, np.ndarray | None]]], truth: np.ndarray,
                    classes: Sequence[str], seeds: Sequence[int], k: int | str) -> tuple[str, dict]:
    """Each head's test predictions at ``k`` shots over every seed, concatenated and scored as one
    set: ``{head: classification_report + calibration}`` and its report.txt table."""
    from clip_heads.calibration import calibration_of
    from clip_heads.metrics import classification_report

    reports: dict[str, dict] = {}
    lines = [f"At {k} shots{' per class' if k != 'all' else ''}, test predictions pooled over seeds {list(seeds)} "
             f"({len(truth)} test images x {len(seeds)} seeds)", "",
             "| head | accuracy | macro-F1 | ECE | Brier | NLL |", "|---|---|---|---|---|---|"]
    y = np.tile(truth, len(seeds))
    for h, runs in kept.items():
        pred = np.concatenate([p for p, _ in runs])
        P = None if any(q is None for _, q in runs) else np.concatenate([q for _, q in runs])
        rep = classification_report(y, pred, classes)
        rep["info"] = {"shots": str(k), "seeds": list(seeds), "pooled": "test predictions concatenated over seeds"}
        cal = calibration_of(y, P, classes, probabilities=PROBABILITIES, computed=f"pooled over seeds {list(seeds)}")
        if cal is not None:
            rep["calibration"] = cal
        reports[h] = rep
        c = [f"{cal[m]:.4f}" if cal is not None else "–" for m in CALIBRATION]
        lines.append(f"| {h} | {rep['accuracy']:.4f} | {rep['macro']['f1']:.4f} | " + " | ".join(c) + " |")
    return "\n".join(lines) + "\n", reports


def _plot(numbers: dict, heads: Sequence[str], shots: Sequence[Any], out: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from clip_heads.plots import save_figure

    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = np.arange(len(shots))
    for h in heads:
        m = [numbers[h][str(k)]["mean"] for k in shots]
        s = [numbers[h][str(k)]["std"] for k in shots]
        ax.errorbar(xs, m, yerr=s, marker="o", capsize=3, label=h)
    ax.set_xticks(xs, [str(k) for k in shots])
    ax.set_xlabel("shots per class")
    ax.set_ylabel("test accuracy (%), mean ± std over seeds")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    save_figure(fig, out, "few_shot")


def run_few_shot(store_path: PathLike, out_dir: PathLike, heads: Sequence[str] = DEFAULT_HEADS,
                 shots: Any = DEFAULT_SHOTS, seeds: Sequence[int] = DEFAULT_SEEDS,
                 params: Mapping[str, Mapping[str, Any]] | None = None, prompt_set: str | None = None,
                 test_fraction: float = 0.3, split_seed: int = 0, plots: bool | None = None,
                 overwrite: bool = False, protocol: str = "auto") -> Report:
    """Run the few-shot grid on a store and write its results folder (see the module docstring).

    Parameters
    ----------
    heads : registered head names. shots : ints and/or ``"all"`` (``"1,2,all"`` too).
    seeds : one sample of K shots per seed (the head's ``random_state`` is the seed too).
    params : per head name, parameters passed to it (``{"gda": {"cv": 3}}``).
    test_fraction, split_seed : the seeded stratified split used when the store has no split column.
    protocol : ``"auto"`` (the store's split column, else the seeded stratified split),
        ``"split-column"`` (the store's, or an error), ``"stratified"`` (ignore the column) or
        ``"fi"`` (FI's seeded 80/5/15: shots from the 80%, scored on the 15%).
    plots : draw few_shot.png and each head's pooled figures (None: the ``CLIP_HEADS_PLOTS``
        environment, on by default; :func:`clip_heads.results.plots_enabled`).
    ``--param HEAD.use_views=true`` fits that head on the sampled images' augmented views too
    (the store's ``views`` column, ``encode --views K``; prolip: their pre-projection features,
    the ``pre_views`` column of ``--views K --features projected,pre-projection``).
    """
    from sklearn.metrics import accuracy_score, f1_score

    from clip_heads.calibration import calibration_of
    from clip_heads.heads import get_head, make_head

    shots = parse_shots(shots)
    heads = list(heads)
    for h in heads:
        get_head(h)  # an unknown name fails before any work
    if not heads or len(set(heads)) != len(heads):
        raise BadValueError(f"heads must list distinct head names, got {heads}")
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise BadValueError(f"seeds must list distinct integers, got {seeds}")
    params = {k: dict(v) for k, v in (params or {}).items()}
    unknown = sorted(set(params) - set(heads))
    if unknown:
        raise BadValueError(f"parameters given for heads not in the run: {unknown}; heads are {heads}")
    needs_pre = any(getattr(get_head(h), "uses_pre_projection", False) for h in heads)
    with_views = {h for h in heads if params.get(h, {}).get("use_views") is True}
    pre_heads = {h for h in heads if getattr(get_head(h), "uses_pre_projection", False)}
    # prolip trains on the views' pre-projection features (encode --views K --features projected,pre-projection)
    d = load_few_shot_data(store_path, prompt_set, pre_projection=needs_pre, views=bool(with_views - pre_heads),
                           pre_views=bool(with_views & pre_heads))
    split: Split = protocol_split(protocol, d, split_seed, test_fraction)
    names = np.asarray(d.classes, dtype=object)
    y_names = names[d.y]
    test_classes = sorted(set(d.y[split.test].tolist()))
    for h in heads:  # a bad parameter fails now, before the grid
        make_head(h, _head_params(h, d, params.get(h, {}), seeds[0]))

    rows: list[dict] = []
    choices: list[dict] = []
    top = largest_shots(shots)
    index = {c: i for i, c in enumerate(d.classes)}
    truth_idx = d.y[split.test]
    # Only the largest shot count's test predictions are kept (class indices; probabilities as
    # float32), per head, one entry per seed: what the pooled figures need, not every run's.
    kept: dict[str, list[tuple[np.ndarray, np.ndarray | None]]] = {h: [] for h in heads}
    samples: dict[str, dict[str, list[str]]] = {}
    for seed in seeds:
        for k in shots:
            idx = sample_shots(d.y, split.train, k, seed, class_names=d.classes)
            samples.setdefault(str(seed), {})[str(k)] = [d.keys[i] for i in idx]
            for h in heads:
                X = d.pre if getattr(get_head(h), "uses_pre_projection", False) else d.X
                head = make_head(h, _head_params(h, d, params.get(h, {}), seed, k))
                t0 = time.perf_counter()
                if h in with_views:  # the views of the sampled images only; scored on plain vectors
                    head.fit(X[idx], y_names[idx], views=(d.pre_views if h in pre_heads else d.views)[idx])
                else:
                    head.fit(X[idx], y_names[idx])
                fit_s = time.perf_counter() - t0
                pred = head.predict(X[split.test])
                truth = y_names[split.test]
                P = aligned_proba(head, X[split.test], index)
                cal = calibration_of(truth_idx, P, d.classes)
                rows.append({"head": h, "shots": k, "seed": seed, "accuracy": float(accuracy_score(truth, pred)),
                             "macro_f1": float(f1_score(truth, pred, labels=names[test_classes].tolist(),
                                                        average="macro", zero_division=0)),
                             "fit_seconds": fit_s,
                             **{m: None if cal is None else float(cal[m]) for m in CALIBRATION}})
                if k == top:
                    kept[h].append((np.asarray([index[str(v)] for v in pred], np.int64),
                                    None if P is None else P.astype(np.float32)))
                choices.append({"head": h, "shots": k, "seed": seed, "chosen": fitted_choices(head)})
                logger.info("few-shot %s, %s shots, seed %d: accuracy %.4f (%.2f s)", h, k, seed,
                            rows[-1]["accuracy"], fit_s)

    table, numbers = _table(rows, heads, shots)
    cal_text, cal_numbers = _calibration_tables(rows, heads, shots)
    pooled_text, pooled = _pooled_reports(kept, truth_idx, d.classes, seeds, top)
    del kept
    header = (f"Few-shot: {len(heads)} heads x {len(shots)} shot counts x {len(seeds)} seeds on {d.path.name}\n"
              f"split: {split.source}; {len(split.train)} training images, {len(split.test)} test images\n"
              f"test accuracy (%), mean ± std over seeds {seeds}\n\n")
    text = (header + table + f"\nCalibration of the test probabilities ({PROBABILITIES}; ECE: top-label "
            f"confidence in 15 equal-width bins)\n\n" + cal_text + "\n" + pooled_text)
    run = {"command": "few-shot", "store": os.path.abspath(d.path), "heads": heads, "shots": [str(k) for k in shots],
           "protocol": protocol,
           "seeds": seeds, "params": params, "prompt_set": None if d.prompts is None else d.prompts.name,
           "split": split.source}
    from clip_heads.store import open_store

    with open_store(d.path) as s:  # what compare groups by: the model, and the data's fingerprint
        model_id = s.model_id
    metrics = {"kind": "few-shot", "info": {"run": run, "store": str(d.path), "model_id": model_id,
                                            "data": data_record(d.path)},
               "table": numbers, "n_train": int(len(split.train)), "n_test": int(len(split.test)),
               "calibration_table": cal_numbers,
               "pooled": {"shots": str(top), "seeds": seeds, "heads": pooled}}
    out = Path(out_dir)
    with results_dir(out, run, overwrite) as stage:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "accuracy": f"{r['accuracy']:.6f}", "macro_f1": f"{r['macro_f1']:.6f}",
                             "fit_seconds": f"{r['fit_seconds']:.4f}",
                             **{m: "" if r[m] is None else f"{r[m]:.6f}" for m in CALIBRATION}})
        (stage / "few_shot.csv").write_text(buf.getvalue(), encoding="utf-8")
        (stage / "few_shot.md").write_text(table, encoding="utf-8")
        (stage / "report.txt").write_text(text, encoding="utf-8")
        labels = split.labels(len(d.y))
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["key", "split"])
        w.writerows(zip(d.keys, labels, strict=True))
        (stage / "split.csv").write_text(buf.getvalue(), encoding="utf-8")
        (stage / "samples.json").write_text(json.dumps(samples, indent=1), encoding="utf-8")
        (stage / "choices.json").write_text(json.dumps(choices, indent=1, default=_json_default), encoding="utf-8")
        (stage / "metrics.json").write_text(json.dumps(metrics, indent=1, default=json_default), encoding="utf-8")
        if plots_enabled(plots):
            _plot(numbers, heads, shots, stage, f"{d.path.stem}: few-shot accuracy")
        render(stage, plots, out)  # the page: provenance, the tables, few_shot.png, each head's pooled figures
    return Report("few-shot", text, metrics, out)


def aligned_proba(head: Any, X: np.ndarray, index: Mapping[str, int]) -> np.ndarray | None:
    """``head.predict_proba(X)`` with one column per class of ``index`` (name -> column), in
    that order; a class the head never saw gets 0. None for a head without ``predict_proba``."""
    if not hasattr(head, "predict_proba"):
        return None
    P = np.zeros((len(X), len(index)))
    P[:, [index[str(c)] for c in head.classes_]] = head.predict_proba(X)
    return P


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and math.isinf(o):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
