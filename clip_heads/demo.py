"""`clip-heads demo`: the whole tool on real data, end to end.

Downloads the official CIFAR-100 python tarball (MD5-verified) unless ``source`` is given,
encodes a seeded sample of its test images with the model (the papers' ViT-B/32 by default),
then reports zero-shot with "a photo of a {}" (Bondielli & Passaro's setting, 0.62 accuracy in
their Table 1 on the full test set with the pretrained model), the prompt ablation, and 10-fold
CV of the linear and MLP heads. Everything lands under ``out_dir``: ``report.txt`` and
``metrics.json`` (which say what data was measured: split, images used of those available,
the store's fingerprint), the store, and one results folder per step.

A source is understood or refused (:func:`demo_source`): the official format, an image-folder
copy split into ``train/`` and ``test/`` (its ``test/`` is used, and the report says so), or a
plain folder of class folders; anything without CIFAR-100's 100 classes is refused.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path

from .catalog import DEFAULT_MODEL
from .results import Report

logger = logging.getLogger(__name__)

CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"


def md5_of(path: str | os.PathLike) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(url: str, dest: str | os.PathLike, md5: str, progress: bool = True, timeout: float = 60) -> Path:
    """Fetch ``url`` to ``dest`` unless a file with the right MD5 is already there.

    The bytes go to ``dest.part`` and are renamed only after the checksum matches, so a
    failed or tampered download never sits at ``dest``.
    """
    from tqdm.auto import tqdm

    from .fsutil import durable_replace

    dest = Path(dest)
    if dest.exists():
        if md5_of(dest) == md5:
            logger.info("using %s (checksum ok)", dest)
            return dest
        logger.warning("%s has the wrong checksum; downloading again", dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = Path(f"{dest}.part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(part, "wb") as out:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=not progress) as bar:
                for block in iter(lambda: r.read(1 << 20), b""):
                    out.write(block)
                    bar.update(len(block))
    except (urllib.error.URLError, OSError) as e:
        part.unlink(missing_ok=True)
        raise ValueError(f"cannot download {url}: {e}; pass --source PATH to a local copy") from e
    got = md5_of(part)
    if got != md5:
        part.unlink(missing_ok=True)
        raise ValueError(f"checksum mismatch for {url}: MD5 {got}, expected {md5}; the download was discarded")
    durable_replace(part, dest)
    return dest


CIFAR100_CLASSES = 100
CIFAR100_TEST_SIZE = 10_000


def demo_source(source: str) -> tuple[str, str, dict, str, str]:
    """How the demo reads ``source``: ``(path, format, options, split, layout)``.

    The official python format (tarball or folder) is read at its test split. An image folder
    with ``train/`` and ``test/`` sub-folders is a split copy: its ``test/`` folder is used. A
    plain image folder is taken as given (its split unknown). Raises ``ValueError`` for a
    folder with ``train/`` but no ``test/``.
    """
    from .datasets import detect_format

    fmt = detect_format(source)
    if fmt == "cifar100":
        return source, fmt, {"split": "test"}, "test", "cifar-100-python (official format)"
    if fmt != "folder":
        return source, fmt, {}, "unknown", f"{fmt} source"
    subs = {d.lower(): d for d in sorted(os.listdir(source)) if os.path.isdir(os.path.join(source, d))
            and not d.startswith(".")}
    if set(subs) & {"train", "test"} and set(subs) <= {"train", "test", "val", "valid", "validation"}:
        if "test" not in subs:
            raise ValueError(f"demo source {source} has split folders {sorted(subs.values())} but no test/: "
                             f"the demo evaluates CIFAR-100's test split")
        path = os.path.join(source, subs["test"])
        logger.info("%s is an image-folder copy split into %s: using %s", source,
                    ", ".join(f"{d}/" for d in subs.values()), path)
        return path, "folder", {}, "test", f"image-folder copy with {' and '.join(f'{d}/' for d in subs.values())} (test/ used)"
    return source, "folder", {}, "unknown", "image folder (one folder per class, split not known)"


def run_demo(
    out_dir: str | os.PathLike = "cache/demo",
    source: str | None = None,
    model: str = DEFAULT_MODEL,
    limit: int = 1000,
    cv: int = 10,
    seed: int = 0,
    device: str = "auto",
    batch_size: int = 64,
    workers: int | None = None,
    url: str = CIFAR100_URL,
    md5: str = CIFAR100_MD5,
    progress: bool = True,
    plots: bool | None = None,
) -> Report:
    """Run the demo; returns a :class:`~clip_heads.results.Report` whose ``metrics`` are the
    summary also written to ``out_dir/metrics.json``.

    ``source`` must look like CIFAR-100 (100 classes; see :func:`demo_source` for the layouts
    understood); anything else is refused before encoding. The summary's ``data`` records what
    was measured: split, images used and available, the store's fingerprint. Every step's folder
    has its figures (``plots=False`` skips them) and ``index.html``; ``out_dir/index.html`` links them.
    """
    from .ablation import ablate_prompts
    from .datasets import open_source
    from .encode import encode
    from .evaluate import run_zero_shot, train_head
    from .results import METRICS, REPORT, data_record, render, results_files, write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if source is None:
        source = str(download(url, out.parent / "downloads" / "cifar-100-python.tar.gz", md5, progress=progress))
    path, fmt, options, split, layout = demo_source(str(source))
    src = open_source(path, format=fmt, **options)
    if len(src.classes) != CIFAR100_CLASSES:
        shown = ", ".join(src.classes[:5]) + (", ..." if len(src.classes) > 5 else "")
        raise ValueError(f"demo source {source} has {len(src.classes)} classes ({shown}), read as {layout}; the demo "
                         f"runs on CIFAR-100 ({CIFAR100_CLASSES} classes): pass the cifar-100-python tarball or "
                         f"folder, or an image-folder copy with one folder per class (optionally under test/)")
    available = len(src)
    n = min(limit, available)
    notes = []
    if limit > available:
        notes.append(f"--limit {limit} is more than the {available} images there are: all {available} are used")
        logger.warning("demo: %s", notes[-1])
    if split == "test" and available < CIFAR100_TEST_SIZE:
        notes.append(f"the source holds {available} test images, a part of CIFAR-100's {CIFAR100_TEST_SIZE:,}: "
                     f"these figures are not test-set figures")
    sample = f"-seed{seed}" if n < available else ""
    store = out / f"cifar100-{split}-{n}{sample}-{src.fingerprint()[:8]}.h5"
    enc = encode(path, store, model=model, format=fmt, source_options=options, limit=limit, seed=seed,
                 templates=["bp-photo", "clip-cifar100"], device=device, batch_size=batch_size, workers=workers,
                 progress=progress)
    data = dict(data_record(store, split=split), dataset="CIFAR-100", source=str(source), layout=layout,
                available=available, limit=limit, seed=seed, notes=notes)
    summary: dict = {"store": str(store), "model": model, "images": enc.n_images, "skipped": enc.n_skipped,
                     "seed": seed, "data": data}
    sections = [f"clip-heads demo, model {model}, seed {seed}\n" + _data_text(data)]
    zs = run_zero_shot(str(store), prompt_set="bp-photo", out_dir=out / "zero-shot", overwrite=True, plots=plots)
    summary["zero_shot"] = zs.summary()
    sections.append('== Zero-shot, "a photo of a {}" (Bondielli & Passaro Table 1 setting) ==\n' + zs.text)
    abl = ablate_prompts(str(store), out_dir=out / "ablation", overwrite=True, plots=plots)
    summary["ablation_top"] = abl.rows[:5]
    sections.append("== Prompt ablation (zero-shot, every template and ensemble) ==\n" + abl.text)
    for head in ("linear", "mlp"):
        rep = train_head(head, str(store), out / f"head-{head}", cv=cv, seed=seed, progress=progress, plots=plots)
        summary[f"{head}_cv{cv}"] = rep.summary()
        sections.append(f"== {head} head, stratified {cv}-fold CV ==\n" + rep.text)
    summary["headline"] = _headline(summary, cv)
    report = "\n\n".join(sections)
    summary["report"] = report
    run = {"command": "demo", "source": str(source), "model": model, "limit": limit, "cv": cv, "seed": seed}
    summary["info"] = {"run": run, "data": data}
    with results_files(out) as stage:
        (stage / REPORT).write_text(report + "\n")
        write_json(stage / METRICS, json.loads(json.dumps(summary, default=str)))
    render(out, plots=False)  # the headline, and a link to every step's page
    return Report("demo", report, summary, out)


def _data_text(data: dict) -> str:
    """What the demo measured, in a few lines: split, images, fingerprint, and any caveat."""
    used = f"{data['n_images']} of {data['available']} images"
    if data["n_images"] < data["available"]:
        used += f" (a seeded sample, seed {data['seed']})"
    lines = [f"data: CIFAR-100 {data['split']} split, {data['layout']}: {used}; "
             f"store {Path(data['store']).name}, fingerprint {data['fingerprint'][:12]}"]
    lines += [f"note: {n}" for n in data["notes"]]
    return "\n".join(lines)


def _headline(summary: dict, cv: int) -> str:
    """A few lines for the terminal; the full tables are in report.txt."""
    def row(name: str, m: dict, std: dict | None = None) -> str:
        pm = (lambda k: f" ± {std[k]:.3f}") if std else (lambda k: "")
        return (f"  {name:<34} accuracy {m['accuracy']:.3f}{pm('accuracy')}   macro-F1 {m['macro_f1']:.3f}{pm('macro_f1')}"
                f"   weighted-F1 {m['weighted_f1']:.3f}{pm('weighted_f1')}")

    lines = [f"model {summary['model']}", _data_text(summary["data"]),
             row('zero-shot "a photo of a {}"', summary["zero_shot"])]
    for head in ("linear", "mlp"):
        m = summary[f"{head}_cv{cv}"]["cv"]
        lines.append(row(f"{head} head, {cv}-fold CV", m, {k: m[f"{k}_std"] for k in ("accuracy", "macro_f1", "weighted_f1")}))
    lines.append("  best templates (zero-shot accuracy):")
    lines += [f"    {r['accuracy']:.3f}  {r['prompt_set']}: {r['template']}" for r in summary["ablation_top"][:3]]
    return "\n".join(lines)
