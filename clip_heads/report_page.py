"""``index.html``: one self-contained page per results folder, from the dicts it shows.

The page holds the run's provenance (store, model and weights hash, prompt set, head and its
parameters, seed, CV folds, library versions), the metrics in the paper's table layout
(rows per class, then Macro Avg., Weighted Avg., Accuracy; ``mean ± std`` for CV), an
ablation's, a WiSE-FT curve's or a comparison's rows, and every plot, referenced by a path
relative to the page. No script, no stylesheet or font from the network: it opens the same
from a laptop's disk as from a cluster's.

Every number in a table is a ``<span class="num">`` whose ``data-key`` is the JSON list of
keys leading to it in ``metrics.json`` and whose ``data-value`` is its exact value, so the
page can be checked against the file (tests do) and a value copied at full precision.

* :func:`write_index` - the page from a provenance dict, a metrics dict and plot files.
* :func:`metrics_table`, :func:`evaluation_sections` - the paper's table; the evaluations a metrics.json holds.

What a results folder's page shows, and its figures, are :mod:`clip_heads.report_folder`'s.
"""
from __future__ import annotations

import html
import json
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, Union

__all__ = ["INDEX", "CAPTIONS", "metrics_table", "evaluation_sections", "generalisation_sections", "few_shot_sections", "write_index"]

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
pre{background:#f7f7f7;padding:.8em;overflow-x:auto;font-size:.88em}
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
    how = "; ".join(f"{label}: {cal[k]}" for k, label in (("probabilities", "probabilities"), ("computed", "computed"))
                    if cal.get(k))
    names = (("ece", "ECE (15 bins)"), ("mce", "MCE"), ("brier", "Brier"), ("brier_binary", "Brier (binary, sklearn)"),
             ("nll", "NLL"), ("mean_confidence", "mean confidence"), ("accuracy", "accuracy"))
    return ("<h3>Calibration</h3>" + (f'<p class="note">{_e(how)}</p>' if how else "") + _small_table(cal, names, key, digits)
            + f'<p class="note">Brier: {_e(cal.get("conventions", {}).get("brier", ""))}</p>')


def _soft(soft: dict, key: tuple, digits: int) -> str:
    k = soft.get("k", 2)
    computed = f"; {soft['computed']}" if soft.get("computed") else ""
    return (f"<h3>Soft labels</h3><p class=\"note\">over {_e(', '.join(soft['columns']))}{_e(computed)}</p>"
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
    if metrics.get("kind") == "generalisation" and isinstance(metrics.get("reports"), dict):
        return generalisation_sections(metrics)
    if metrics.get("kind") == "few-shot" and isinstance((metrics.get("pooled") or {}).get("heads"), dict):
        return few_shot_sections(metrics)
    titles = {"cv": "Cross-validation", "eval": "Held-out store", "train": "Training data (resubstitution)",
              "rank1": "Rank-1 prompt of the ablation"}
    for sec in ("cv", "eval", "train", "rank1"):
        if isinstance(metrics.get(sec), dict) and ("per_class" in metrics[sec] or metrics[sec].get("kind") == "cv"):
            out.append((titles[sec], (sec,), metrics[sec]))
    return out


def few_shot_sections(metrics: dict) -> list[tuple[str, tuple, dict]]:
    """A few-shot grid's heads at its largest shot count, each head's test predictions pooled
    over the seeds (:func:`clip_heads.fewshot.run_few_shot`): one section per head."""
    pooled = metrics["pooled"]
    k, seeds = pooled.get("shots"), pooled.get("seeds") or []
    at = "all training images" if k == "all" else f"{k} shots per class"
    return [(f"{h} at {at}, test predictions pooled over seeds {', '.join(map(str, seeds))}",
             ("pooled", "heads", h), rep) for h, rep in pooled["heads"].items() if isinstance(rep, dict)]


def generalisation_sections(metrics: dict) -> list[tuple[str, tuple, dict]]:
    """The endpoints of a generalisation's WiSE-FT curve (its lowest and highest alpha: the
    zero-shot and the fine-tuned model when 0 and 1 were scored), on held-out A and on B."""
    reports = metrics["reports"]
    alphas = sorted(reports, key=float)
    names = {0.0: "the zero-shot model", 1.0: "the fine-tuned model"}
    out = []
    for alpha in dict.fromkeys([alphas[0], alphas[-1]]) if alphas else ():
        for side, where in (("a", "held-out A"), ("b", "B")):
            rep = (reports[alpha] or {}).get(side)
            if isinstance(rep, dict) and "per_class" in rep:
                who = names.get(float(alpha), "the blend")
                out.append((f"alpha {alpha} ({who}), zero-shot on {where}", ("reports", alpha, side), rep))
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
        if depth >= 3:
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
# What each figure shows, for its caption (by file stem).
CAPTIONS = {
    "confusion_matrix": "Confusion matrix: rows are the true class, colour is the fraction of that row",
    "per_class": "Precision, recall and F1 per class, with the support beside them",
    "fold_spread": "Each headline metric over the folds (box: quartiles; dots: folds; diamond: mean)",
    "reliability": "Reliability diagram: accuracy per confidence bin against the diagonal, and how many samples "
                   "each bin holds",
    "soft_labels": "Predicted versus voted emotion distributions, by each image's top vote",
    "ablation": "Zero-shot accuracy and macro-F1 of every template alone and of every set's ensemble, ranked",
    "wise_ft": "WiSE-FT: zero-shot on held-out A and on B along the blend of the zero-shot and the fine-tuned model",
    "wise_ft_calibration": "WiSE-FT: ECE and NLL of each blend's probabilities on held-out A and on B",
    "few_shot": "Few-shot: test accuracy against shots per class, per head (error bars: std over seeds)",
    "training": "Fine-tune: the loss of every optimiser step (diamonds: each epoch's mean) and the learning rate",
    "comparison": "Headline metrics of every row of the comparison (error bars: std over folds or seeds)",
    "top_k": "The images nearest each class prompt, best first; caption: cosine, and the image's own label "
             "(green: the prompt's class)",
}


def _figure_html(full: Path, root: Path) -> str:
    rel = full.relative_to(root).as_posix()
    svg = full.with_suffix(".svg")
    link = f' · <a href="{_e(svg.relative_to(root).as_posix())}">SVG</a>' if svg.is_file() and svg != full else ""
    caption = CAPTIONS.get(full.stem, full.stem.replace("_", " "))
    return (f'<figure><a href="{_e(rel)}"><img src="{_e(rel)}" alt="{_e(caption)}"{_png_css_width(full)}></a>'
            f"<figcaption>{_e(caption)} <span class=\"note\">({_e(rel)}{link})</span></figcaption></figure>")


def write_index(out_dir: PathLike, provenance: Mapping[str, Any], metrics: dict, plots: Sequence[PathLike] = (),
                title: str | None = None, digits: int = 3, links: Sequence[tuple[str, str]] = (),
                notes: Sequence[str] = (), blocks: Sequence[tuple[str, str]] = (), name: str | None = None,
                link_root: PathLike | None = None) -> Path:
    """Write ``out_dir/index.html`` (atomically) and return its path.

    Parameters
    ----------
    provenance : what was run, on what (:func:`provenance_from_metrics` builds it); nested
        dicts become nested tables.
    metrics : the folder's metrics.json dict; every evaluation in it gets the paper's table,
        plus calibration and soft-label numbers where present, an ablation its ranked rows, a
        generalisation its WiSE-FT rows and a comparison its rows.
    plots : image files inside ``out_dir`` (PNG shown; an SVG of the same name is linked).
    links : ``(relative path, label)`` of pages below this one (a train-head section, a demo step).
    notes : lines shown under the heading (figures skipped, say).
    name : the folder's name as shown (default ``out_dir``'s; a staging folder passes its final one).
    link_root : a second folder ``links`` may exist in, relative to it (a staging folder passes
        the one it becomes, which holds the pages below); each must exist in one of the two.
    blocks : ``(heading, text)`` shown after the provenance: a summary's headline (as it was
        printed) or markdown tables (``.md`` headings, tables, lists; reproduce's tables.md).
    digits : decimals shown (the exact value is in each number's ``data-value``).
    """
    from clip_heads.version import __version__
    from clip_heads.fsutil import atomic_write_text

    out = Path(out_dir)
    root = out.resolve()
    figures = []
    listed = {Path(q) for q in plots}
    for p in plots:
        p = Path(p)
        if p.suffix.lower() == ".svg" and p.with_suffix(".png") in listed:
            continue  # linked from its PNG
        full = (p if p.is_absolute() else out / p).resolve()
        if not full.is_file():
            raise FileNotFoundError(f"plot {p} does not exist")
        try:
            full.relative_to(root)
        except ValueError:
            raise ValueError(f"plot {p} is not inside {out}: the page references images by relative path") from None
        figures.append(_figure_html(full, root))
    command = (provenance.get("command") or "results")
    heading = f"clip-heads {command}" + (f": {provenance['head']}" if provenance.get("head") else "")
    if provenance.get("store"):
        heading += f" on {Path(str(provenance['store'])).name}"
    heading = title or heading
    body = [f"<h1>{_e(heading)}</h1>",
            f'<p class="sub">{_e(name or out.name)} · written {_e(time.strftime("%Y-%m-%d %H:%M"))} by clip-heads '
            f"{_e(__version__)}</p>"]
    body += [f'<p class="note">{_e(n)}</p>' for n in notes]
    if links:
        base = Path(link_root).resolve() if link_root is not None else root
        for href, _ in links:
            if not ((root / href).is_file() or (base / href).is_file()):
                raise FileNotFoundError(f"linked page {href} does not exist in {out}")
        body.append("<h2>Pages</h2><ul>" + "".join(f'<li><a href="{_e(h)}">{_e(label)}</a></li>'
                                                   for h, label in links) + "</ul>")
    body += ["<h2>Provenance</h2>", _value_html(dict(provenance))]
    for name, text in blocks:
        body.append(f"<h2>{_e(name)}</h2>" + (_markdown_html(text) if text.lstrip().startswith("#")
                                               else f"<pre>{_e(text)}</pre>"))
    sections = evaluation_sections(metrics)
    rows = metrics.get("rows") if isinstance(metrics.get("rows"), list) else []
    if sections or rows or metrics.get("kind") in ("wise-ft", "finetune", "few-shot"):
        body.append("<h2>Metrics</h2>")
    if metrics.get("kind") == "few-shot" and isinstance(metrics.get("table"), dict):
        body.append(_few_shot_html(metrics, digits))
    if metrics.get("kind") == "few-shot" and isinstance(metrics.get("calibration_table"), dict):
        body.append(_few_shot_calibration_html(metrics, digits))
    if metrics.get("kind") == "finetune":
        body.append(_finetune_html(metrics, digits))
    if rows and "rank" in rows[0]:
        body.append("<h3>Prompt ablation, ranked by accuracy</h3>" + _rows_table(
            rows, (("rank", "Rank"), ("prompt_set", "Prompt set"), ("template", "Template"),
                   ("accuracy", "Accuracy"), ("macro_f1", "Macro-F1"), ("weighted_f1", "Weighted-F1")),
            ("rows",), digits))
    elif rows and "alpha" in rows[0]:
        body.append("<h3>WiSE-FT curve</h3>" + _rows_table(
            rows, (("alpha", "alpha"), ("a_accuracy", "A accuracy"), ("a_macro_f1", "A macro-F1"),
                   ("b_accuracy", "B accuracy"), ("b_macro_f1", "B macro-F1")), ("rows",), digits))
        body.append('<p class="note">A: held-out part of the fine-tuning data (empty when nothing was held out); '
                    "B: the other dataset, zero-shot. alpha 0 is the zero-shot model, 1 the fine-tuned one.</p>")
        if any(r.get("b_ece") is not None for r in rows):
            body.append("<h3>Calibration along the curve</h3>" + _rows_table(
                rows, (("alpha", "alpha"), ("a_ece", "A ECE"), ("a_brier", "A Brier"), ("a_nll", "A NLL"),
                       ("b_ece", "B ECE"), ("b_brier", "B Brier"), ("b_nll", "B NLL")), ("rows",), digits))
            body.append('<p class="note">Each blend\'s probabilities by its own scoring rule (CLIP: softmax over '
                        "logit_scale * cos). ECE: top-label confidence in 15 equal-width bins; Brier: sum over "
                        "classes of the squared error, range [0, 2]; NLL: natural log.</p>")
    elif rows and "protocol" in rows[0]:
        body.append("<h3>Comparison</h3>" + _comparison_table(metrics, digits))
    if metrics.get("kind") == "wise-ft":
        body.append(_wise_ft_html(metrics))
    for name, key, rep in sections:
        body.append(_section_html(name, key, rep, digits))
    if figures:
        body += ["<h2>Plots</h2>"] + figures
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(heading)}</title><style>{_CSS}</style></head>\n<body>\n" + "\n".join(body)
            + "\n</body></html>\n")
    return atomic_write_text(out / INDEX, page)


