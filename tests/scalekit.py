"""Helpers of the scaling tests: a folder of real JPEGs (or generated ones), and store contents."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from clip_heads.store import open_store
from conftest import SHARED_DATASETS

TIMESTAMPS = ("created", "completed", "store_id")  # when and which file: not content


def jpeg_folder(root: Path, n_per_class: int = 5, classes=("anger", "joy", "sadness"), seed: int = 0) -> Path:
    """``root/<class>/<n>.jpg``: real Emotion6 JPEGs when ../shared/datasets is there, else generated ones."""
    real = SHARED_DATASETS / "emotion6" / "images"
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        files = sorted((real / name).glob("*.jpg"))[:n_per_class] if real.is_dir() else []
        for i in range(n_per_class):
            if i < len(files):
                shutil.copyfile(files[i], d / f"{i:03d}.jpg")
            else:
                from PIL import Image

                arr = rng.integers(0, 255, (36 + 7 * i, 48, 3), dtype=np.uint8)
                arr[..., c] = 255
                Image.fromarray(arr).save(d / f"{i:03d}.jpg", quality=90)
    return root


def content(path) -> dict:
    """Everything a store holds, attributes included (timestamps and merge records left out)."""
    with open_store(path) as s:
        out = {"keys": s.keys, "labels": s.labels, "embeds": s.embeddings(), "skipped": s.skipped(),
               "classes": s.classes, "progress": s.progress, "extras": {n: s.extra(n) for n in s.extra_names()},
               "prompts": {n: s.prompt_set(n) for n in s.prompt_sets()},
               "attrs": {k: v for k, v in s.attrs.items() if k not in TIMESTAMPS}}
    return out


def assert_same(a: dict, b: dict, atol: float = 0.0, attrs_except=()) -> None:
    """Two stores hold the same rows, skips, prompt sets and provenance; vectors within ``atol``."""
    assert a["keys"] == b["keys"]
    np.testing.assert_array_equal(a["labels"], b["labels"])
    assert a["skipped"] == b["skipped"] and a["classes"] == b["classes"] and a["progress"] == b["progress"]
    np.testing.assert_allclose(a["embeds"], b["embeds"], rtol=0, atol=atol)
    assert a["extras"].keys() == b["extras"].keys()
    assert a["prompts"].keys() == b["prompts"].keys()
    for n, pa in a["prompts"].items():
        pb = b["prompts"][n]
        assert (pa.texts, pa.classes, pa.templates) == (pb.texts, pb.classes, pb.templates)
        np.testing.assert_allclose(pa.embeds, pb.embeds, rtol=0, atol=1e-6)
    ka = {k: v for k, v in a["attrs"].items() if k not in attrs_except}
    kb = {k: v for k, v in b["attrs"].items() if k not in attrs_except}
    assert ka == kb, {k: (ka.get(k), kb.get(k)) for k in set(ka) | set(kb) if ka.get(k) != kb.get(k)}
