"""WiSE-FT and the generalisation experiment: blends of a zero-shot and a fine-tuned model.

* :func:`interpolate` / :func:`interpolate_sweep` write WiSE-FT weight-space ensembles
  ``(1 - alpha) * zero-shot + alpha * fine-tuned`` (Wortsman et al., CVPR 2022).
* :func:`generalisation` runs B&P's Table 5 along the WiSE-FT curve: fine-tune on A (with
  :mod:`clip_heads.finetune`), then zero-shot on held-out A and on B for every alpha
  (:mod:`clip_heads.finetune_eval`).

Both write ``report.txt`` and ``metrics.json`` (:mod:`clip_heads.results`): a blend beside its
model, a sweep at the top of its folder, the generalisation table at the top of its folder.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .backbones.model import Backbone, load_backbone, resolve_device
from .catalog import DEFAULT_MODEL
from .encode import default_workers
from .finetune import finetune_loaded, model_lineage
from .finetune_config import FinetuneConfig, as_source, default_caption_templates
from .finetune_eval import RAW_KEYS, zero_shot_report
from .fsutil import PathLike, atomic_write_text, exclusive_lock, staged_dir
from .identity import ModelFiles, resolve_model
from .prompts import load_templates
from .results import METRICS, REPORT, Report, render, results_files, source_record, write_json
from .source import Source

logger = logging.getLogger(__name__)

__all__ = ["interpolate", "interpolate_sweep", "generalisation", "check_alpha", "CALIBRATION"]

CALIBRATION = ("ece", "brier", "nll")  # a generalisation row's calibration columns, per side


# ---------------------------------------------------------------------------------------
# WiSE-FT: weight-space ensembles of the zero-shot and the fine-tuned model
# ---------------------------------------------------------------------------------------
# Config keys that say where or how a model was saved, not what it computes.
_VOLATILE_CONFIG = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "_commit_hash"}


def check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1] (0 = zero-shot, 1 = fine-tuned); got {alpha!r}")
    return float(alpha)


def _check_compatible(zs, ft, zs_name: str, ft_name: str) -> None:
    a, b = zs.state_dict(), ft.state_dict()
    for k in list(a) + [k for k in b if k not in a]:
        if k not in a or k not in b:
            raise ValueError(f"cannot interpolate {zs_name} and {ft_name}: their architectures differ (tensor {k!r} "
                             f"is only in {ft_name if k in b else zs_name})")
        if a[k].shape != b[k].shape:
            raise ValueError(f"cannot interpolate {zs_name} and {ft_name}: their architectures differ (tensor {k!r} "
                             f"has shape {tuple(a[k].shape)} in one and {tuple(b[k].shape)} in the other)")

    def flat(d: dict, pre: str = "") -> dict:
        out = {}
        for k, v in d.items():
            if k not in _VOLATILE_CONFIG:
                out.update(flat(v, f"{pre}{k}.") if isinstance(v, dict) else {f"{pre}{k}": v})
        return out

    ca, cb = flat(zs.config.to_dict()), flat(ft.config.to_dict())
    for k in sorted(set(ca) | set(cb)):
        if ca.get(k) != cb.get(k):
            raise ValueError(f"cannot interpolate {zs_name} and {ft_name}: their architectures differ (config {k} "
                             f"is {ca.get(k)!r} in one and {cb.get(k)!r} in the other)")


def _interpolated(zs_state: dict, ft_state: dict, alpha: float) -> dict:
    # torch.lerp is exact at both ends: alpha 0 gives the zero-shot tensors bit for bit, 1 the fine-tuned.
    return {k: torch.lerp(zs_state[k], ft_state[k], alpha) if ft_state[k].is_floating_point() else zs_state[k].clone()
            for k in ft_state}


def _check_related(zs: ModelFiles, ft: ModelFiles) -> None:
    """Warn unless one endpoint descends from the other by the lineage clip-heads records."""
    if zs.weights_hash == ft.weights_hash:
        return
    zs_from = {i["model_hash"] for i in model_lineage(zs.path)}
    ft_from = {i["model_hash"] for i in model_lineage(ft.path)}
    if zs.weights_hash in ft_from:
        return
    if ft.weights_hash in zs_from:
        logger.warning("%s is a fine-tune of %s, not the other way round: alpha 0 gives %s (arguments swapped?)",
                       zs.model_id, ft.model_id, zs.model_id)
        return
    logger.warning("neither %s nor %s was fine-tuned from the other (by the lineage clip-heads records in "
                   "train_log.json / wise_ft.json): WiSE-FT blends a model with its own fine-tune, and a blend of "
                   "unrelated weights is seldom meaningful", zs.model_id, ft.model_id)


def _check_out(out: Path, inputs: Sequence[ModelFiles]) -> None:
    """Refuse an output folder that is an input, holds one, or lies inside one."""
    o = out.resolve()
    for m in inputs:
        p = m.path.resolve()
        if o == p or p in o.parents or o in p.parents:
            raise ValueError(f"--out {out} overlaps the input model {m.model_id} (the same folder, or one inside "
                             "the other), so writing it would destroy that input; write the blend elsewhere")


def _check_replaceable(out: Path) -> None:
    # A blend replaces its folder whole: only an earlier blend (or an empty folder) may be there.
    if out.exists() and not (out.is_dir() and ((out / "wise_ft.json").is_file() or not any(out.iterdir()))):
        raise ValueError(f"--out {out} exists and is not a WiSE-FT model written before; writing the blend would "
                         "replace what it holds: choose a new folder")


def _check_family(zs: Backbone, ft: Backbone) -> None:
    """Refuse two endpoints of different families (CLIP and SigLIP, say) by name."""
    if zs.spec.name != ft.spec.name:
        raise ValueError(f"cannot interpolate {zs.files.model_id} ({zs.spec.title}) and {ft.files.model_id} "
                         f"({ft.spec.title}): WiSE-FT blends two checkpoints of the same family and architecture, "
                         "a model and its own fine-tune")


class _Pair:
    """A zero-shot and a fine-tuned model of one family, checked to be interpolable; ``model``
    carries the blend, ``preprocess`` its image recipe."""

    def __init__(self, zero_shot: str | ModelFiles, finetuned: str | ModelFiles, device: torch.device | str = "cpu") -> None:
        zs = load_backbone(zero_shot, device, precision="fp32", dtype=torch.float32)
        ft = load_backbone(finetuned, device, precision="fp32", dtype=torch.float32)
        _check_family(zs, ft)
        _check_compatible(zs.model, ft.model, zs.files.model_id, ft.files.model_id)
        _check_related(zs.files, ft.files)
        self.model, self.tokenizer, self.processor, self.preprocess = ft.model, ft.tokenizer, ft.processor, ft.preprocess
        self.spec = ft.spec
        self.zero_shot, self.finetuned = zs.files, ft.files
        self.zs_state = {k: v.detach().clone() for k, v in zs.model.state_dict().items()}
        self.ft_state = {k: v.detach().clone() for k, v in ft.model.state_dict().items()}
        del zs

    def blend(self, alpha: float):
        self.model.load_state_dict(_interpolated(self.zs_state, self.ft_state, alpha))
        return self.model

    def record(self, alpha: float) -> dict:
        """What ``wise_ft.json`` holds: both endpoints' identities, alpha, and the lineage."""
        zs, ft = self.zero_shot.identity(), self.finetuned.identity()
        lineage = [zs, ft] + model_lineage(self.zero_shot.path) + model_lineage(self.finetuned.path)
        return {"zero_shot": zs, "finetuned": ft, "alpha": alpha, "lineage": lineage}

    def save(self, alpha: float, out_dir: PathLike) -> Path:
        """Write the blend as a model folder, built aside and swapped in whole."""
        out = Path(out_dir)
        record = self.record(alpha)
        with staged_dir(out) as tmp:
            self.blend(alpha).save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            self.processor.save_pretrained(tmp)
            (tmp / "wise_ft.json").write_text(json.dumps(record))
            (tmp / REPORT).write_text(_blend_text(record) + "\n")
            write_json(tmp / METRICS, {"info": {"run": self.run([alpha])}, "kind": "wise-ft", **record})
            render(tmp, plots=False, final=out)  # a blend has no scores to draw: its page says what it is
        return out

    def run(self, alphas: Sequence[float]) -> dict:
        """The ``info.run`` record of a WiSE-FT command."""
        return {"command": "wise-ft", "zero_shot": self.zero_shot.model_id, "finetuned": self.finetuned.model_id,
                "alphas": list(alphas)}


