"""Prompt template sets, label sets and synonyms, and encoding them into a store's prompt side.

Template sets are data: ``clip_heads/templates/<name>.txt``, one template per line with ``{}``
where the class name goes. Built in:

- ``bp-emotion``: Bondielli & Passaro's emotion caption, "an image that evokes the emotion of {}".
- ``bp-emotion-variants``: the captions they report as 3-5 points worse.
- ``bp-photo``: their CIFAR-100 caption, "a photo of a {}".
- ``clip-e``: CLIP-E's "a photo that evokes {}".
- ``clip-cifar100``: the 18-template CIFAR-100 ensemble published with CLIP.

Any other value is read as a user template file. Synonyms (``{"joy": ["joy", "happiness"]}``)
expand each class into several prompts per template, all with that class's id.
"""
from __future__ import annotations

import json
import logging
from importlib import resources
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .datasets import EMOTION6_CLASSES, EMOTION6_DISTRIBUTION, FI_CLASSES
from .kinds import is_emotion_data
from .store import PromptSet, open_store, validate_prompt_set_name

logger = logging.getLogger(__name__)

__all__ = ["EMOTION_DEFAULTS", "OBJECT_DEFAULTS", "LABEL_SETS", "list_template_sets", "parse_templates", "load_templates",
           "load_classes", "load_synonyms", "class_phrase", "build_texts", "encode_prompt_set", "default_template_sets",
           "add_prompts"]

EMOTION_DEFAULTS = ("bp-emotion", "bp-emotion-variants", "clip-e")  # the first is B&P's emotion caption
OBJECT_DEFAULTS = ("bp-photo", "clip-cifar100")  # the first is B&P's CIFAR-100 caption

# Built-in label sets, for querying a store with classes other than its own (text-side heads).
LABEL_SETS: dict[str, list[str]] = {
    "fi": list(FI_CLASSES),
    "emotion6": list(EMOTION6_CLASSES),
    "emotion6-neutral": list(EMOTION6_DISTRIBUTION),
    "sentiment": ["negative", "positive"],
}


def list_template_sets() -> list[str]:
    return sorted(p.name[:-4] for p in (resources.files("clip_heads") / "templates").iterdir() if p.name.endswith(".txt"))


def parse_templates(text: str, origin: str) -> list[str]:
    """One template per non-empty line, each with exactly one ``{}``."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.count("{}") != 1:
            raise ValueError(f"{origin} line {n}: template {line!r} must contain exactly one '{{}}' for the class name")
        out.append(line)
    if not out:
        raise ValueError(f"{origin} has no templates (one per line, each with '{{}}')")
    return out


def load_templates(name_or_path: str) -> tuple[str, list[str]]:
    """A built-in template set by name, or a user file. Returns ``(set name, templates)``."""
    if name_or_path in list_template_sets():
        text = (resources.files("clip_heads") / "templates" / f"{name_or_path}.txt").read_text()
        return name_or_path, parse_templates(text, f"template set {name_or_path!r}")
    p = Path(name_or_path)
    if not p.is_file():
        raise ValueError(f"unknown template set {name_or_path!r}: not a built-in ({', '.join(list_template_sets())}) nor a file")
    return p.stem, parse_templates(p.read_text(encoding="utf-8"), str(p))


def load_classes(spec: str | Sequence[str]) -> list[str]:
    """Class names: a built-in label set name, a file (one per line), or a comma-separated list."""
    if not isinstance(spec, str):
        return list(spec)
    if spec in LABEL_SETS:
        return list(LABEL_SETS[spec])
    p = Path(spec)
    if p.is_file():
        return [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if "," in spec:
        return [c.strip() for c in spec.split(",") if c.strip()]
    raise ValueError(f"unknown label set {spec!r}: use one of {', '.join(LABEL_SETS)}, a file with one class per line, or a comma-separated list")


def load_synonyms(path: str | None, classes: Sequence[str]) -> dict[str, list[str]]:
    """``{class: [phrases]}`` from a JSON file; classes not in it keep their own name."""
    if path is None:
        return {}
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read synonyms file {path!r}: {e}") from e
    if not isinstance(data, dict) or not all(isinstance(v, list) and v for v in data.values()):
        raise ValueError(f"synonyms file {path!r} must be a JSON object {{class: [phrase, ...]}} with non-empty lists")
    unknown = sorted(set(data) - set(classes))
    if unknown:
        raise ValueError(f"synonyms file {path!r} names classes {unknown} that are not among {list(classes)}")
    return {k: [str(s) for s in v] for k, v in data.items()}


def class_phrase(name: str) -> str:
    """How a class name reads inside a caption: CIFAR's ``aquarium_fish`` -> ``aquarium fish``."""
    return name.replace("_", " ")


