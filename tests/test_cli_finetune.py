"""`clip-heads finetune`, `wise-ft` and `generalisation` from the command line, on the tiny CLIP."""
import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from clip_heads.cli import main
from clip_heads.store import open_store
from test_cli_heads import colour_folder


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models: a second thread only spin-waits on a shared 2-core machine. Restored after
    # this module, so the rest of the suite runs with torch's own thread count.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run(*argv, code=0):
    res = CliRunner().invoke(main, [str(a) for a in argv])
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output
    return res.output


def test_finetune_encode_wise_ft_and_generalisation(tiny_clip, tmp_path):
    a = colour_folder(tmp_path / "a", 12)
    b = colour_folder(tmp_path / "b", 4, names=("red", "green", "blue"), seed=3)
    recipe = ["--templates", "bp-photo", "--epochs", "6", "--batch-size", "16", "--lr", "1e-3", "--workers", "0"]
    out = run("-q", "finetune", a, "--out", tmp_path / "ft", "--model", tiny_clip, *recipe, "--no-plots")
    assert "trained" in out and "36 images" in out and f"report page: {tmp_path / 'ft' / 'index.html'}" in out
    assert (tmp_path / "ft" / "index.html").is_file() and not (tmp_path / "ft" / "plots").exists()
    log = json.loads((tmp_path / "ft" / "train_log.json").read_text())
    assert log["epochs"][-1]["loss"] < log["epochs"][0]["loss"]

    # The fine-tuned directory is a model like any other for encode, and zero-shot improves on it.
    for name, model in (("zs", tiny_clip), ("ft", tmp_path / "ft")):
        run("-q", "encode", a, "--out", tmp_path / f"{name}.h5", "--model", model, "--workers", "0", "-t", "bp-photo")
        run("-q", "zero-shot", tmp_path / f"{name}.h5", "--out", tmp_path / f"{name}-zs")
    acc = {n: json.loads((tmp_path / f"{n}-zs" / "metrics.json").read_text())["accuracy"] for n in ("zs", "ft")}
    assert acc["ft"] >= 0.9 and acc["ft"] >= acc["zs"] + 0.3, acc

    run("wise-ft", tiny_clip, tmp_path / "ft", "--alphas", "0,0.5,1", "--out", tmp_path / "wise")
    w0, w1 = (load_file(tmp_path / "wise" / f"alpha-{a}" / "model.safetensors") for a in ("0.00", "1.00"))
    zs, ft = load_file(f"{tiny_clip}/model.safetensors"), load_file(tmp_path / "ft" / "model.safetensors")
    assert all(torch.equal(w0[k], zs[k]) for k in zs) and all(torch.equal(w1[k], ft[k]) for k in ft)
    with open_store(tmp_path / "ft.h5") as s:
        assert s.model_id == str(tmp_path / "ft")

    out = run("-q", "generalisation", a, b, "--out", tmp_path / "gen", "--model", tiny_clip, "--finetuned", tmp_path / "ft",
              "--alphas", "0,1", "--holdout", "none", "--b-format", "folder")
    rows = json.loads((tmp_path / "gen" / "generalisation.json").read_text())["rows"]
    assert [r["alpha"] for r in rows] == [0.0, 1.0]
    assert "alpha" in out


def test_finetune_cli_errors(tiny_clip, tmp_path):
    a = colour_folder(tmp_path / "a", 2)
    out = run("wise-ft", tiny_clip, tiny_clip, "--alpha", "1.5", "--out", tmp_path / "w", code=1)
    assert "1.5" in out
    out = run("generalisation", a, a, "--out", tmp_path / "g", "--holdout", "seven", code=2)
    assert "seven" in out
    out = run("finetune", a, "--out", tmp_path / "f", "--model", tiny_clip, "--batch-size", "16", "--micro-batch", "5",
              "--workers", "0", code=1)
    assert "micro" in out
    assert not (tmp_path / "f" / "model.safetensors").exists()


def test_finetune_cv_checks_reused_folds_honours_overwrite_and_prints_the_table_once(tiny_clip, tmp_path, caplog):
    import logging

    a = colour_folder(tmp_path / "a", 4)
    args = ["finetune", a, "--out", tmp_path / "cv", "--model", tiny_clip, "--cv", "2", "--templates", "bp-photo",
            "--epochs", "1", "--batch-size", "8", "--workers", "0"]
    title = "Fine-tuned CLIP, 2-fold cross-validation"
    with caplog.at_level(logging.INFO, logger="clip_heads"):
        out = run(*args)
    assert out.count(title) == 1 and "2-fold fine-tune CV" in out  # the table once, and a bar over folds
    messages = [r.getMessage() for r in caplog.records]
    assert not any(title in m for m in messages)
    folds = [m.split(":")[0] for m in messages if m.startswith("fold ") and "accuracy" in m]
    assert folds == ["fold 1/2", "fold 2/2"]  # counted from 1, like the heads' CV

    # Scored folds are reused only for the same settings; --overwrite starts over with the new ones.
    out = run(*args, "--lr", "1e-3", code=1)
    assert "lr=2e-05" in out and "lr=0.001" in out and "--overwrite" in out
    out = run(*args, "--lr", "1e-3", "--overwrite")
    assert out.count(title) == 1
    for f in ("fold-00", "fold-01"):
        assert json.loads((tmp_path / "cv" / f / "train_log.json").read_text())["identity"]["lr"] == 1e-3