def _blend_text(record: dict) -> str:
    zs, ft = record["zero_shot"], record["finetuned"]
    return (f"WiSE-FT blend (1 - {record['alpha']:g}) * {zs['model_id']} + {record['alpha']:g} * {ft['model_id']}\n"
            f"  zero-shot endpoint  {zs['model_hash']}  (revision {zs['model_revision']})\n"
            f"  fine-tuned endpoint {ft['model_hash']}  (revision {ft['model_revision']})")


def interpolate(zero_shot_dir: str, finetuned_dir: str, alpha: float, out_dir: PathLike) -> Path:
    """Write the WiSE-FT model ``(1 - alpha) * zero_shot + alpha * finetuned`` to ``out_dir``.

    Every floating-point tensor is interpolated (SigLIP's ``logit_scale`` and ``logit_bias``
    too), other buffers are copied; the two models must be of the same family (CLIP and SigLIP
    are refused by name) with the same architecture, config and tensor shapes (the first
    mismatch is named), and a
    warning says when neither was fine-tuned from the other. ``out_dir`` may not be or overlap
    an input. The tokenizer and image processor come from ``finetuned_dir``. Returns ``out_dir``,
    loadable like a hub id; its ``wise_ft.json`` records both endpoints.
    """
    alpha = check_alpha(alpha)
    return _write_blends(zero_shot_dir, finetuned_dir, [alpha], Path(out_dir), [Path(out_dir)])[0]