def build_texts(templates: Sequence[str], classes: Sequence[str], synonyms: Mapping[str, list[str]] | None = None):
    """Every template x every class (x every synonym): texts, template ids, class ids."""
    texts, tid, cid = [], [], []
    for t, tpl in enumerate(templates):
        for c, cls in enumerate(classes):
            for phrase in (synonyms or {}).get(cls, [class_phrase(cls)]):
                texts.append(tpl.format(phrase))
                tid.append(t)
                cid.append(c)
    return texts, np.asarray(tid, np.int64), np.asarray(cid, np.int64)


def encode_prompt_set(backbone, templates: str, classes: Sequence[str], synonyms: str | None = None,
                      name: str | None = None, progress: bool = False) -> PromptSet:
    """Encode one template set for ``classes`` with the backbone's text tower (a bar with ``progress``).

    The prompts go through the family's text rule (:meth:`~clip_heads.backbones.model.Backbone.tokenize`:
    padded to the longest prompt, or to SigLIP's fixed 64 tokens; lower-cased for SigLIP 2), and
    the set keeps each prompt as the text tower read it, so ``texts`` and ``embeds`` agree. Its
    attributes record the rule (``text_padding``, ``text_max_length``, ``text_lowercase``).
    """
    set_name, tpls = load_templates(templates)
    syn = load_synonyms(synonyms, classes)
    texts, tid, cid = build_texts(tpls, classes, syn)
    texts = backbone.prepare_texts(texts)
    embeds = backbone.encode_texts(texts, progress=progress, desc=f"prompts {name or set_name}").numpy()
    attrs = {"source": templates, "synonyms": json.dumps(syn) if syn else "", "text_padding": backbone.spec.text_padding,
             "text_max_length": int(backbone.text_max_length), "text_lowercase": bool(backbone.spec.text_lowercase)}
    return PromptSet(name or set_name, list(classes), tpls, texts, embeds, tid, cid, attrs)


def default_template_sets(source_format: str, classes: Sequence[str] | None = None) -> tuple[str, ...]:
    """The template sets for a dataset of this format (and these classes): the emotion sets for
    emotion data (:func:`clip_heads.kinds.is_emotion_data`), the photo sets otherwise. The first
    is Bondielli & Passaro's caption for that kind, the fine-tune's default."""
    return EMOTION_DEFAULTS if is_emotion_data(source_format, classes) else OBJECT_DEFAULTS


def add_prompts(
    store_path: str,
    templates: Sequence[str],
    classes: str | Sequence[str] | None = None,
    synonyms: str | None = None,
    name: str | None = None,
    device: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
) -> list[str]:
    """Encode template sets with the store's own model and add them to the store.

    Images are not touched. ``classes`` defaults to the store's classes; another label set
    (e.g. ``"fi"`` on an Emotion6 store) gives prompts for querying with other classes.
    The model must be the one that encoded the store: the same ``model_id`` whose weights
    (``model_hash``) and revision are the store's, or the call is refused.
    Returns the names of the sets added. Holds the store's writer lock throughout, so a
    concurrent writer of the store fails at once instead of racing this one.
    """
    from .fsutil import exclusive_lock

    with exclusive_lock(store_path, "prompts", reentrant=True):
        return _add_prompts(store_path, templates, classes, synonyms, name, device, overwrite, progress)


def _add_prompts(store_path, templates, classes, synonyms, name, device, overwrite, progress) -> list[str]:
    from .backbones.model import Backbone
    from .identity import check_identity, resolve_model
    from .writer import add_prompt_sets

    with open_store(store_path) as s:
        recorded, existing = s.attrs, s.prompt_sets()
        classes = s.classes if classes is None else load_classes(classes)
    if name and len(templates) > 1:
        raise ValueError("--name names a single prompt set; give one --templates with it")
    names = [name or load_templates(t)[0] for t in templates]  # validate all before loading a model
    for n in names:
        validate_prompt_set_name(n)
    clash = [n for n in names if n in existing] if not overwrite else []
    if clash:
        raise ValueError(f"prompt sets {clash} already exist in {store_path}; use --name or --overwrite")
    files = resolve_model(str(recorded["model_id"]))  # identified before it is loaded, so a mismatch fails fast
    check_identity(recorded, files.identity(), f"store {store_path}",
                   "prompts must come from the model that encoded the images: re-encode the store", accept_declared=True)
    backbone = Backbone(files, device=device)
    sets = [encode_prompt_set(backbone, t, classes, synonyms, n, progress=progress) for t, n in zip(templates, names, strict=True)]
    add_prompt_sets(store_path, sets, overwrite=overwrite)
    logger.info("added prompt sets %s to %s", names, store_path)
    return names
