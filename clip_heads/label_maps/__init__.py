"""Label maps between emotion taxonomies, for scoring a head on a store with another label set.

A map is JSON with a ``"from"`` object: class name -> target class name, or ``null`` to drop
that class's samples::

    {"description": "...", "to": ["anger", ..., "neutral"], "from": {"awe": "joy", ...},
     "include": ["webemo7_to_webemo2"], "notes": ["why awe -> joy", ...]}

``"to"`` (optional) lists the target label set, including targets nothing maps to;
``"include"`` merges other built-in maps. Names match case- and space-insensitively.

Built-in maps are the ``*.json`` files beside this module plus the WEBEmo hierarchy levels
(``webemo25_to_webemo7``, ``webemo25_to_webemo2``, ``webemo7_to_webemo2``) derived from
:data:`clip_heads.datasets.WEBEMO_HIERARCHY`, so the hierarchy lives in one place.

How a map is applied (:func:`align_labels`), for a head over classes A scored on a store
over classes B:

* ``labels`` mode: every B class maps (or already belongs) into A. The store's labels are
  mapped into A's classes and the head's predictions are used as they are; this is the plain
  "B's names -> A's names" case, e.g. an Emotion6 head on FI with ``fi_to_emotion6``.
* ``common`` mode: otherwise both sides are mapped into the map's target set, e.g. an FI head
  on a positive/negative store with ``to_sentiment``, or an FI head on Emotion6 with
  ``fi_to_emotion6`` (FI predictions become Emotion6 classes; Emotion6 labels stay as they are).

When several head classes meet in one evaluation class (FI's four positive emotions -> ``joy``),
one decision rule holds for every metric of the evaluation: the head's probabilities are summed
per evaluation class and the prediction is the largest sum (:meth:`LabelAlignment.decision_rule`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import numpy as np

BUILTIN_DIR = Path(__file__).resolve().parent
WEBEMO_MAPS = ("webemo25_to_webemo7", "webemo25_to_webemo2", "webemo7_to_webemo2")


def norm(name: Any) -> str:
    """How class names are compared: ``"Amusement "`` matches ``"amusement"``."""
    return str(name).strip().lower()


@dataclass(frozen=True)
class LabelMap:
    """A parsed label map. ``mapping`` keys are normalised names; values are target names or None."""

    name: str
    mapping: dict[str, str | None]
    to: tuple[str, ...] | None = None
    description: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)

    def targets(self) -> list[str]:
        """The target label set: ``to`` if declared, else the mapped names in first-seen order."""
        if self.to is not None:
            return list(self.to)
        return list(dict.fromkeys(v for v in self.mapping.values() if v is not None))


LabelMapSpec = Union[str, "os.PathLike[str]", Mapping[str, Any], LabelMap]


def list_label_maps() -> list[str]:
    """Names of the built-in label maps."""
    return sorted([p.stem for p in BUILTIN_DIR.glob("*.json")] + list(WEBEMO_MAPS))


def _webemo_map(name: str) -> LabelMap:
    from clip_heads.datasets import WEBEMO_HIERARCHY

    src, dst = name.split("_to_")
    mapping: dict[str, str | None] = {}
    for polarity, primaries in WEBEMO_HIERARCHY.items():
        for primary, fines in primaries.items():
            if src == "webemo7":
                mapping[norm(primary)] = polarity
            else:
                for fine in fines:
                    mapping[norm(fine)] = primary if dst == "webemo7" else polarity
    to = sorted({p for ps in WEBEMO_HIERARCHY.values() for p in ps}) if dst == "webemo7" else ["negative", "positive"]
    return LabelMap(name, mapping, tuple(to), f"WEBEmo hierarchy, {src} -> {dst} (from clip_heads.datasets)")


def load_label_map(spec: LabelMapSpec) -> LabelMap:
    """A label map from a built-in name, a JSON file path, or an already-parsed dict.

    Raises ``ValueError`` (naming the built-ins) for an unknown name or a malformed map.
    """
    if isinstance(spec, LabelMap):
        return spec
    if isinstance(spec, Mapping):
        return _parse(dict(spec), "<dict>")
    text = os.fspath(spec)
    if text in WEBEMO_MAPS:
        return _webemo_map(text)
    builtin = BUILTIN_DIR / f"{text}.json"
    path = builtin if builtin.is_file() and os.sep not in text else Path(text)
    if not path.is_file():
        raise ValueError(f"label map {text!r} is neither a built-in ({', '.join(list_label_maps())}) nor a JSON file")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"label map {path} is not valid JSON: {e}") from e
    return _parse(data, path.stem if path == builtin else str(path))


def _parse(data: dict, name: str) -> LabelMap:
    if not isinstance(data, dict) or not isinstance(data.get("from"), dict):
        raise ValueError(f'label map {name} needs a "from" object of class -> class (or null), '
                         f'e.g. {{"from": {{"awe": "joy", "neutral": null}}}}')
    mapping: dict[str, str | None] = {}
    for inc in data.get("include", []):
        mapping.update(load_label_map(inc).mapping)
    for k, v in data["from"].items():
        if v is not None and not isinstance(v, str):
            raise ValueError(f"label map {name}: {k!r} maps to {v!r}; targets are class names or null")
        if norm(k) in mapping and mapping[norm(k)] != v:
            raise ValueError(f"label map {name}: {k!r} -> {v!r} contradicts an included map ({mapping[norm(k)]!r})")
        mapping[norm(k)] = v
    to = data.get("to")
    if to is not None:
        known = {norm(t) for t in to}
        stray = sorted({v for v in mapping.values() if v is not None and norm(v) not in known})
        if stray:
            raise ValueError(f"label map {name} maps to {stray}, which are not in its \"to\" list {to}")
    notes = data.get("notes", ())
    return LabelMap(name, mapping, tuple(to) if to is not None else None, str(data.get("description", "")),
                    tuple([notes] if isinstance(notes, str) else notes))


@dataclass
class LabelAlignment:
    """How a head's predictions and a store's labels meet in one evaluation label set.

    Attributes
    ----------
    classes : the evaluation classes (report rows).
    truth : (n_store_classes,) index into ``classes`` per store class, -1 = drop its samples.
    pred : (n_head_classes,) index into ``classes`` per head class.
    mode : "identity", "labels" or "common" (see the module docstring).
    dropped : store classes whose samples are dropped.
    """

    classes: list[str]
    truth: np.ndarray
    pred: np.ndarray
    mode: str
    dropped: list[str]
    map_name: str | None = None

    def map_truth(self, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(mapped labels of the kept samples, keep mask)`` for store labels ``y``."""
        t = self.truth[np.asarray(y, np.int64)]
        keep = t >= 0
        return t[keep], keep

    def map_proba(self, P: np.ndarray) -> np.ndarray:
        """Head probabilities ``(n, n_head_classes)`` summed into ``(n, len(classes))``."""
        M = np.zeros((len(self.pred), len(self.classes)))
        M[np.arange(len(self.pred)), self.pred] = 1.0
        return np.asarray(P, np.float64) @ M

    def decision_rule(self, head_classes: Sequence[str], has_proba: bool = True) -> dict[str, Any]:
        """THE rule that turns a head's output into one evaluation class, as a report records it.

        With probabilities: the head's probabilities summed per evaluation class
        (:meth:`map_proba`), the prediction their argmax, and every metric of the evaluation
        computed from that one matrix ("summed-probability"; plain "argmax" where no two head
        classes share an evaluation class). Without: the head's predicted class, mapped
        ("mapped-prediction"). Returns ``{"rule", "merged": {eval class: [head classes]}, "text"}``.
        """
        groups: dict[str, list[str]] = {}
        for h, t in zip(head_classes, self.pred.tolist(), strict=True):
            groups.setdefault(self.classes[t], []).append(str(h))
        merged = {c: hs for c, hs in groups.items() if len(hs) > 1}
        if not has_proba:
            rule = "mapped-prediction"
            text = ("Decision rule: the head's predicted class, mapped into the evaluation classes (the head gives "
                    "no probabilities, so there are no top-k or soft-label metrics)")
        elif merged:
            rule = "summed-probability"
            shown = "; ".join(f"{c} = {' + '.join(hs)}" for c, hs in merged.items())
            text = (f"Decision rule: each evaluation class scores the sum of the head's probabilities of the classes "
                    f"mapped to it ({shown}); the prediction is the largest sum, and every metric here (tables, "
                    f"accuracy, top-k, soft labels) uses these summed probabilities")
        else:
            rule = "argmax"
            text = "Decision rule: the head's most probable class (no two head classes share an evaluation class)"
        return {"rule": rule, "merged": merged, "text": text}


