"""Prompt ensembling below the store: a stored prompt set's class vectors are CLIP's ensemble (the
renormalised sum of the normalised prompt vectors of each class), computed without the zero-shot
kernel's scoring half or the family registry."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clip_heads import ensembling, zeroshot
from clip_heads.store import PromptSet, StoreError, open_store
from clip_heads.writer import write_store

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["anger", "awe", "fear", "joy"]
TEMPLATES = ["a photo of {}.", "{}", "an image that evokes {}"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store whose prompt set has uneven prompts: template 2 has none for "joy", "awe" has two
    prompts under template 0, and the vectors have very different norms (so a mean of raw vectors
    would differ from the ensemble)."""
    rng = np.random.default_rng(3)
    pairs = [(t, c) for t in range(3) for c in range(4) if (t, c) != (2, 3)] + [(0, 1)]
    tid, cid = np.array([t for t, _ in pairs]), np.array([c for _, c in pairs])
    texts = [TEMPLATES[t].format(CLASSES[c]) + ("!" if i == len(pairs) - 1 else "") for i, (t, c) in enumerate(pairs)]
    embeds = (rng.normal(size=(len(pairs), 12)) * rng.uniform(0.1, 10, size=(len(pairs), 1))).astype(np.float32)
    ps = PromptSet("emo", CLASSES, TEMPLATES, texts, embeds, tid, cid)
    X = rng.normal(size=(20, 12)).astype(np.float32)
    path = write_store(tmp_path_factory.mktemp("ens") / "s.h5", X, rng.integers(0, 4, 20), CLASSES, model_id="m",
                       prompt_sets=[ps])
    return path, ps


def reference(ps: PromptSet, templates) -> np.ndarray:
    """Per class, by a loop in float64: normalise each of its prompts, sum, normalise."""
    out = []
    for c in range(len(ps.classes)):
        rows = [e / np.linalg.norm(e) for e, t, k in zip(ps.embeds.astype(np.float64), ps.template_id, ps.class_id,
                                                          strict=True) if k == c and (templates is None or t in templates)]
        s = np.sum(rows, axis=0)
        out.append(s / np.linalg.norm(s))
    return np.array(out)


@pytest.mark.parametrize("templates", [None, [0], [0, 1], [1, 0]])
def test_stored_class_vectors_are_the_ensemble_of_each_classs_prompts(store, templates):
    path, ps = store
    with open_store(path) as s:
        got = s.prompt_set("emo")
        V = got.class_vectors(templates)
        assert V.dtype == np.float32 and V.shape == (4, 12)
        np.testing.assert_allclose(V, reference(ps, templates), atol=1e-6)
        # The store's method, the ensembling module and the kernel's re-export are one computation.
        np.testing.assert_array_equal(V, ensembling.class_vectors(got, templates))
        np.testing.assert_array_equal(V, zeroshot.class_vectors(got, templates))
        # By name, in another order: the same rows, permuted.
        order = ["joy", "anger", "fear", "awe"]
        np.testing.assert_array_equal(zeroshot.class_vectors(got, templates, classes=order),
                                      V[[CLASSES.index(c) for c in order]])


def test_a_class_without_a_prompt_among_the_templates_is_a_store_error_naming_it(store):
    path, _ = store
    with open_store(path) as s, pytest.raises(StoreError, match=r"prompt set 'emo' \(templates \[2\]\): no prompt "
                                                                r"for classes \['joy'\]"):
        s.prompt_set("emo").class_vectors([2])


def test_the_store_ensembles_without_the_kernels_scoring_half(store):
    """Reading class vectors from a store loads neither the zero-shot kernel nor the family registry."""
    path, ps = store
    code = ("import sys, numpy as np\n"
            "from clip_heads.store import open_store\n"
            f"s = open_store({str(path)!r})\n"
            "V = s.prompt_set('emo').class_vectors()\n"
            "print(sorted(m for m in ('clip_heads.zeroshot', 'clip_heads.backbones', 'torch') if m in sys.modules))\n"
            "print(V.tobytes().hex())\n")
    res = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    loaded, data = res.stdout.strip().splitlines()
    assert loaded == "[]"
    np.testing.assert_allclose(np.frombuffer(bytes.fromhex(data), np.float32).reshape(4, 12), reference(ps, None),
                               atol=1e-6)
