"""The analysis notebook runs, cell by cell, against a store built as the README's quickstart builds one."""
import json
from pathlib import Path

import numpy as np
import pytest

from clip_heads.crossval import cross_validate
from clip_heads.encode import encode
from clip_heads.evaluate import run_zero_shot
from clip_heads.heads import get_head
from clip_heads.prompts import add_prompts
from clip_heads.retrieval import top_k_images
from test_encode import make_folder

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.mark.parametrize("name", sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
def test_notebook_code_cells_run(name, tiny_clip, tmp_path, monkeypatch):
    root = make_folder(tmp_path / "imgs", n_per_class=12)
    store = encode(str(root), tmp_path / "s.h5", model=tiny_clip, workers=0, progress=False).path
    # As the quickstart does: prompts for another label set (FI's eight emotions) beside the store's own.
    add_prompts(str(store), ["bp-emotion"], classes="fi", name="fi-labels", device="cpu")
    monkeypatch.setenv("CLIP_HEADS_STORE", str(store))
    monkeypatch.setenv("CLIP_HEADS_NOTEBOOK_OUT", str(tmp_path / "out"))
    monkeypatch.chdir(NOTEBOOKS)
    nb = json.loads((NOTEBOOKS / name).read_text())
    ns: dict = {}
    cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert cells
    for i, cell in enumerate(cells):
        exec(compile("".join(cell["source"]), f"{name}[{i}]", "exec"), ns)
    # The foreign-label set is named and skipped; the store's own sets are scored.
    assert len(ns["X"]) == 36 and set(ns["foreign_sets"]) == {"fi-labels"} and len(ns["foreign_sets"]["fi-labels"]) == 8
    assert set(ns["zero_shot"]) == {"bp-photo", "clip-cifar100"}
    for set_name, acc in ns["zero_shot"].items():
        assert acc == run_zero_shot(store, prompt_set=set_name).metrics["accuracy"]
    assert {r["prompt_set"] for r in ns["ablation"].rows} == {"bp-photo", "clip-cifar100"}
    # The CV cell's fold accuracies are those of the same CV run here.
    X, y, classes = ns["X"], ns["y"], ns["classes"]
    ref = cross_validate(lambda: get_head("mlp")(random_state=0), X, np.asarray(classes)[y], k=ns["cv"].k, seed=0,
                         classes=classes)
    assert ns["accs"] == [r["accuracy"] for r in ref.fold_reports] and len(ns["accs"]) == 10
    top = json.loads((tmp_path / "out" / "top-k" / "top_k.json").read_text())
    expected = top_k_images(store, k=8, prompt_set=ns["best"])
    assert {c: [k for k, _ in hits] for c, hits in top["top_k"].items()} == {c: [k for k, _ in h] for c, h in expected.items()}