def _inline(text: str) -> str:
    import re

    text = _e(text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)
    return re.sub(r"(?<![\w*])\*([^*\s][^*]*)\*(?![\w*])", r"<i>\1</i>", text)


def _markdown_html(text: str) -> str:
    """The markdown clip-heads writes (headings, pipe tables, ``- `` lists, paragraphs) as HTML."""
    out: list[str] = []
    table: list[list[str]] = []
    items: list[str] = []

    def flush() -> None:
        if table:
            head, *rows = table
            out.append('<table class="metrics"><tr>' + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr>"
                       + "".join("<tr>" + "".join(f'<td class="n">{_inline(c)}</td>' if c[:1].isdigit() or c == "–"
                                                  else f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rows)
                       + "</table>")
            table.clear()
        if items:
            out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in items) + "</ul>")
            items.clear()

    for line in text.splitlines():
        t = line.strip()
        if t.startswith("|"):
            cells = [c.strip() for c in t.strip("|").split("|")]
            if not all(set(c) <= set("-: ") for c in cells):  # not the |---| line
                table.append(cells)
            continue
        flush()
        if t.startswith("#"):  # under the page's own h2: '#' and '##' are h3, deeper h4
            level = 3 if len(t) - len(t.lstrip("#")) <= 2 else 4
            out.append(f"<h{level}>{_inline(t.lstrip('#').strip())}</h{level}>")
        elif t.startswith("- "):
            items.append(t[2:])
        elif t:
            out.append(f"<p>{_inline(t)}</p>")
    flush()
    return "\n".join(out)


