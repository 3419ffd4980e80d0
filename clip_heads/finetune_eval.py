"""Zero-shot a loaded model on images straight from a source: how fine-tunes are scored.

The rule is ``clip-heads zero-shot``'s on a store that ``model`` encoded, through the same
kernel (:mod:`clip_heads.zeroshot`) and the same family rules (:mod:`clip_heads.backbones.towers`:
SigLIP's prompts padded to 64 tokens, SigLIP 2's lower-cased): each class's caption templates
are encoded and ensembled into one unit vector, and each image gets the class of highest cosine. Used by the fine-tune's
k-fold protocol (:mod:`clip_heads.finetune_cv`) and the WiSE-FT curve (:mod:`clip_heads.wise_ft`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from . import zeroshot
from .backbones import towers
from .backbones.families import family_of_model
from .backbones.model import autocast_for, load_backbone, resolve_device
from .backbones.preprocess import ImageRecipe
from .encode import default_workers
from .finetune_config import as_source, default_caption_templates
from .fsutil import PathLike
from .loading import DecodedBatches
from .prompts import build_texts, load_templates
from .source import Source

__all__ = ["caption_vectors", "zero_shot_report", "evaluate_zero_shot", "probabilities_text", "RAW_KEYS"]

# The per-image columns of a zero-shot report (positions scored, predictions, probabilities): kept
# where its images are needed (a fold's reuse, the pooled CV), dropped where only its scores are.
RAW_KEYS = ("positions", "y_pred", "proba")


@torch.inference_mode()
def caption_vectors(clip: Any, tokenizer: Any, templates: Sequence[str], classes: Sequence[str],
                    device: torch.device, precision: str) -> torch.Tensor:
    """Unit class vectors ``(C, dim)``: every template x class caption through the text tower
    (tokenized by the model's family rule), ensembled per class by the kernel
    (:func:`clip_heads.zeroshot.ensemble`)."""
    spec = family_of_model(clip, tokenizer)
    texts, _, cid = build_texts(templates, classes)
    tok = towers.tokenize(tokenizer, spec, texts, towers.text_max_length(clip, tokenizer, spec))
    with autocast_for(device, precision):
        E = towers.text_embeds(clip, {k: v.to(device) for k, v in tok.items()}).float()
    return zeroshot.ensemble(E, cid, len(classes), list(classes), "the captions")


@torch.inference_mode()
def zero_shot_report(clip: Any, tokenizer: Any, preprocess: ImageRecipe, src: Source, positions: np.ndarray,
                     templates: Sequence[str], device: torch.device, precision: str, batch_size: int, workers: int,
                     progress: bool = False) -> dict:
    """Zero-shot a loaded model on ``positions`` of ``src`` (see :func:`evaluate_zero_shot`);
    ``preprocess`` is its image recipe (:func:`clip_heads.backbones.preprocess.image_recipe`)."""
    from tqdm.auto import tqdm

    from .calibration import calibration_of
    from .metrics import classification_report

    clip.eval()
    rule = zeroshot.ScoringRule.from_model(clip)  # the model's own scale (and bias), as it stands
    V = caption_vectors(clip, tokenizer, templates, src.classes, device, precision)
    loader = DataLoader(DecodedBatches(src, np.asarray(positions), batch_size, preprocess), batch_size=None,
                        num_workers=workers, pin_memory=device.type == "cuda", prefetch_factor=2 if workers else None)
    good, preds, probas, skipped = [], [], [], {}
    for item in tqdm(loader, unit="batch", desc=f"zero-shot {Path(src.root).name}", disable=not progress):
        for i, reason in item["bad"]:
            skipped[src.keys[i]] = reason
        if item["good"]:
            with autocast_for(device, precision):
                img = towers.image_embeds(clip, towers.image_inputs(item["pixels"], device)).float()
            cos = zeroshot.cosine(img, V).float()
            preds.append(cos.argmax(1).cpu())
            probas.append(rule.distribution(cos).double().cpu())
            good += item["good"]
    if not good:
        raise ValueError(f"no readable image among the {len(positions)} to evaluate in {src.root}")
    y_pred = torch.cat(preds).numpy()
    P = torch.cat(probas).numpy()
    y_true = src.labels[good]
    report = classification_report(y_true, y_pred, src.classes, P)
    report.update(templates=list(templates), skipped=skipped, positions=[int(i) for i in good], y_pred=y_pred.tolist(),
                  proba=P.tolist(), scoring=rule.to_dict())
    cal = calibration_of(y_true, P, src.classes, probabilities=probabilities_text(rule))
    if cal is not None:
        report["calibration"] = cal
    return report


def probabilities_text(rule: zeroshot.ScoringRule) -> str:
    """What a zero-shot report's probabilities are: the rule's softmax, or its sigmoids renormalised
    (as ``clip-heads zero-shot`` says of a store's)."""
    return rule.describe() + ("" if rule.scoring == "softmax" else ", renormalised to sum to 1")


def evaluate_zero_shot(model: str, source: PathLike | Source, *, format: str = "auto", source_options: dict | None = None,
                       indices: Sequence[int] | None = None, templates: str | None = None, batch_size: int = 64,
                       workers: int | None = None, device: str = "auto", precision: str = "auto") -> dict:
    """Zero-shot classification of ``source`` (or its ``indices``) by cosine to the class captions.

    ``templates`` is a caption template *set* (name or file; default per data kind, as the
    fine-tune's). The same rule as ``clip-heads zero-shot`` on a store encoded with ``model``;
    here images go straight through the model. Returns a
    :func:`clip_heads.metrics.classification_report` (with top-k accuracy) plus ``templates``,
    ``skipped`` ({key: reason}), ``positions``, ``y_pred``, ``proba`` (per scored image, the
    model's own :class:`~clip_heads.zeroshot.ScoringRule` distribution: CLIP's softmax over
    ``logit_scale * cos``, SigLIP's sigmoids renormalised), ``scoring`` and ``calibration``
    (:func:`clip_heads.calibration.calibration_of` of those probabilities).
    """
    src = as_source(source, format, source_options)
    dev = resolve_device(device)
    loaded = load_backbone(model, dev, precision="fp32", dtype=torch.float32)
    positions = np.arange(len(src)) if indices is None else np.asarray(indices, np.int64)
    _, tpls = load_templates(templates or default_caption_templates(src))
    return zero_shot_report(loaded.model, loaded.tokenizer, loaded.preprocess, src, positions,
                            tpls, dev, precision, batch_size, default_workers(dev) if workers is None else workers)
