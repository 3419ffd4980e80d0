"""``index.html``: one self-contained page per results folder.

The page holds the run's provenance (store, model and weights hash, prompt set, head and its
parameters, seed, CV folds, library versions), the metrics in the paper's table layout
(rows per class, then Macro Avg., Weighted Avg., Accuracy; ``mean ± std`` for CV), and every
plot, referenced by a path relative to the page. No script, no stylesheet or font from the
network: it opens the same from a laptop's disk as from a cluster's.

Every number in a table is a ``<span class="num">`` whose ``data-key`` is the JSON list of
keys leading to it in ``metrics.json`` and whose ``data-value`` is its exact value, so the
page can be checked against the file (tests do) and a value copied at full precision.

* :func:`write_index` - the page from a provenance dict, a metrics dict and plot files.
* :func:`provenance_from_metrics` - the provenance a ``metrics.json`` (and its store) records.
* :func:`render_folder` - plots and ``index.html`` for a results folder already written.
"""
from __future__ import annotations

import html
import json
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, Union

PathLike = Union[str, "os.PathLike[str]"]
INDEX = "index.html"
PRF = ("precision", "recall", "f1")
COLLAPSE_CLASSES = 30  # past this many classes the per-class table starts folded

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:2em auto;max-width:1250px;
padding:0 1.5em;color:#222;line-height:1.4}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.25em;margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
h3{font-size:1.05em;margin-top:1.4em}.sub{color:#666;margin-top:0}
table{border-collapse:collapse;margin:.6em 0 1em}td,th{padding:.22em .7em;border-bottom:1px solid #eee;vertical-align:top}
th{text-align:left;background:#f6f6f6}table.metrics td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
table.metrics th.n{text-align:right}table.metrics tr.avg td{background:#fafafa}table.metrics tr.first td{border-top:2px solid #ccc}
table.prov th{width:13em;font-weight:600;background:none;color:#444}table.prov table{margin:0}table.prov table td,table.prov table th{border:none;padding:.05em .6em .05em 0}
code{font-size:.92em;background:#f4f4f4;padding:0 .25em;border-radius:3px;word-break:break-all}
figure{margin:1.2em 0 2em}figure img{max-width:100%;height:auto;border:1px solid #eee}figcaption{color:#555;font-size:.92em}
.note{color:#666;font-size:.92em}details{margin:.4em 0 1em}summary{cursor:pointer;color:#345}
"""


# ---------------------------------------------------------------------------------------
# Pieces of HTML
# ---------------------------------------------------------------------------------------
def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _num(value: Any, key: Sequence[Any], digits: int) -> str:
    """A number with its metrics.json path; '–' for an undefined (None) value."""
    if value is None:
        return "–"
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else f"{float(value):.{digits}f}"
    return (f'<span class="num" data-key="{_e(json.dumps(list(key)))}" data-value="{_e(repr(value))}">'
            f"{text}</span>")


def _cell(mean: dict, std: dict | None, path: tuple, key: tuple, digits: int) -> str:
    def get(d: dict) -> Any:
        for p in path:
            d = d[p]
        return d

    v = get(mean)
    out = _num(v, key + path, digits)
    if std is not None and v is not None:
        out += " ± " + _num(get(std), key[:-1] + ("std",) + path, digits)
    return out


def metrics_table(report: dict, key: Sequence[Any] = (), digits: int = 3) -> str:
    """The paper's layout as an HTML table: one row per class, then Macro Avg., Weighted Avg.,
    Accuracy; columns Precision, Recall, F1-Score, Support. ``report`` is a report or a CV
    report (cells ``mean ± std``); ``key`` is its path in metrics.json."""
    key = tuple(key)
    cv = report.get("kind") == "cv"
    mean, std = (report["mean"], report["std"]) if cv else (report, None)
    mkey = key + ("mean",) if cv else key
    header = '<table class="metrics"><tr><th></th>' + "".join(f'<th class="n">{h}</th>' for h in
                                                             ("Precision", "Recall", "F1-Score", "Support")) + "</tr>"
    rows = [header]
    for c in mean["classes"]:
        pc = mean["per_class"][c]
        cells = "".join(f'<td class="n">{_cell(mean, std, ("per_class", c, m), mkey, digits)}</td>' for m in PRF)
        rows.append(f"<tr><td>{_e(c)}</td>{cells}"
                    f'<td class="n">{_num(pc["support"], mkey + ("per_class", c, "support"), digits)}</td></tr>')
    n = _num(mean["n_samples"], mkey + ("n_samples",), digits)
    for i, (label, avg) in enumerate((("Macro Avg.", "macro"), ("Weighted Avg.", "weighted"))):
        cells = "".join(f'<td class="n">{_cell(mean, std, (avg, m), mkey, digits)}</td>' for m in PRF)
        rows.append(f'<tr class="avg{" first" if i == 0 else ""}"><td>{label}</td>{cells}<td class="n">{n}</td></tr>')
    rows.append(f'<tr class="avg"><td>Accuracy</td><td></td><td></td>'
                f'<td class="n">{_cell(mean, std, ("accuracy",), mkey, digits)}</td><td class="n">{n}</td></tr>')
    rows.append("</table>")
    C = len(mean["classes"])
    if C > COLLAPSE_CLASSES:
        # Many classes: the averages first, the full table (same layout) one click away.
        summary = [header] + rows[1 + C:]
        rows = summary + [f"<details><summary>the table with all {C} classes</summary>"] + rows + ["</details>"]
    extra = [f"balanced accuracy {_cell(mean, std, ('balanced_accuracy',), mkey, digits)}"]
    for t in mean.get("top_k_accuracy", {}):
        extra.append(f"top-{_e(t)} accuracy {_cell(mean, std, ('top_k_accuracy', t), mkey, digits)}")
    note = ""
    if cv:
        note = (f'<p class="note">Mean ± std over the {report["k"]} folds (std with ddof=0). A per-class mean '
                f"covers only the folds that define the metric; '–': defined in no fold.</p>")
    return "\n".join(rows) + f'\n<p class="note">{"; ".join(extra)}</p>{note}'


def _small_table(metrics: dict, names: Iterable[tuple[str, str]], key: tuple, digits: int) -> str:
    cells = "".join(f"<tr><th>{_e(label)}</th><td>{_num(metrics[k], key + (k,), digits)}</td></tr>"
                    for k, label in names if k in metrics)
    return f'<table class="prov">{cells}</table>'


def _calibration(cal: dict, key: tuple, digits: int) -> str:
    return ("<h3>Calibration</h3>" + _small_table(cal, (("ece", "ECE (15 bins)"), ("mce", "MCE"), ("brier", "Brier"),
                                                        ("brier_binary", "Brier (binary, sklearn)"), ("nll", "NLL"),
                                                        ("mean_confidence", "mean confidence"),
                                                        ("accuracy", "accuracy")), key, digits)
            + f'<p class="note">Brier: {_e(cal.get("conventions", {}).get("brier", ""))}</p>')


def _soft(soft: dict, key: tuple, digits: int) -> str:
    k = soft.get("k", 2)
    return (f"<h3>Soft labels</h3><p class=\"note\">over {_e(', '.join(soft['columns']))}; "
            f"{_e(soft.get('computed', ''))}</p>"
            + _small_table(soft, (("kl", "mean KL(votes ‖ predicted)"), ("top1_agreement", "top-1 agreement"),
                                  (f"top{k}_agreement", f"top-{k} agreement"), ("n_samples", "samples"),
                                  ("n_dropped", "dropped (no mass)")), key, digits))


def _rows_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]], key: tuple, digits: int) -> str:
    head = "".join(f"<th>{_e(label)}</th>" for _, label in columns)
    body = []
    for i, r in enumerate(rows):
        cells = []
        for c, _ in columns:
            v = r.get(c)
            numeric = isinstance(v, (int, float)) and not isinstance(v, bool)
            cells.append(f'<td class="n">{_num(v, key + (i, c), digits)}</td>' if numeric or v is None
                         else f"<td>{_e(v)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="metrics"><tr>{head}</tr>' + "".join(body) + "</table>"


def evaluation_sections(metrics: dict) -> list[tuple[str, tuple, dict]]:
    """``(heading, key path, report)`` of every evaluation a metrics.json holds: the file
    itself (zero-shot, evaluate, fine-tune CV), train-head's ``cv``/``eval``/``train``, or an
    ablation's rank-1 prompt."""
    if "confusion_matrix" in metrics or metrics.get("kind") == "cv":
        return [("", (), metrics)]
    out = []
    titles = {"cv": "Cross-validation", "eval": "Held-out store", "train": "Training data (resubstitution)",
              "rank1": "Rank-1 prompt of the ablation"}
    for sec in ("cv", "eval", "train", "rank1"):
        if isinstance(metrics.get(sec), dict) and ("per_class" in metrics[sec] or metrics[sec].get("kind") == "cv"):
            out.append((titles[sec], (sec,), metrics[sec]))
    return out


def _section_html(heading: str, key: tuple, rep: dict, digits: int) -> str:
    parts = [f"<h3>{_e(heading)}</h3>" if heading else ""]
    info = rep.get("info") or {}
    if info.get("resubstitution"):
        parts.append('<p class="note"><b>Resubstitution</b>: scored on the data it was trained on (optimistic).</p>')
    parts.append(metrics_table(rep, key, digits))
    if rep.get("kind") == "cv" and "pooled" in rep:
        parts.append("<h3>Pooled out-of-fold predictions</h3>"
                     '<p class="note">All folds\' predictions scored as one set (each image by the fold model that '
                     "did not see it).</p>" + metrics_table(rep["pooled"], key + ("pooled",), digits))
    rule = (rep.get("decision_rule") or {}).get("text")
    if rule:
        parts.append(f'<p class="note">{_e(rule)}</p>')
    if "calibration" in rep:
        parts.append(_calibration(rep["calibration"], key + ("calibration",), digits))
    if "soft_labels" in rep:
        parts.append(_soft(rep["soft_labels"], key + ("soft_labels",), digits))
    return "\n".join(parts)


def _value_html(v: Any, depth: int = 0) -> str:
    if isinstance(v, Mapping):
        v = {k: x for k, x in v.items() if x not in (None, "", [], {})}
        if not v:
            return "–"
        if all(isinstance(x, str) and len(x) < 24 for x in v.values()) and len(v) > 3:
            return " · ".join(f"{_e(k)} {_e(x)}" for k, x in v.items())  # e.g. library versions, on one line
        if depth >= 2:
            return f"<code>{_e(json.dumps(v, default=str))}</code>"
        return '<table class="prov">' + "".join(f"<tr><th>{_e(k)}</th><td>{_value_html(x, depth + 1)}</td></tr>"
                                                for k, x in v.items()) + "</table>"
    if isinstance(v, (list, tuple)):
        if not v:
            return "–"
        shown = ", ".join(str(x) for x in v[:12]) + (f", … ({len(v)} in all)" if len(v) > 12 else "")
        return _e(shown)
    if v is None:
        return "–"
    return f"<code>{_e(v)}</code>" if isinstance(v, str) and ("/" in v or len(v) >= 32) else _e(v)


# ---------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------
def write_index(out_dir: PathLike, provenance: Mapping[str, Any], metrics: dict, plots: Sequence[PathLike] = (),
                title: str | None = None, digits: int = 3) -> Path:
    """Write ``out_dir/index.html`` (atomically) and return its path.

    Parameters
    ----------
    provenance : what was run, on what (:func:`provenance_from_metrics` builds it); nested
        dicts become nested tables.
    metrics : the folder's metrics.json dict; every evaluation in it gets the paper's table,
        plus calibration and soft-label numbers where present, an ablation its ranked rows and
        a generalisation its WiSE-FT rows.
    plots : image files inside ``out_dir`` (PNG shown; an SVG of the same name is linked).
    digits : decimals shown (the exact value is in each number's ``data-value``).
    """
    from clip_heads.version import __version__
    from clip_heads.fsutil import atomic_write_text

    out = Path(out_dir)
    root = out.resolve()
    figures = []
    for p in plots:
        p = Path(p)
        if p.suffix.lower() == ".svg" and p.with_suffix(".png") in {Path(q) for q in plots}:
            continue  # linked from its PNG
        full = (p if p.is_absolute() else out / p).resolve()
        if not full.is_file():
            raise FileNotFoundError(f"plot {p} does not exist")
        try:
            rel = full.relative_to(root).as_posix()
        except ValueError:
            raise ValueError(f"plot {p} is not inside {out}: the page references images by relative path") from None
        svg = full.with_suffix(".svg")
        link = f' · <a href="{_e(svg.relative_to(root).as_posix())}">SVG</a>' if svg.is_file() and svg != full else ""
        caption = full.stem.replace("_", " ")
        size = _png_css_width(full)
        figures.append(f'<figure><a href="{_e(rel)}"><img src="{_e(rel)}" alt="{_e(caption)}"{size}></a>'
                       f"<figcaption>{_e(rel)}{link}</figcaption></figure>")
    command = (provenance.get("command") or "results")
    what = [str(provenance[k]) for k in ("head",) if provenance.get(k)]
    if provenance.get("store"):
        what.append(f"on {Path(str(provenance['store'])).name}")
    heading = title or f"clip-heads {command}" + (f": {' '.join(what)}" if what else "")
    body = [f"<h1>{_e(heading)}</h1>",
            f'<p class="sub">{_e(out.name)} · written {_e(time.strftime("%Y-%m-%d %H:%M"))} by clip-heads '
            f"{_e(__version__)}</p>", "<h2>Provenance</h2>", _value_html(dict(provenance))]
    sections = evaluation_sections(metrics)
    if sections or "rows" in metrics:
        body.append("<h2>Metrics</h2>")
    if "rows" in metrics and metrics["rows"] and "rank" in metrics["rows"][0]:
        body.append("<h3>Prompt ablation, ranked by accuracy</h3>" + _rows_table(
            metrics["rows"], (("rank", "Rank"), ("prompt_set", "Prompt set"), ("template", "Template"),
                              ("accuracy", "Accuracy"), ("macro_f1", "Macro-F1"), ("weighted_f1", "Weighted-F1")),
            ("rows",), digits))
    elif "rows" in metrics and metrics["rows"] and "alpha" in metrics["rows"][0]:
        body.append("<h3>WiSE-FT curve</h3>" + _rows_table(
            metrics["rows"], (("alpha", "alpha"), ("a_accuracy", "A accuracy"), ("a_macro_f1", "A macro-F1"),
                              ("b_accuracy", "B accuracy"), ("b_macro_f1", "B macro-F1")), ("rows",), digits))
    for name, key, rep in sections:
        body.append(_section_html(name, key, rep, digits))
    if figures:
        body += ["<h2>Plots</h2>"] + figures
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(heading)}</title><style>{_CSS}</style></head>\n<body>\n" + "\n".join(body)
            + "\n</body></html>\n")
    return atomic_write_text(out / INDEX, page)


def _png_css_width(path: Path) -> str:
    """A ``style`` giving a 150-dpi PNG its figure's physical size (CSS has 96 px per inch), so
    it shows at the size it was drawn for and stays sharp on high-density screens."""
    from clip_heads.plots import DPI

    head = path.read_bytes()[:24] if path.suffix.lower() == ".png" else b""
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n":
        return ""
    width = int.from_bytes(head[16:20], "big")
    return f' style="width:{round(width * 96 / DPI)}px"'


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name in ("clip-heads", "numpy", "scikit-learn", "torch", "transformers", "h5py", "matplotlib"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def provenance_from_metrics(metrics: dict, read_store: bool = True) -> dict[str, Any]:
    """What a metrics.json says about its run, in reading order.

    ``info`` (top level, or an evaluation section's) gives the command, store, data record,
    model, prompt set, head, parameters, seed and label map; a CV report gives its folds. With
    ``read_store`` the store's own attributes add the model's revision and weights hash and the
    library versions it was encoded with (or say the store can no longer be read). The
    versions of this process are added as ``report rendered with``.
    """
    info = dict(metrics.get("info") or {})
    for sec in ("eval", "train"):
        if not info and isinstance(metrics.get(sec), dict):
            info = dict(metrics[sec].get("info") or {})
    run = info.get("run") or {}
    prov: dict[str, Any] = {"command": run.get("command") or ("fine-tune CV" if metrics.get("kind") == "cv" else None)}
    for k, label in (("store", "store"), ("model_id", "model"), ("prompt_set", "prompt set"), ("templates", "templates"),
                     ("head", "head"), ("head_params", "head parameters"), ("seed", "seed"), ("head_dir", "head folder"),
                     ("trained_on", "trained on"), ("eval_store", "evaluation store"),
                     ("resubstitution", "resubstitution")):
        v = info.get(k, run.get(k))
        if v not in (None, "", [], {}):
            prov[label] = v
    if run.get("label_map"):
        prov["label map"] = run["label_map"]
    cv = metrics.get("cv") if isinstance(metrics.get("cv"), dict) else metrics if metrics.get("kind") == "cv" else None
    if cv is not None:
        prov["CV folds"] = f"{cv.get('k')} (stratified, seed {cv.get('seed', run.get('seed', 'not recorded'))})"
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


def render_folder(out_dir: PathLike, digits: int = 3) -> Path:
    """Draw the plots of a results folder already written and write its ``index.html``.

    Reads ``metrics.json`` (or a generalisation's ``generalisation.json``); plots go to
    ``out_dir/plots/`` (replaced whole). Returns the page's path.
    """
    from clip_heads import plots as P
    from clip_heads.fsutil import staged_dir

    out = Path(out_dir)
    metrics_path, gen = out / "metrics.json", out / "generalisation.json"
    source = metrics_path if metrics_path.is_file() else gen if gen.is_file() else None
    if source is None:
        raise FileNotFoundError(f"{out} has no metrics.json (nor generalisation.json): not a clip-heads results folder")
    try:
        metrics = json.loads(source.read_text())
    except ValueError as e:
        raise ValueError(f"{source} is not valid JSON: {e}") from e
    written: list[Path] = []
    with staged_dir(out / "plots") as stage:
        if "rows" in metrics and metrics["rows"] and "alpha" in metrics["rows"][0]:
            points = P.paper_points(out.name) if out.name in P.PAPER_CURVES else None
            written += P.save_figure(P.wise_ft_figure(metrics, points), stage, "wise_ft")
        if "rows" in metrics and metrics["rows"] and "rank" in metrics["rows"][0]:
            written += P.save_figure(P.ablation_figure(metrics["rows"]), stage, "ablation")
        for _name, key, rep in evaluation_sections(metrics):
            sub = stage / key[0] if key else stage
            written += P.write_run_plots(rep, sub)
    final = [out / "plots" / p.relative_to(stage) for p in written]
    prov = provenance_from_metrics(metrics) if source == metrics_path else {
        "command": "generalisation", **{k: v for k, v in metrics.get("settings", {}).items()
                                        if k not in ("a_templates", "b_templates")}}
    return write_index(out, prov, metrics, final, digits=digits)