def _comparison_table(metrics: dict, digits: int) -> str:
    """A comparison's rows (compare.py's metrics.json): its attributes, then mean ± std per metric."""
    rows = metrics["rows"]
    by = (metrics.get("info") or {}).get("run", {}).get("by") or [c for c in ("head", "model", "prompt_set", "store")
                                                                  if c in rows[0]]
    names = [m[:-5] for m in rows[0] if m.endswith("_mean")]
    head = "".join(f"<th>{_e(c)}</th>" for c in [*by, "protocol", "data", "n"])
    head += "".join(f'<th class="n">{_e(m.replace("_", "-"))}</th>' for m in names)
    body = []
    for i, r in enumerate(rows):
        cells = [f"<td>{_e(r.get(c, ''))}</td>" for c in [*by, "protocol"]]
        cells.append(f"<td><code>{_e(r.get('data_short', ''))}</code>{' (mixed)' if r.get('mixed_data') else ''}</td>")
        cells.append(f"<td>{_e(r['n'])} {_e(r.get('over') or '')}</td>")
        for m in names:
            v, sd = r.get(f"{m}_mean"), r.get(f"{m}_std")
            cell = _num(v, ("rows", i, f"{m}_mean"), digits)
            if sd is not None:
                cell += " ± " + _num(sd, ("rows", i, f"{m}_std"), digits)
            cells.append(f'<td class="n">{cell}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    unread = metrics.get("unreadable") or []
    note = ('<p class="note">Mean ± std (ddof=0) over the folds of one CV run or the seeds of one few-shot cell, or '
            'over the runs (seeds) of a row.</p>'
            + ("".join(f'<p class="note">not read: <code>{_e(p)}</code>: {_e(why)}</p>' for p, why in unread)))
    return f'<table class="metrics"><tr>{head}</tr>' + "".join(body) + "</table>" + note


def _few_shot_html(metrics: dict, digits: int) -> str:
    """A few-shot grid: test accuracy (%) mean ± std over seeds, rows heads, columns shots."""
    table = metrics["table"]
    shots = list(next(iter(table.values()))) if table else []
    head = "<tr><th>head</th>" + "".join(f'<th class="n">{_e(k if k == "all" else k + " shots")}</th>'
                                         for k in shots) + "</tr>"
    body = []
    for h, cells in table.items():
        tds = "".join(f'<td class="n">{_num(cells[k]["mean"], ("table", h, k, "mean"), digits)} ± '
                      f'{_num(cells[k]["std"], ("table", h, k, "std"), digits)}</td>' for k in shots)
        body.append(f"<tr><td>{_e(h)}</td>{tds}</tr>")
    n_seeds = sorted({c.get("n_seeds") for cells in table.values() for c in cells.values()})
    return ("<h3>Few-shot test accuracy (%)</h3>" + f'<table class="metrics">{head}{"".join(body)}</table>'
            + f'<p class="note">Mean ± std (ddof=1) over {"/".join(map(str, n_seeds))} seeds; every head at a (seed, '
              f"shots) fitted on the same images; {_num(metrics.get('n_train'), ('n_train',), digits)} training "
              f"images to draw from, {_num(metrics.get('n_test'), ('n_test',), digits)} test images. Per-seed scores "
              "in few_shot.csv.</p>")


def _few_shot_calibration_html(metrics: dict, digits: int) -> str:
    """A few-shot grid's ECE, Brier and NLL: mean ± std over seeds, rows heads, columns shots."""
    table = metrics["calibration_table"]
    shots = list(next(iter(table.values()))) if table else []
    out = []
    for m, title in (("ece", "ECE (15 bins)"), ("brier", "Brier score"), ("nll", "NLL")):
        head = f"<tr><th>{_e(title)}</th>" + "".join(f'<th class="n">{_e(k if k == "all" else k + " shots")}</th>'
                                                     for k in shots) + "</tr>"
        body = []
        for h, cells in table.items():
            tds = "".join(f'<td class="n">{_num(c["mean"], ("calibration_table", h, k, m, "mean"), digits)} ± '
                          f'{_num(c["std"], ("calibration_table", h, k, m, "std"), digits)}</td>'
                          if isinstance(c := cells[k].get(m), dict) else '<td class="n">–</td>' for k in shots)
            body.append(f"<tr><td>{_e(h)}</td>{tds}</tr>")
        out.append(f'<table class="metrics">{head}{"".join(body)}</table>')
    return ("<h3>Few-shot calibration of the test probabilities</h3>" + "".join(out)
            + '<p class="note">Mean ± std (ddof=1) over seeds of each fit\'s ECE (top-label confidence, 15 '
              "equal-width bins), Brier score (sum over classes of the squared error, range [0, 2]) and NLL "
              "(natural log), from the head's predict_proba; '–': the head has no probabilities. Per-seed values "
              "in few_shot.csv.</p>")


def _finetune_html(metrics: dict, digits: int) -> str:
    """A fine-tune's training: steps, images, skipped, and each epoch's mean loss and time."""
    epochs = metrics.get("epochs") or []
    summary = _small_table(metrics, (("n_steps", "optimiser steps"), ("n_train", "training images")), (), digits)
    status = f'<p class="note">status: {_e(metrics["status"])}</p>' if metrics.get("status") else ""
    skipped = metrics.get("skipped") or {}
    note = (f'<p class="note">{len(skipped)} unreadable images skipped: '
            + _e(", ".join(list(skipped)[:10]) + (" …" if len(skipped) > 10 else "")) + "</p>") if skipped else ""
    table = _rows_table(epochs, (("epoch", "Epoch"), ("loss", "Mean loss"), ("seconds", "Seconds"),
                                 ("data_wait_fraction", "Data wait (fraction)")), ("epochs",), digits) if epochs else ""
    return ("<h3>Training</h3>" + status + summary + note + table
            + '<p class="note">Loss: the family\'s contrastive loss on (image, class caption) batches. The model is '
              "scored by <code>clip-heads finetune --cv</code> or <code>generalisation</code>, or encode a store with "
              "<code>clip-heads encode --model</code> this folder.</p>")


def _wise_ft_html(metrics: dict) -> str:
    """A WiSE-FT blend (its endpoints and alpha) or a sweep (its blends)."""
    if "blends" in metrics:
        return ("<h3>Blends</h3><table class=\"prov\">" + "".join(
            f"<tr><th>alpha {_e(a)}</th><td><code>{_e(p)}</code></td></tr>" for a, p in metrics["blends"].items())
            + '</table><p class="note">Model folders only: score them with <code>clip-heads encode --model</code>, '
              "or run <code>clip-heads generalisation</code> for the curve.</p>")
    rows = [(label, metrics.get(side) or {}) for label, side in (("zero-shot endpoint (alpha 0)", "zero_shot"),
                                                                  ("fine-tuned endpoint (alpha 1)", "finetuned"))]
    return (f"<h3>Blend at alpha {_e(metrics.get('alpha'))}</h3>" + _value_html(dict(rows)))


def _png_css_width(path: Path) -> str:
    """A ``style`` giving a PNG its physical size (CSS has 96 px per inch): the resolution its
    ``pHYs`` chunk records (matplotlib's 150 dpi; a top-k grid's 96), 150 dpi where it records
    none, so a figure shows at the size it was drawn for and stays sharp on high-density screens."""
    from clip_heads.plots import DPI

    data = path.read_bytes()[:4096] if path.suffix.lower() == ".png" else b""
    if len(data) < 24 or data[:8] != b"\x89PNG\r\n\x1a\n":
        return ""
    width = int.from_bytes(data[16:20], "big")
    dpi, pos = float(DPI), 8
    while pos + 8 <= len(data):  # chunks before the image data: IHDR, pHYs, ...
        size, kind = int.from_bytes(data[pos:pos + 4], "big"), data[pos + 4:pos + 8]
        if kind == b"pHYs" and pos + 17 <= len(data) and data[pos + 16] == 1:  # unit: metre
            dpi = int.from_bytes(data[pos + 8:pos + 12], "big") * 0.0254
            break
        if kind == b"IDAT":
            break
        pos += 12 + size
    return f' style="width:{round(width * 96 / dpi)}px"'
