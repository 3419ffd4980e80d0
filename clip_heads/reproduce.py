"""`clip-heads reproduce`: Bondielli & Passaro's Tables 1-5 in one command, and the heads beside them.

For a user with the pretrained weights and the two datasets (FI "Image-Emotion" and CIFAR-100),
this runs every experiment of the paper with this package's pipeline and writes ``tables.md``
where each of our measurements stands next to the number the paper printed. The paper's
numbers are transcribed from its tables and always labelled "paper"; nothing here presents
them as a measurement. On top, the frozen-CLIP heads (linear, CLIP-E MLP, CLIP-E contrastive,
Tip-Adapter) are cross-validated on the same folds, which is the cheap way to beat zero-shot.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

from .catalog import DEFAULT_MODEL
from .paper import PAPER  # noqa: F401  (the paper's numbers; re-exported here as before)
from .results import Report

logger = logging.getLogger(__name__)

HEADS = ("linear", "mlp", "contrastive", "tip-adapter")
CIFAR100_SIZES = {"all": 60_000, "train": 50_000, "test": 10_000}

def _prf(report: dict, avg: str) -> tuple[float, float, float]:
    r = report[avg]
    return r["precision"], r["recall"], r["f1"]


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}"


def _summary_table(title: str, columns: list[tuple[str, dict | None, dict | None]]) -> str:
    """Rows Macro/Weighted P/R/F1 and Accuracy; for each column (name, ours, paper) two cells."""
    head = "| metric | " + " | ".join(f"{name} (ours) | {name} (paper)" for name, _, _ in columns) + " |"
    sep = "|---" * (1 + 2 * len(columns)) + "|"
    rows = []
    for avg in ("macro", "weighted"):
        for i, metric in enumerate(("precision", "recall", "F1")):
            cells = []
            for _, ours, paper in columns:
                cells += [_fmt(_prf(ours, avg)[i] if ours else None), _fmt(paper[avg][i] if paper else None)]
            rows.append(f"| {avg} {metric} | " + " | ".join(cells) + " |")
    cells = []
    for _, ours, paper in columns:
        cells += [_fmt(ours["accuracy"] if ours else None), _fmt(paper["accuracy"] if paper else None)]
    rows.append("| accuracy | " + " | ".join(cells) + " |")
    return f"### {title}\n\n" + "\n".join([head, sep, *rows]) + "\n"


def _per_class_table(title: str, ours: dict, paper: dict) -> str:
    lines = [f"### {title}\n", "| class | P (ours) | R (ours) | F1 (ours) | P (paper) | R (paper) | F1 (paper) |", "|---" * 7 + "|"]
    for cls, m in ours["per_class"].items():
        p = paper.get(cls)
        lines.append(f"| {cls} | {_fmt(m['precision'])} | {_fmt(m['recall'])} | {_fmt(m['f1'])} | "
                     + " | ".join(_fmt(v) for v in (p or (None, None, None))) + " |")
    return "\n".join(lines) + "\n"


def _heads_table(title: str, rows: list[tuple[str, dict, dict | None]]) -> str:
    lines = [f"### {title}\n", "| method | accuracy | ± | macro F1 | ± | weighted F1 | ± |", "|---" * 7 + "|"]
    for name, mean, std in rows:
        sd = std or {"accuracy": None, "macro": {"f1": None}, "weighted": {"f1": None}}
        lines.append(f"| {name} | {_fmt(mean['accuracy'])} | {_fmt(sd['accuracy'])} | {_fmt(mean['macro']['f1'])} | "
                     f"{_fmt(sd['macro']['f1'])} | {_fmt(mean['weighted']['f1'])} | {_fmt(sd['weighted']['f1'])} |")
    return "\n".join(lines) + "\n"


def reproduce(
    fi: str | os.PathLike,
    cifar: str | os.PathLike,
    out_dir: str | os.PathLike = "cache/reproduce",
    model: str = DEFAULT_MODEL,
    cv: int = 10,
    seed: int = 0,
    heads: Sequence[str] = HEADS,
    finetune: bool = True,
    alphas: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    cifar_split: str = "all",
    device: str = "auto",
    batch_size: int = 64,
    workers: int | None = None,
    finetune_options: dict[str, Any] | None = None,
    progress: bool = True,
    plots: bool | None = None,
) -> Report:
    """Run B&P's experiments (and the heads) and write ``out_dir/tables.md`` + ``metrics.json``.

    Parameters
    ----------
    fi : the FI / Image-Emotion dataset: eight emotion class folders.
    cifar : the CIFAR-100 python tarball or folder; ``cifar_split="all"`` (train + test, the
        paper's 60,000 images).
    cv : folds of every cross-validation (heads and fine-tune share them for the same seed).
    finetune : also run Tables 3-5 (full fine-tunes of CLIP: a GPU job); without it, Tables
        1-2 and the heads only.
    finetune_options : passed to the fine-tunes (``epochs``, ``batch_size``, ``micro_batch``, ``lr``...);
        the defaults are the paper's recipe.
    plots : draw every step's figures (default on; ``index.html`` pages are written either way).

    Every "ours" number of the summary tables is a row of ``comparison/`` (:func:`clip_heads.compare.compare_runs`
    over every step's folder: the mean over folds for CV), printed next to the paper's in the
    paper's layout; per-class tables come from the step's own metrics.json.

    Every step writes into its own folder and is skipped on a rerun when complete (stores,
    fine-tune folds and WiSE-FT blends resume), so an interrupted reproduction continues.
    ``metrics.json`` (``data``, and ``info.run`` / ``info.data`` as every results folder) and the
    top of ``tables.md`` state what was measured: per dataset the split, number of images and
    store fingerprint; a CIFAR-100 split smaller than the official one is flagged, so a sample
    cannot pass for the paper's data. ``report.txt`` holds the same text as ``tables.md``.
    Returns a :class:`~clip_heads.results.Report` whose ``metrics`` are what metrics.json holds.
    """
    from .compare import compare_runs
    from .encode import encode
    from .evaluate import run_zero_shot, train_head
    from .results import METRICS, REPORT, data_record, render, results_files, write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cifar_opts = {"split": cifar_split}
    enc = dict(model=model, device=device, batch_size=batch_size, workers=workers, progress=progress)
    stores = {
        "fi": encode(str(fi), out / "stores" / "fi.h5", format="fi", templates=["bp-emotion", "bp-emotion-variants", "clip-e"], **enc).path,
        "cifar100": encode(str(cifar), out / "stores" / "cifar100.h5", format="cifar100", source_options=cifar_opts,
                           templates=["bp-photo", "clip-cifar100"], **enc).path,
    }
    results: dict[str, Any] = {"model": model, "cv": cv, "seed": seed, "stores": {k: str(v) for k, v in stores.items()},
                               "data": {"fi": data_record(stores["fi"]),
                                        "cifar100": data_record(stores["cifar100"], split=cifar_split)}}
    for line in _data_notes(results["data"]):
        logger.warning("reproduce: %s", line)

    # Tables 1-2: zero-shot with the paper's captions.
    steps: dict[str, Path] = {"zero-shot/fi": out / "zero-shot" / "fi",
                              "zero-shot/cifar100": out / "zero-shot" / "cifar100"}
    zs = {
        "fi": run_zero_shot(str(stores["fi"]), prompt_set="bp-emotion", out_dir=steps["zero-shot/fi"],
                            overwrite=True, plots=plots).metrics,
        "cifar100": run_zero_shot(str(stores["cifar100"]), prompt_set="bp-photo", out_dir=steps["zero-shot/cifar100"],
                                  overwrite=True, plots=plots).metrics,
    }
    results["zero_shot"] = zs

    # Beyond the paper: heads on the frozen vectors, k-fold CV on the fine-tune's folds.
    results["heads"] = {}
    for name, store in stores.items():
        for head in heads:
            steps[f"heads/{name}/{head}"] = out / "heads" / f"{name}-{head}"
            rep = train_head(head, str(store), steps[f"heads/{name}/{head}"], cv=cv, seed=seed, progress=progress,
                             plots=plots)
            results["heads"][f"{name}/{head}"] = {"mean": rep.metrics["cv"]["mean"], "std": rep.metrics["cv"]["std"]}

    if finetune:
        from .finetune_cv import cross_validate_finetune
        from .wise_ft import generalisation

        ft = dict(finetune_options or {}, device=device, workers=workers, progress=progress, plots=plots)
        steps.update({"finetune/fi": out / "finetune" / "fi-cv", "finetune/cifar100": out / "finetune" / "cifar100-cv"})
        results["finetune_cv"] = {
            "fi": cross_validate_finetune(str(fi), steps["finetune/fi"], model, cv=cv, seed=seed, format="fi",
                                          **ft).metrics,
            "cifar100": cross_validate_finetune(str(cifar), steps["finetune/cifar100"], model, cv=cv, seed=seed,
                                                format="cifar100", source_options=cifar_opts, **ft).metrics,
        }
        for name in ("emotion-clip-on-cifar100", "cifar100-clip-on-fi"):
            steps[f"table5/{name}"] = out / "table5" / name
        gen = {
            "emotion-clip-on-cifar100": generalisation(str(fi), str(cifar), steps["table5/emotion-clip-on-cifar100"],
                                                       model, alphas=alphas, holdout=None, seed=seed, a_format="fi",
                                                       b_format="cifar100", b_options=cifar_opts, **ft),
            "cifar100-clip-on-fi": generalisation(str(cifar), str(fi), steps["table5/cifar100-clip-on-fi"], model,
                                                  alphas=alphas, holdout=None, seed=seed, a_format="cifar100",
                                                  a_options=cifar_opts, b_format="fi", **ft),
        }
        results["table5"] = {k: {"rows": v["rows"], "finetuned_b": v["reports"][f"{1.0:.2f}"]["b"]} for k, v in gen.items()}

    # One table across every step (compare): the "ours" cells of the paper's tables are its rows.
    comp = compare_runs([str(p) for p in steps.values()], out_dir=out / "comparison", overwrite=True, plots=plots)
    results["comparison"] = {"folder": str(out / "comparison"), "steps": {k: str(v) for k, v in steps.items()},
                             "rows": comp.rows}
    text = tables_markdown(results)
    run = {"command": "reproduce", "fi": str(fi), "cifar": str(cifar), "model": model, "cv": cv, "seed": seed,
           "heads": list(heads), "finetune": finetune, "alphas": list(alphas), "cifar_split": cifar_split}
    results = dict(results, info={"run": run, "data": results["data"]}, text=text)
    with results_files(out) as stage:
        (stage / "tables.md").write_text(text)
        (stage / REPORT).write_text(text)
        write_json(stage / METRICS, json.loads(json.dumps(results, default=str)))
    render(out, plots=False)  # the tables, and a link to every step's page
    return Report("reproduce", text, results, out)


def _data_notes(data: dict[str, Any]) -> list[str]:
    """Caveats about the data measured: a CIFAR-100 split with fewer images than the official one."""
    c = data["cifar100"]
    full = CIFAR100_SIZES.get(str(c.get("split")))
    if full and c["n_images"] < full:
        return [f"CIFAR-100 split {c['split']}: {c['n_images']} images, not the official {full:,} "
                f"(the paper's setting); its figures are not comparable with the paper's"]
    return []


def data_markdown(data: dict[str, Any]) -> str:
    """The 'measured on' paragraph of tables.md: per dataset split, image count, fingerprint."""
    lines = ["**Measured on:**\n"]
    for name, label in (("fi", "FI"), ("cifar100", "CIFAR-100")):
        d = data[name]
        split = f"split {d['split']}, " if d.get("split") else ""
        lines.append(f"- {label}: {split}{d['n_images']:,} images ({d['n_skipped']} skipped), store "
                     f"`{Path(d['store']).name}`, fingerprint `{d['fingerprint'][:12]}`")
    lines += [f"- **Note:** {n}" for n in _data_notes(data)]
    return "\n".join(lines) + "\n"


def _compare_row(results: dict[str, Any], step: str, head: str | None = None,
                 protocol: str | None = None) -> dict | None:
    """The comparison row that holds step ``step``'s evaluation (its head and protocol)."""
    comp = results.get("comparison") or {}
    run = (comp.get("steps") or {}).get(step)
    for r in comp.get("rows") or ():
        if run in str(r.get("runs", "")).split(";") and (head is None or r["head"] == head) \
                and (protocol is None or str(r["protocol"]).startswith(protocol)):
            return r
    return None


def _as_report(row: dict, stat: str = "mean") -> dict | None:
    """A comparison row's means (or stds) in the shape of a report's headline numbers."""
    def g(m: str) -> float | None:
        return row.get(f"{m}_{stat}")

    if g("accuracy") is None:
        return None
    return {"accuracy": g("accuracy"),
            "macro": {"precision": g("macro_precision"), "recall": g("macro_recall"), "f1": g("macro_f1")},
            "weighted": {"precision": g("weighted_precision"), "recall": g("weighted_recall"), "f1": g("weighted_f1")}}


def _ours(results: dict[str, Any], step: str, fallback: dict | None, head: str | None = None,
          protocol: str | None = None) -> tuple[dict | None, dict | None]:
    """(mean, std) of our measurement of ``step``: its comparison row, or (a folder written
    before reproduce compared its steps) the step's own numbers."""
    row = _compare_row(results, step, head, protocol)
    if row is None:
        return fallback, None
    return _as_report(row), (_as_report(row, "std") if row.get("n", 1) > 1 else None)


def tables_markdown(results: dict[str, Any]) -> str:
    """The paper's table layouts with our measurement and the paper's number side by side.

    Our summary numbers are the rows of the run's comparison (``results["comparison"]``, from
    :func:`clip_heads.compare.compare_runs` over every step), per-class numbers the steps' own.
    """
    zs = results["zero_shot"]
    data = results.get("data") or {}

    def n(ds: str) -> str:  # "CIFAR-100: 916 images" beside a table's title, so no sample passes for the whole set
        return f"{data[ds]['n_images']:,} images" if ds in data else "images not recorded"

    def ours(step: str, fallback: dict | None, **kw: Any) -> dict | None:
        return _ours(results, step, fallback, **kw)[0]

    source = ("Every *ours* summary number is a row of `comparison/comparison.csv` (clip-heads compare over "
              "every step's folder; CV: mean over folds).\n" if results.get("comparison") else "")
    parts = [
        "# Bondielli & Passaro (2021), reproduced with clip-heads\n",
        f"Model `{results['model']}`; {results['cv']}-fold stratified CV, seed {results['seed']}. "
        "Columns marked *paper* are the numbers printed in the paper (ViT-B/32, OpenAI `clip` package), "
        "transcribed for comparison; columns marked *ours* were measured by this run.\n" + source,
        data_markdown(results["data"]) if "data" in results else "",
        _summary_table(f"Table 1: zero-shot (CIFAR-100: {n('cifar100')}; FI: {n('fi')})",
                       [("CIFAR-100", ours("zero-shot/cifar100", zs["cifar100"]), PAPER["table1"]["cifar100"]),
                        ("Image-Emotion (FI)", ours("zero-shot/fi", zs["fi"]), PAPER["table1"]["fi"])]),
        _per_class_table(f"Table 2: zero-shot per class on FI ({n('fi')})", zs["fi"], PAPER["table2"]),
    ]
    if "finetune_cv" in results:
        ft = results["finetune_cv"]
        parts += [
            _summary_table(f"Table 3: Emotion-CLIP, {results['cv']}-fold CV on FI (mean over folds; {n('fi')})",
                           [("FI", ours("finetune/fi", ft["fi"]["mean"]), PAPER["table3"])]),
            _per_class_table("Table 3, per class", ft["fi"]["mean"], {}),
            _summary_table(f"Table 4: CIFAR100-CLIP, {results['cv']}-fold CV on CIFAR-100 (mean over folds; {n('cifar100')})",
                           [("CIFAR-100", ours("finetune/cifar100", ft["cifar100"]["mean"]), PAPER["table4"])]),
        ]
        t5 = results["table5"]
        b1 = {"head": f"WiSE-FT alpha {1.0:.2f}", "protocol": "zero-shot on B"}
        parts.append(_summary_table(f"Table 5: fine-tuned on one dataset, zero-shot on the other (CIFAR-100: {n('cifar100')}; "
                                    f"FI: {n('fi')})", [
            ("Emotion-CLIP on CIFAR-100", ours("table5/emotion-clip-on-cifar100",
                                               t5["emotion-clip-on-cifar100"]["finetuned_b"], **b1),
             PAPER["table5"]["emotion-clip-on-cifar100"]),
            ("CIFAR100-CLIP on FI", ours("table5/cifar100-clip-on-fi", t5["cifar100-clip-on-fi"]["finetuned_b"], **b1),
             PAPER["table5"]["cifar100-clip-on-fi"]),
        ]))
        for name, t in t5.items():
            lines = [f"### WiSE-FT: {name} (alpha 0 = zero-shot CLIP, 1 = fine-tuned)\n", "| alpha | accuracy on the other dataset | macro F1 |", "|---|---|---|"]
            for r in t["rows"]:
                m = ours(f"table5/{name}", {"accuracy": r["b_accuracy"], "macro": {"f1": r["b_macro_f1"]}},
                         head=f"WiSE-FT alpha {r['alpha']:.2f}", protocol="zero-shot on B")
                lines.append(f"| {r['alpha']:.2f} | {_fmt(m['accuracy'])} | {_fmt(m['macro']['f1'])} |")
            parts.append("\n".join(lines) + "\n")
    else:
        parts.append("Tables 3-5 need full fine-tunes of CLIP; rerun without `--no-finetune` (a GPU job).\n")
    for ds, label in (("fi", "FI"), ("cifar100", "CIFAR-100")):
        rows = [("zero-shot (no training)", ours(f"zero-shot/{ds}", results["zero_shot"][ds]), None)]
        for k, v in results["heads"].items():
            if k.startswith(ds + "/"):
                head = k.split("/")[1]
                mean, std = _ours(results, f"heads/{ds}/{head}", v["mean"], protocol=f"{results['cv']}-fold cv")
                if mean is v["mean"]:  # no comparison row: the step's own std
                    std = v["std"]
                rows.append((f"{head} head", mean, std))
        parts.append(_heads_table(f"Beyond the paper: heads on frozen CLIP vectors, {results['cv']}-fold CV on {label} "
                                  f"({n(ds)})", rows))
    return "\n".join(parts)
