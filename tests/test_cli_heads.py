"""The head and evaluation commands end to end, on stores built by the real `clip-heads encode`."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from clip_heads.cli import main
from clip_heads.heads.base import Head
from clip_heads.store import open_store
from PIL import Image

COLOURS = {"cat": (220, 30, 30), "dog": (30, 200, 30), "eel": (30, 30, 220)}


def colour_folder(root, n_per_class, names=("cat", "dog", "eel"), seed=0):
    """Solid class colours with mild noise: visibly different classes."""
    rng = np.random.default_rng(seed)
    for name, colour in zip(names, COLOURS.values(), strict=True):
        (root / name).mkdir(parents=True)
        for i in range(n_per_class):
            arr = np.clip(np.array(colour) + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / name / f"{i}.png")
    return root


def run(*argv, code=0):
    res = CliRunner().invoke(main, [str(a) for a in argv])
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output
    return res.output


@pytest.fixture(scope="module")
def stores(tiny_clip, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli-heads")
    # Class-coloured images: the tiny random CLIP's vectors are separable by colour.
    a = colour_folder(tmp / "a", 16)
    b = colour_folder(tmp / "b", 6, names=("kitty", "doggo", "fish"), seed=1)
    run("-q", "encode", a, "--out", tmp / "a.h5", "--model", tiny_clip, "--workers", "0", "-t", "bp-photo", "-t", "clip-cifar100")
    run("-q", "encode", b, "--out", tmp / "b.h5", "--model", tiny_clip, "--workers", "0", "-t", "bp-photo")
    return tmp


def test_zero_shot_and_ablation(stores):
    out = run("zero-shot", stores / "a.h5", "--prompts", "clip-cifar100", "--template-ids", "0,3", "--out", stores / "zs")
    m = json.loads((stores / "zs" / "metrics.json").read_text())
    assert "Macro Avg." in out and "Weighted Avg." in out
    # The accuracy is that of cosine to the mean of templates 0 and 3, recomputed from the store.
    with open_store(stores / "a.h5") as s:
        X, y, classes = s.arrays()
        V = s.prompt_set("clip-cifar100").class_vectors([0, 3])
    pred = (X / np.linalg.norm(X, axis=1, keepdims=True) @ V.T).argmax(1)
    assert m["accuracy"] == pytest.approx(float((pred == y).mean()), abs=1e-12)
    assert m["info"]["templates"] == [m["info"]["templates"][0], m["info"]["templates"][1]] and len(m["info"]["templates"]) == 2
    assert [r.split(",")[0] for r in (stores / "zs" / "per_class.csv").read_text().splitlines()[1:]] == classes
    run("ablate-prompts", stores / "a.h5", "--out", stores / "abl")
    rows = json.loads((stores / "abl" / "metrics.json").read_text())["rows"]
    assert len(rows) == 1 + 1 + 18 + 1  # bp-photo alone and as a set, 18 clip templates alone and their ensemble
    assert [r["accuracy"] for r in rows] == sorted((r["accuracy"] for r in rows), reverse=True)


@pytest.mark.parametrize("head", ["linear", "mlp", "tip-adapter", "contrastive"])
def test_train_head_cv_then_evaluate_round_trip(stores, head):
    d = stores / f"head-{head}"
    run("-q", "train-head", head, stores / "a.h5", "--out", d, "--cv", "3", "--seed", "1")
    m = json.loads((d / "metrics.json").read_text())
    assert m["cv"]["mean"]["accuracy"] >= 0.8, m["cv"]["mean"]  # chance is 1/3
    cfg = json.loads((d / "config.json").read_text())
    with open_store(stores / "a.h5") as s:
        assert cfg["backbone"]["model_id"] == s.model_id and cfg["backbone"]["dim"] == s.dim
        X, y, classes = s.arrays()
    run("evaluate", d, stores / "a.h5", "--out", d / "ev")
    ev = json.loads((d / "ev" / "metrics.json").read_text())
    # The saved head predicts exactly what the loaded one does.
    loaded = Head.from_pretrained(d)
    acc = float((np.asarray(loaded.predict(X)) == np.asarray(classes)[y]).mean())
    assert abs(ev["accuracy"] - acc) < 1e-9


def test_cross_dataset_with_label_map_and_native_prompts(stores, tmp_path):
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"from": {"kitty": "cat", "doggo": "dog", "fish": "eel"}}))
    d = stores / "xd"
    run("-q", "train-head", "mlp", stores / "a.h5", "--out", d, "--eval-store", stores / "b.h5", "--label-map", mapping)
    m = json.loads((d / "metrics.json").read_text())
    assert m["eval"]["accuracy"] >= 0.8  # b's classes use the same colours as a's
    # A text-side head needs no map: it is queried with b's own prompts.
    run("-q", "train-head", "contrastive", stores / "a.h5", "--out", stores / "xd2", "--eval-store", stores / "b.h5")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"from": {"kitty": "cat"}}))
    out = run("train-head", "mlp", stores / "a.h5", "--out", tmp_path / "h", "--eval-store", stores / "b.h5", "--label-map", bad, code=1)
    assert "doggo" in out


def test_head_refuses_a_store_of_another_model(stores, tmp_path):
    from conftest import build_tiny_clip

    other = build_tiny_clip(tmp_path / "other", seed=5)
    run("-q", "encode", stores / "a", "--out", tmp_path / "o.h5", "--model", other, "--workers", "0", "-t", "bp-photo")
    run("-q", "train-head", "linear", stores / "a.h5", "--out", tmp_path / "lin")
    out = run("evaluate", tmp_path / "lin", tmp_path / "o.h5", code=1)
    assert str(other) in out


@pytest.mark.parametrize(
    "argv, code, needle",
    [
        (["train-head", "svm", "A", "--out", "O"], 2, "svm"),
        (["train-head", "mlp", "A", "--out", "O", "--param", "hidden"], 2, "key=value"),
        (["train-head", "mlp", "A", "--out", "O", "--param", "dropout=2.5"], 2, "dropout"),
        (["zero-shot", "A", "--prompts", "nope"], 2, "nope"),  # a bad value (issue 9: exit 2)
        (["evaluate", "O", "A"], 1, "O"),  # a missing head folder is failed work (issue 9: exit 1)
        (["train-head", "mlp", "A", "--out", "O", "--label-map", "x.json"], 2, "eval"),  # a label map without an eval store
        (["zero-shot", "A", "--template-ids", "7"], 2, "has no template 7"),
    ],
)
def test_cli_errors(stores, tmp_path, argv, code, needle):
    subst = {"A": stores / "a.h5", "O": tmp_path / "nothing-here"}
    argv = [subst.get(a, a) for a in argv]
    out = run(*argv, code=code)
    assert str(subst.get(needle, needle)) in out


def test_evaluate_with_two_label_maps_keeps_both_results(stores, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default folders go under ./cache
    head = stores / "head-for-maps"
    run("-q", "train-head", "linear", stores / "a.h5", "--out", head)
    m1, m2 = tmp_path / "one.json", tmp_path / "two.json"
    m1.write_text(json.dumps({"from": {"kitty": "cat", "doggo": "dog", "fish": "eel"}}))
    m2.write_text(json.dumps({"from": {"kitty": "cat", "doggo": "cat", "fish": "eel"}}))
    run("evaluate", head, stores / "b.h5", "--label-map", m1)
    run("evaluate", head, stores / "b.h5", "--label-map", m2)
    first = tmp_path / "cache" / "evaluate" / "head-for-maps-on-b-one"
    second = tmp_path / "cache" / "evaluate" / "head-for-maps-on-b-two"
    assert json.loads((first / "metrics.json").read_text())["info"]["run"]["label_map"] == str(m1)
    assert json.loads((second / "metrics.json").read_text())["info"]["run"]["label_map"] == str(m2)
    # One --out for both: the second is refused (exit 1, one line) until --overwrite.
    run("evaluate", head, stores / "b.h5", "--label-map", m1, "--out", tmp_path / "ev")
    out = run("evaluate", head, stores / "b.h5", "--label-map", m2, "--out", tmp_path / "ev", code=1)
    assert "holds the results of another run" in out and "--overwrite" in out
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["info"]["run"]["label_map"] == str(m1)
    run("evaluate", head, stores / "b.h5", "--label-map", m2, "--out", tmp_path / "ev", "--overwrite")
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["info"]["run"]["label_map"] == str(m2)
    # Evaluating on the training store is resubstitution, on the other store it is not.
    out = run("evaluate", head, stores / "a.h5")
    assert "(resubstitution: the head was trained on this data" in out
    assert "(resubstitution" not in (first / "report.txt").read_text()
    # The other commands' defaults: named after what was evaluated, one layout each.
    run("zero-shot", stores / "a.h5", "--prompts", "bp-photo")
    run("ablate-prompts", stores / "a.h5")
    for folder in ("zero-shot/a-bp-photo", "ablate-prompts/a", "evaluate/head-for-maps-on-a"):
        files = {p.name for p in (tmp_path / "cache" / folder).iterdir()}
        assert {"report.txt", "metrics.json", "per_class.csv", "confusion_matrix.csv", "predictions.csv"} <= files, folder