def interpolate_sweep(zero_shot_dir: str, finetuned_dir: str, alphas: Sequence[float], out_root: PathLike) -> list[Path]:
    """:func:`interpolate` for each alpha into ``out_root/alpha-0.50/`` etc.; both models are loaded once."""
    alphas = [check_alpha(a) for a in alphas]
    root = Path(out_root)
    return _write_blends(zero_shot_dir, finetuned_dir, alphas, root, [root / f"alpha-{a:.2f}" for a in alphas])


def _check_sweep_root(root: Path) -> None:
    # A sweep writes report.txt and metrics.json at the top of its folder: never over someone else's.
    try:
        kind = json.loads((root / METRICS).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        kind = None if (root / METRICS).exists() or (root / REPORT).exists() else "wise-ft"
    if kind != "wise-ft":
        raise ValueError(f"--out {root} holds a {REPORT} or {METRICS} that a WiSE-FT sweep did not write; writing "
                         "the sweep would replace it: choose a new folder")


def _write_blends(zero_shot: str, finetuned: str, alphas: Sequence[float], root: Path, outs: Sequence[Path]) -> list[Path]:
    zs, ft = resolve_model(zero_shot), resolve_model(finetuned)
    _check_out(root, [zs, ft])
    for out in outs:
        _check_replaceable(out)
    if outs != [root]:
        _check_sweep_root(root)
    with exclusive_lock(root, "clip-heads wise-ft"):
        pair = _Pair(zs, ft)
        written = [pair.save(a, out) for a, out in zip(alphas, outs, strict=True)]
        if outs != [root]:  # a sweep: what its folder holds, at its top
            with results_files(root) as stage:
                lines = [f"WiSE-FT sweep of {zs.model_id} (alpha 0) and {ft.model_id} (alpha 1):"]
                lines += [f"  alpha {a:.2f}: {p}" for a, p in zip(alphas, written, strict=True)]
                (stage / REPORT).write_text("\n".join(lines) + "\n")
                write_json(stage / METRICS, {"info": {"run": pair.run(alphas)}, "kind": "wise-ft",
                                             "blends": {f"{a:.2f}": str(p) for a, p in zip(alphas, written, strict=True)}})
            render(root, plots=False)  # links every blend's page
        return written


# ---------------------------------------------------------------------------------------
# Generalisation: B&P Table 5 along the WiSE-FT curve
# ---------------------------------------------------------------------------------------
def generalisation(a_source: PathLike | Source, b_source: PathLike | Source, out_dir: PathLike,
                   model: str = DEFAULT_MODEL, config: FinetuneConfig | None = None, *,
                   alphas: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0), holdout: int | None = 10, seed: int = 0,
                   finetuned: str | None = None, a_format: str = "auto", b_format: str = "auto",
                   a_options: dict | None = None, b_options: dict | None = None, a_templates: str | None = None,
                   b_templates: str | None = None, save_models: bool = False, eval_batch_size: int = 64,
                   progress: bool = True, plots: bool | None = None, **options: Any) -> Report:
    """Fine-tune on A, then zero-shot held-out A and all of B with every WiSE-FT blend.

    Parameters
    ----------
    a_source, b_source : datasets (paths or Sources); each is scored with its own class
        captions (``a_templates``, ``b_templates``; default per dataset kind, as :func:`finetune`).
    holdout : A's fold 0 of ``stratified_folds(labels_A, holdout, seed)`` is held out as A-test
        and the rest trains (fold 0 of the CV run with ``cv=holdout``). ``None`` trains on all
        of A, as B&P did for Table 5, and leaves the A columns empty.
    finetuned : an existing fine-tuned model to use instead of training one (it must not have
        seen A-test); otherwise it is trained into ``out_dir/finetuned`` with ``config`` and
        ``options`` (:class:`~clip_heads.finetune_config.FinetuneConfig`; ``a_templates`` are
        its captions, ``seed`` its seed).
    alphas : WiSE-FT mixing weights; 0 is the zero-shot model, 1 the fine-tuned one.

    Writes ``report.txt`` (the table) and ``metrics.json`` (``info``, settings, rows, reports),
    ``generalisation.json``, ``generalisation.csv`` and ``generalisation.txt`` (as before), and
    ``alpha-X.XX.json`` per alpha (reused by a rerun); with ``save_models``, every blend as
    ``alpha-X.XX/`` model directory; ``plots/wise_ft.png`` (the curve, with the paper's Table 1,
    3/4 and 5 numbers as stars when A and B are FI and CIFAR-100; ``plots=False`` skips it) and
    ``index.html``. Every blend's probabilities (its own scoring rule,
    :meth:`clip_heads.zeroshot.ScoringRule.from_model`) are calibrated: ECE, Brier and NLL per
    alpha and side in the rows and report.txt, each report's ``calibration``; the page shows the
    endpoints (the zero-shot and the fine-tuned model) with their tables, confusion matrices,
    per-class bars and reliability diagrams. Returns a :class:`~clip_heads.results.Report` whose
    ``metrics`` hold ``settings``, ``rows``, ``reports`` and ``text``.
    """
    from .crossval import stratified_folds

    alphas = [check_alpha(a) for a in alphas]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    src_a, src_b = as_source(a_source, a_format, a_options), as_source(b_source, b_format, b_options)
    config = FinetuneConfig.from_options(options, base=config).replace(seed=seed, templates=a_templates)
    dev = resolve_device(config.device)
    workers = default_workers(dev) if config.workers is None else config.workers
    if holdout:
        folds = stratified_folds(src_a.labels, holdout, seed)
        train_a, test_a = np.flatnonzero(folds != 0), np.flatnonzero(folds == 0)
    else:
        train_a, test_a = np.arange(len(src_a)), None
    if finetuned is None:
        finetuned = str(out / "finetuned")
        finetune_loaded(src_a, finetuned, model, config, train_indices=train_a, progress=progress, plots=plots)
    _, tpl_a = load_templates(a_templates or default_caption_templates(src_a))
    _, tpl_b = load_templates(b_templates or default_caption_templates(src_b))
    pair = _Pair(model, finetuned, dev)
    preprocess = pair.preprocess
    settings = {"model": str(model), "model_revision": pair.zero_shot.revision, "model_hash": pair.zero_shot.weights_hash,
                "finetuned": str(finetuned), "finetuned_hash": pair.finetuned.weights_hash, "a": src_a.fingerprint(),
                "b": src_b.fingerprint(), "holdout": holdout, "seed": seed, "a_templates": tpl_a, "b_templates": tpl_b}
    rows, reports = [], {}
    for alpha in alphas:
        cache = out / f"alpha-{alpha:.2f}.json"
        found = json.loads(cache.read_text()) if cache.is_file() else None
        # A cache from before the probabilities were kept has none: scored again.
        if found is None or found["settings"] != settings or "proba" not in (found.get("b") or {}):
            clip = pair.blend(alpha)
            args = (dev, config.precision, eval_batch_size, workers, progress)
            a = zero_shot_report(clip, pair.tokenizer, preprocess, src_a, test_a, tpl_a, *args) if test_a is not None else None
            b = zero_shot_report(clip, pair.tokenizer, preprocess, src_b, np.arange(len(src_b)), tpl_b, *args)
            found = {"settings": settings, "alpha": alpha, "a": a, "b": b}
            atomic_write_text(cache, json.dumps(found))
            if save_models:
                pair.save(alpha, out / f"alpha-{alpha:.2f}")
        row = {"alpha": alpha}
        for side in ("a", "b"):
            r = found[side]
            row.update({f"{side}_accuracy": r and r["accuracy"], f"{side}_macro_f1": r and r["macro"]["f1"],
                        f"{side}_weighted_f1": r and r["weighted"]["f1"]})
        for side in ("a", "b"):  # how well each blend's probabilities are calibrated (ECE 15 bins, Brier, NLL)
            cal = (found[side] or {}).get("calibration") or {}
            row.update({f"{side}_{m}": cal.get(m) for m in CALIBRATION})
        rows.append(row)
        reports[f"{alpha:.2f}"] = {s: found[s] and {k: v for k, v in found[s].items() if k not in RAW_KEYS}
                                   for s in ("a", "b")}
        logger.info("alpha %.2f: %s", alpha, row)
    text = _table(rows, _name(src_a), _name(src_b), holdout)
    result = {"settings": settings, "rows": rows, "text": text, "reports": reports}
    run = {"command": "generalisation", "a": str(src_a.root), "b": str(src_b.root), "model": str(model),
           "finetuned": str(finetuned), "alphas": alphas, "holdout": holdout, "seed": seed}
    data = {"a": source_record(src_a, test_a), "b": source_record(src_b)}
    cols = list(rows[0])
    lines = [",".join(cols)] + [",".join("" if r[c] is None else f"{r[c]:.6g}" for c in cols) for r in rows]
    with results_files(out) as stage:
        (stage / "generalisation.json").write_text(json.dumps(result, indent=1))
        (stage / "generalisation.csv").write_text("\n".join(lines) + "\n")
        (stage / "generalisation.txt").write_text(text + "\n")
        (stage / REPORT).write_text(text + "\n")
        write_json(stage / METRICS, dict(result, info={"run": run, "data": data}, kind="generalisation"))
        render(stage, plots, out)
    return Report("generalisation", text, dict(result, info={"run": run, "data": data}), out)


