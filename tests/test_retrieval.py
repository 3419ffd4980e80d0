"""Top-k retrieval: the planted nearest images per class prompt, best first, and the grid drawn from the source."""
import json
import logging

import numpy as np
import pytest
from conftest import SHARED_DATASETS, requires_shared

import clip_heads.retrieval as retrieval
from clip_heads.retrieval import top_k_images
from clip_heads.store import PromptSet
from clip_heads.writer import write_store


def test_top_k_returns_planted_keys_in_order_and_draws_grid(tmp_path, caplog):
    from PIL import Image

    C, D, k = 3, 8, 3
    rng = np.random.default_rng(0)
    vecs, keys, expected = [], [], {}
    for c in range(C):
        expected[f"class{c}"] = []
        for j, cos in enumerate((0.95, 0.9, 0.8)):
            v = np.zeros(D)
            v[c], v[7] = cos, np.sqrt(1 - cos**2)
            vecs.append(v), keys.append(f"class{c}/top{j}.png")
            expected[f"class{c}"].append(keys[-1])
    for i in range(20):  # distractors: nearly orthogonal to every prompt
        v = np.zeros(D)
        v[3:7] = rng.normal(size=4)
        v[:3] = 0.1 * rng.random(3)
        vecs.append(v), keys.append(f"other/{i}.png")
    order = rng.permutation(len(keys))
    X, keys = np.array(vecs)[order], [keys[i] for i in order]
    ps = PromptSet("p", [f"class{c}" for c in range(C)], ["{}"], [f"class{c}" for c in range(C)],
                   np.eye(D)[:C].astype(np.float32), np.zeros(C, int), np.arange(C))
    root = tmp_path / "images"
    for key in keys:
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (12, 10), (200, 30, 30)).save(root / key)
    write_store(tmp_path / "s.h5", X, None, keys=keys, prompt_sets=[ps], source={"format": "folder", "root": str(root)})
    top = top_k_images(tmp_path / "s.h5", k=k, out_dir=tmp_path / "out")
    assert {c: [key for key, _ in row] for c, row in top.items()} == expected
    assert [s for _, s in top["class1"]] == pytest.approx([0.95, 0.9, 0.8], abs=1e-6)
    assert json.loads((tmp_path / "out" / "top_k.json").read_text())["top_k"]["class2"][0][0] == "class2/top0.png"
    grid = Image.open(tmp_path / "out" / "top_k.png")
    assert grid.height == C * (96 + retrieval.GRID_CAPTION + 4) + 4 and grid.getpixel((grid.width - 50, 50))[:2] == (200, 30)
    assert grid.info["dpi"] == pytest.approx((96, 96), abs=0.1)  # one image pixel per CSS pixel on the page
    # Images gone: JSON only, with a note in the log.
    write_store(tmp_path / "t.h5", X, None, keys=keys, prompt_sets=[ps], source={"format": "folder", "root": str(tmp_path / "gone")})
    with caplog.at_level(logging.INFO, logger="clip_heads.retrieval"):
        top_k_images(tmp_path / "t.h5", k=k, out_dir=tmp_path / "out2")
    assert (tmp_path / "out2" / "top_k.json").is_file() and not (tmp_path / "out2" / "top_k.png").exists()
    assert "top-k grid skipped" in caplog.text


@requires_shared
@pytest.mark.shared_data
def test_top_k_grid_finds_emotion6_images_through_the_source(tmp_path):
    # Emotion6 keys are relative to images/, not to the recorded root: the source is reopened.
    root = SHARED_DATASETS / "emotion6"
    keys = [f"{e}/{i}.jpg" for e in ("anger", "joy") for i in range(1, 4)]
    X = np.eye(6, 4)[[0, 0, 0, 1, 1, 1]] + 0.01 * np.arange(6)[:, None]
    ps = PromptSet("p", ["anger", "joy"], ["{}"], ["anger", "joy"], np.eye(4)[:2].astype(np.float32), np.zeros(2, int), np.arange(2))
    write_store(tmp_path / "s.h5", X, None, keys=keys, prompt_sets=[ps], source={"format": "emotion6", "root": str(root), "options": {}})
    top = top_k_images(tmp_path / "s.h5", k=3, out_dir=tmp_path)
    assert [k for k, _ in top["joy"]] == ["joy/1.jpg", "joy/2.jpg", "joy/3.jpg"]
    from PIL import Image

    grid = np.asarray(Image.open(tmp_path / "top_k.png").convert("L"), float)
    assert grid.shape[0] == 2 * (100 + retrieval.GRID_CAPTION) + 4 and grid[10:90, -90:].std() > 5  # a real photo, not a grey tile


