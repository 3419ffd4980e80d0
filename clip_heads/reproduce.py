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
from .results import Report

logger = logging.getLogger(__name__)

HEADS = ("linear", "mlp", "contrastive", "tip-adapter")
CIFAR100_SIZES = {"all": 60_000, "train": 50_000, "test": 10_000}

# Transcribed from Bondielli & Passaro (2021), Tables 1-5. (precision, recall, F1) for macro and
# weighted averages, then accuracy. These are the paper's numbers, never ours.
PAPER: dict[str, Any] = {
    "table1": {
        "cifar100": {"macro": (0.69, 0.62, 0.61), "weighted": (0.69, 0.62, 0.61), "accuracy": 0.62},
        "fi": {"macro": (0.46, 0.44, 0.42), "weighted": (0.52, 0.49, 0.48), "accuracy": 0.49},
    },
    "table2": {  # zero-shot per class on FI: precision, recall, F1
        "amusement": (0.80, 0.45, 0.58), "anger": (0.46, 0.37, 0.41), "awe": (0.38, 0.75, 0.50),
        "contentment": (0.61, 0.72, 0.66), "disgust": (0.36, 0.10, 0.16), "excitement": (0.45, 0.43, 0.44),
        "fear": (0.30, 0.49, 0.37), "sadness": (0.30, 0.20, 0.24),
    },
    "table3": {"macro": (0.64, 0.65, 0.64), "weighted": (0.70, 0.67, 0.68), "accuracy": 0.67},
    "table4": {"macro": (0.82, 0.81, 0.81), "weighted": (0.82, 0.82, 0.81), "accuracy": 0.81},
    "table5": {
        "emotion-clip-on-cifar100": {"macro": (0.57, 0.41, 0.40), "weighted": (0.57, 0.41, 0.40), "accuracy": 0.41},
        "cifar100-clip-on-fi": {"macro": (0.43, 0.30, 0.30), "weighted": (0.50, 0.39, 0.34), "accuracy": 0.39},
    },
}


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

    Every step writes into its own folder and is skipped on a rerun when complete (stores,
    fine-tune folds and WiSE-FT blends resume), so an interrupted reproduction continues.
    ``metrics.json`` (``data``, and ``info.run`` / ``info.data`` as every results folder) and the
    top of ``tables.md`` state what was measured: per dataset the split, number of images and
    store fingerprint; a CIFAR-100 split smaller than the official one is flagged, so a sample
    cannot pass for the paper's data. ``report.txt`` holds the same text as ``tables.md``.
    Returns a :class:`~clip_heads.results.Report` whose ``metrics`` are what metrics.json holds.
    """
    from .encode import encode
    from .evaluate import run_zero_shot, train_head
    from .results import METRICS, REPORT, data_record, results_files, write_json

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
    zs = {
        "fi": run_zero_shot(str(stores["fi"]), prompt_set="bp-emotion", out_dir=out / "zero-shot" / "fi",
                            overwrite=True).metrics,
        "cifar100": run_zero_shot(str(stores["cifar100"]), prompt_set="bp-photo", out_dir=out / "zero-shot" / "cifar100",
                                  overwrite=True).metrics,
    }
    results["zero_shot"] = zs

    # Beyond the paper: heads on the frozen vectors, k-fold CV on the fine-tune's folds.
    results["heads"] = {}
    for name, store in stores.items():
        for head in heads:
            rep = train_head(head, str(store), out / "heads" / f"{name}-{head}", cv=cv, seed=seed, progress=progress)
            results["heads"][f"{name}/{head}"] = {"mean": rep.metrics["cv"]["mean"], "std": rep.metrics["cv"]["std"]}

    if finetune:
        from .finetune_cv import cross_validate_finetune
        from .wise_ft import generalisation

        ft = dict(finetune_options or {}, device=device, workers=workers, progress=progress)
        results["finetune_cv"] = {
            "fi": cross_validate_finetune(str(fi), out / "finetune" / "fi-cv", model, cv=cv, seed=seed, format="fi",
                                          **ft).metrics,
            "cifar100": cross_validate_finetune(str(cifar), out / "finetune" / "cifar100-cv", model, cv=cv, seed=seed,
                                                format="cifar100", source_options=cifar_opts, **ft).metrics,
        }
        gen = {
            "emotion-clip-on-cifar100": generalisation(str(fi), str(cifar), out / "table5" / "emotion-clip-on-cifar100", model,
                                                       alphas=alphas, holdout=None, seed=seed, a_format="fi",
                                                       b_format="cifar100", b_options=cifar_opts, **ft),
            "cifar100-clip-on-fi": generalisation(str(cifar), str(fi), out / "table5" / "cifar100-clip-on-fi", model,
                                                  alphas=alphas, holdout=None, seed=seed, a_format="cifar100",
                                                  a_options=cifar_opts, b_format="fi", **ft),
        }
        results["table5"] = {k: {"rows": v["rows"], "finetuned_b": v["reports"][f"{1.0:.2f}"]["b"]} for k, v in gen.items()}

    text = tables_markdown(results)
    run = {"command": "reproduce", "fi": str(fi), "cifar": str(cifar), "model": model, "cv": cv, "seed": seed,
           "heads": list(heads), "finetune": finetune, "alphas": list(alphas), "cifar_split": cifar_split}
    results = dict(results, info={"run": run, "data": results["data"]}, text=text)
    with results_files(out) as stage:
        (stage / "tables.md").write_text(text)
        (stage / REPORT).write_text(text)
        write_json(stage / METRICS, json.loads(json.dumps(results, default=str)))
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


def tables_markdown(results: dict[str, Any]) -> str:
    """The paper's table layouts with our measurement and the paper's number side by side."""
    zs = results["zero_shot"]
    data = results.get("data") or {}

    def n(ds: str) -> str:  # "CIFAR-100: 916 images" beside a table's title, so no sample passes for the whole set
        return f"{data[ds]['n_images']:,} images" if ds in data else "images not recorded"

    parts = [
        "# Bondielli & Passaro (2021), reproduced with clip-heads\n",
        f"Model `{results['model']}`; {results['cv']}-fold stratified CV, seed {results['seed']}. "
        "Columns marked *paper* are the numbers printed in the paper (ViT-B/32, OpenAI `clip` package), "
        "transcribed for comparison; columns marked *ours* were measured by this run.\n",
        data_markdown(results["data"]) if "data" in results else "",
        _summary_table(f"Table 1: zero-shot (CIFAR-100: {n('cifar100')}; FI: {n('fi')})",
                       [("CIFAR-100", zs["cifar100"], PAPER["table1"]["cifar100"]),
                        ("Image-Emotion (FI)", zs["fi"], PAPER["table1"]["fi"])]),
        _per_class_table(f"Table 2: zero-shot per class on FI ({n('fi')})", zs["fi"], PAPER["table2"]),
    ]
    if "finetune_cv" in results:
        ft = results["finetune_cv"]
        parts += [
            _summary_table(f"Table 3: Emotion-CLIP, {results['cv']}-fold CV on FI (mean over folds; {n('fi')})",
                           [("FI", ft["fi"]["mean"], PAPER["table3"])]),
            _per_class_table("Table 3, per class", ft["fi"]["mean"], {}),
            _summary_table(f"Table 4: CIFAR100-CLIP, {results['cv']}-fold CV on CIFAR-100 (mean over folds; {n('cifar100')})",
                           [("CIFAR-100", ft["cifar100"]["mean"], PAPER["table4"])]),
        ]
        t5 = results["table5"]
        parts.append(_summary_table(f"Table 5: fine-tuned on one dataset, zero-shot on the other (CIFAR-100: {n('cifar100')}; "
                                    f"FI: {n('fi')})", [
            ("Emotion-CLIP on CIFAR-100", t5["emotion-clip-on-cifar100"]["finetuned_b"], PAPER["table5"]["emotion-clip-on-cifar100"]),
            ("CIFAR100-CLIP on FI", t5["cifar100-clip-on-fi"]["finetuned_b"], PAPER["table5"]["cifar100-clip-on-fi"]),
        ]))
        for name, t in t5.items():
            lines = [f"### WiSE-FT: {name} (alpha 0 = zero-shot CLIP, 1 = fine-tuned)\n", "| alpha | accuracy on the other dataset | macro F1 |", "|---|---|---|"]
            lines += [f"| {r['alpha']:.2f} | {_fmt(r['b_accuracy'])} | {_fmt(r['b_macro_f1'])} |" for r in t["rows"]]
            parts.append("\n".join(lines) + "\n")
    else:
        parts.append("Tables 3-5 need full fine-tunes of CLIP; rerun without `--no-finetune` (a GPU job).\n")
    for ds, label in (("fi", "FI"), ("cifar100", "CIFAR-100")):
        rows = [("zero-shot (no training)", results["zero_shot"][ds], None)]
        rows += [(f"{k.split('/')[1]} head", v["mean"], v["std"]) for k, v in results["heads"].items() if k.startswith(ds + "/")]
        parts.append(_heads_table(f"Beyond the paper: heads on frozen CLIP vectors, {results['cv']}-fold CV on {label} "
                                  f"({n(ds)})", rows))
    return "\n".join(parts)