def _name(src: Source) -> str:
    return f"{Path(src.root).name} ({src.format}, {len(src)} images)"


def _table(rows: list[dict], a: str, b: str, holdout: int | None) -> str:
    head = (f"WiSE-FT curve: fine-tuned on A = {a}; zero-shot on "
            f"{f'held-out A (1/{holdout})' if holdout else 'A (not held out)'} and on B = {b}")
    lines = [head, f"{'alpha':>6}  {'A acc':>6}  {'A mF1':>6}  {'B acc':>6}  {'B mF1':>6}"]
    cell = lambda v: f"{v:6.3f}" if v is not None else f"{'-':>6}"  # noqa: E731
    for r in rows:
        keys = ("a_accuracy", "a_macro_f1", "b_accuracy", "b_macro_f1")
        lines.append(f"{r['alpha']:6.2f}  " + "  ".join(cell(r[k]) for k in keys))
    if any(r.get("b_ece") is not None for r in rows):
        lines += ["", "Calibration of each blend's probabilities (the blend's own scoring rule at its logit_scale; "
                  "ECE: top-label confidence in 15 equal-width bins; Brier: sum over classes, range [0, 2]; "
                  "NLL: natural log)",
                  f"{'alpha':>6}  {'A ECE':>6}  {'A Brier':>7}  {'A NLL':>6}  {'B ECE':>6}  {'B Brier':>7}  {'B NLL':>6}"]
        for r in rows:
            cells = [f"{r[f'{s}_{m}']:{7 if m == 'brier' else 6}.3f}" if r.get(f"{s}_{m}") is not None
                     else f"{'-':>{7 if m == 'brier' else 6}}" for s in ("a", "b") for m in CALIBRATION]
            lines.append(f"{r['alpha']:6.2f}  " + "  ".join(cells))
    return "\n".join(lines)
