"""`clip-heads demo`: the whole tool on real data, end to end.

Downloads the official CIFAR-100 python tarball (MD5-verified) unless ``source`` is given,
encodes a seeded sample of its test images with the model (the papers' ViT-B/32 by default),
then reports zero-shot with "a photo of a {}" (Bondielli & Passaro's setting, 0.62 accuracy in
their Table 1 on the full test set with the pretrained model), the prompt ablation, and 10-fold
CV of the linear and MLP heads. Everything lands under ``out_dir``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path

from .backbone import DEFAULT_MODEL

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
    os.replace(part, dest)
    return dest


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
) -> dict:
    """Run the demo; returns the summary also written to ``out_dir/summary.json``."""
    from .ablation import ablate_prompts
    from .encode import encode
    from .evaluate import run_zero_shot, train_head

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if source is None:
        source = str(download(url, out.parent / "downloads" / "cifar-100-python.tar.gz", md5, progress=progress))
    store = out / f"cifar100-test-{limit}.h5"
    from .datasets import detect_format

    # The official python format by default; an image-folder copy of CIFAR-100 works too.
    fmt = detect_format(source)
    options = {"split": "test"} if fmt == "cifar100" else {}
    enc = encode(source, store, model=model, format=fmt, source_options=options, limit=limit, seed=seed,
                 templates=["bp-photo", "clip-cifar100"], device=device, batch_size=batch_size, workers=workers, progress=progress)
    summary: dict = {"store": str(store), "model": model, "images": enc.n_images, "skipped": enc.n_skipped, "seed": seed}
    sections = [f"clip-heads demo: CIFAR-100 test sample of {enc.n_images} images ({enc.n_skipped} skipped), model {model}, seed {seed}"]
    zs = run_zero_shot(str(store), prompt_set="bp-photo", out_dir=out / "zero-shot")
    summary["zero_shot"] = zs.summary()
    sections.append('== Zero-shot, "a photo of a {}" (Bondielli & Passaro Table 1 setting) ==\n' + zs.text)
    abl = ablate_prompts(str(store), out_dir=out / "ablation")
    summary["ablation_top"] = abl.rows[:5]
    sections.append("== Prompt ablation (zero-shot, every template and ensemble) ==\n" + abl.text)
    for head in ("linear", "mlp"):
        rep = train_head(head, str(store), out / f"head-{head}", cv=cv, seed=seed, progress=progress)
        summary[f"{head}_cv{cv}"] = rep.summary()
        sections.append(f"== {head} head, stratified {cv}-fold CV ==\n" + rep.text)
    summary["headline"] = _headline(summary, cv)
    report = "\n\n".join(sections)
    (out / "report.txt").write_text(report + "\n")
    summary["report"] = report
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _headline(summary: dict, cv: int) -> str:
    """A few lines for the terminal; the full tables are in report.txt."""
    def row(name: str, m: dict, std: dict | None = None) -> str:
        pm = (lambda k: f" ± {std[k]:.3f}") if std else (lambda k: "")
        return (f"  {name:<34} accuracy {m['accuracy']:.3f}{pm('accuracy')}   macro-F1 {m['macro_f1']:.3f}{pm('macro_f1')}"
                f"   weighted-F1 {m['weighted_f1']:.3f}{pm('weighted_f1')}")

    lines = [f"CIFAR-100 sample: {summary['images']} images, model {summary['model']}",
             row('zero-shot "a photo of a {}"', summary["zero_shot"])]
    for head in ("linear", "mlp"):
        m = summary[f"{head}_cv{cv}"]["cv"]
        lines.append(row(f"{head} head, {cv}-fold CV", m, {k: m[f"{k}_std"] for k in ("accuracy", "macro_f1", "weighted_f1")}))
    lines.append("  best templates (zero-shot accuracy):")
    lines += [f"    {r['accuracy']:.3f}  {r['prompt_set']}: {r['template']}" for r in summary["ablation_top"][:3]]
    return "\n".join(lines)