def test_top_k_grid_draws_an_unreadable_image_grey_but_a_bug_is_not_swallowed(tmp_path, monkeypatch):
    from PIL import Image

    root = tmp_path / "images"
    keys = ["a/0.png", "a/1.png", "b/0.png", "b/1.png"]
    for key in keys:
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (10, 200, 10)).save(root / key)
    (root / "a" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")  # a decode error: drawn grey
    X = np.eye(4, 4)[[0, 0, 1, 1]] + 0.01 * np.arange(4)[:, None]
    ps = PromptSet("p", ["a", "b"], ["{}"], ["a", "b"], np.eye(4)[:2].astype(np.float32), np.zeros(2, int), np.arange(2))
    write_store(tmp_path / "s.h5", X, None, keys=keys, prompt_sets=[ps], source={"format": "folder", "root": str(root)})
    top_k_images(tmp_path / "s.h5", k=2, out_dir=tmp_path / "out")
    grid = Image.open(tmp_path / "out" / "top_k.png").convert("RGB")
    label_w = grid.width - 2 * (96 + 4)
    tiles = [grid.getpixel((label_w + j * 100 + 48, 4 + 48)) for j in range(2)]  # row "a": its two images
    assert sorted(tiles) == sorted([(10, 200, 10), (211, 211, 211)])  # one green, the broken one light grey

    def bug(source):
        return lambda key: (_ for _ in ()).throw(RuntimeError("a bug in the loader"))

    monkeypatch.setattr(retrieval, "_image_loader", bug)
    with pytest.raises(RuntimeError, match="a bug in the loader"):
        top_k_images(tmp_path / "s.h5", k=2, out_dir=tmp_path / "out-bug")


def test_top_k_grid_captions_each_image_with_its_cosine_and_own_label(tmp_path):
    from PIL import Image

    root = tmp_path / "images"
    keys = ["a/0.png", "a/1.png", "b/0.png"]
    for key in keys:
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (120, 120, 120)).save(root / key)
    # Prompt a's nearest two are both a's; prompt b's nearest is b/0, then an a.
    X = np.array([[1.0, 0.0], [0.9, 0.1], [0.1, 0.9]])
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    ps = PromptSet("p", ["a", "b"], ["{}"], ["a", "b"], np.eye(2).astype(np.float32), np.zeros(2, int), np.arange(2))
    write_store(tmp_path / "s.h5", X, np.array([0, 0, 1]), ["a", "b"], keys=keys, prompt_sets=[ps],
                source={"format": "folder", "root": str(root)})
    top = top_k_images(tmp_path / "s.h5", k=2, out_dir=tmp_path / "out")
    assert [k for k, _ in top["b"]] == ["b/0.png", "a/1.png"]
    grid = np.asarray(Image.open(tmp_path / "out" / "top_k.png").convert("RGB"), int)
    thumb, pad, cap = 96, retrieval.GRID_PAD, retrieval.GRID_CAPTION
    label_w = grid.shape[1] - 2 * (thumb + pad)

    def caption(row, col):  # the label line under a tile: which colours its text has
        top = pad + row * (thumb + cap + pad) + thumb + 13
        strip = grid[top:top + cap - 13, label_w + col * (thumb + pad):label_w + col * (thumb + pad) + thumb]
        r, g, b = strip[..., 0], strip[..., 1], strip[..., 2]
        return {"green": bool(((g > r + 60) & (g > b + 40)).any()), "red": bool(((r > g + 100) & (r > b + 100)).any())}

    assert caption(0, 0) == caption(0, 1) == caption(1, 0) == {"green": True, "red": False}  # the prompt's own class
    assert caption(1, 1) == {"green": False, "red": True}  # an 'a' image retrieved for prompt b
