"""The analysis notebook runs, cell by cell, against a store built by the real encode."""
import json
from pathlib import Path

import pytest

from clip_heads.encode import encode
from test_encode import make_folder

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.mark.parametrize("name", sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
def test_notebook_code_cells_run(name, tiny_clip, tmp_path, monkeypatch):
    root = make_folder(tmp_path / "imgs", n_per_class=12)
    store = encode(str(root), tmp_path / "s.h5", model=tiny_clip, workers=0, progress=False).path
    monkeypatch.setenv("CLIP_HEADS_STORE", str(store))
    monkeypatch.setenv("CLIP_HEADS_NOTEBOOK_OUT", str(tmp_path / "out"))
    monkeypatch.chdir(NOTEBOOKS)
    nb = json.loads((NOTEBOOKS / name).read_text())
    ns: dict = {}
    cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert cells
    for i, cell in enumerate(cells):
        exec(compile("".join(cell["source"]), f"{name}[{i}]", "exec"), ns)
    # The cells computed real results from the store.
    assert len(ns["X"]) == 36 and set(ns["zero_shot"]) == {"bp-photo", "clip-cifar100"}
    assert len(ns["accs"]) >= 2 and all(0 <= a <= 1 for a in ns["accs"])
    assert (tmp_path / "out" / "top-k" / "top_k.json").exists()