def align_labels(
    head_classes: Sequence[str],
    store_classes: Sequence[str],
    label_map: LabelMapSpec | None = None,
    head_desc: str = "head",
    store_desc: str = "store",
) -> LabelAlignment:
    """Put a head's classes and a store's classes into one evaluation label set.

    Without a map, every store class must be one of the head's classes (by name). Raises
    ``ValueError`` naming the classes that do not map and the valid targets.
    """
    head = [str(c) for c in head_classes]
    store = [str(c) for c in store_classes]
    head_idx = {norm(c): i for i, c in enumerate(head)}
    lm = load_label_map(label_map) if label_map is not None else None
    mapping = lm.mapping if lm else {}

    def target(name: str) -> str | None:
        return mapping[norm(name)] if norm(name) in mapping else name

    store_targets = [target(c) for c in store]
    off_head = [c for c, t in zip(store, store_targets, strict=True) if t is not None and norm(t) not in head_idx]
    if not off_head:
        classes, pred = head, np.arange(len(head))
        mode = "labels" if lm else "identity"
    elif lm is None:
        raise ValueError(f"{store_desc} classes {off_head} are not among the {head_desc} classes {head}; pass a label "
                         f"map (built-in: {', '.join(list_label_maps())}) to score across label sets")
    else:
        classes = lm.targets()
        c_idx = {norm(c): i for i, c in enumerate(classes)}
        head_targets = [target(c) for c in head]
        off_targets = [c for c, t in zip(head, head_targets, strict=True) if t is None or norm(t) not in c_idx]
        if off_targets:
            raise ValueError(
                f"label map {lm.name} does not map {store_desc} classes {off_head} onto the {head_desc} classes "
                f"{head}: map each to one of them, or to null to drop its samples (nor can both sides meet in "
                f"the map's targets {classes}: {head_desc} classes {off_targets} do not map there)")
        pred, mode = np.array([c_idx[norm(t)] for t in head_targets]), "common"
    c_idx = {norm(c): i for i, c in enumerate(classes)}
    unmapped = [c for c, t in zip(store, store_targets, strict=True) if t is not None and norm(t) not in c_idx]
    if unmapped:
        raise ValueError(f"label map {lm.name if lm else ''} does not map {store_desc} classes {unmapped}; map each "
                         f"to one of {classes} or to null to drop its samples")
    truth = np.array([-1 if t is None else c_idx[norm(t)] for t in store_targets], np.int64)
    dropped = [c for c, t in zip(store, truth, strict=True) if t < 0]
    return LabelAlignment(list(classes), truth, np.asarray(pred, np.int64), mode, dropped, lm.name if lm else None)
