"""Full CLIP fine-tuning on the tiny random CLIP: it learns, saves a loadable model, resumes a
killed run to the same weights, cross-validates on the heads' folds, and WiSE-FT blends exactly."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from clip_heads.backbone import model_identity
from clip_heads.datasets import open_source
from clip_heads.encode import encode
from clip_heads.crossval import stratified_folds
from clip_heads.finetune import _CaptionLoss, contrastive_loss, finetune
from clip_heads.finetune_cv import cross_validate_finetune
from clip_heads.finetune_eval import evaluate_zero_shot
from clip_heads.store import open_store
from clip_heads.wise_ft import generalisation, interpolate, interpolate_sweep
from conftest import build_tiny_clip

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
# 48 training images, batch 16: 3 steps per epoch, 18 steps in all.
RECIPE = dict(templates="bp-photo", epochs=6, batch_size=16, lr=1e-3, warmup=0.1, workers=0, seed=0, progress=False)


def make_colours(root: Path, colours=COLOURS, n=16, seed=0, broken=True) -> Path:
    """Solid-colour 30x30 images with a little noise, as an image folder; one unreadable file."""
    rng = np.random.default_rng(seed)
    for name, rgb in colours.items():
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            arr = np.clip(np.array(rgb)[None, None] + rng.normal(0, 20, (30, 30, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(d / (f"{i:02d}.png" if i % 2 else f"{i:02d}.jpg"), quality=95)
    if broken:
        (root / "red" / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return root


def split(src, k=4, seed=0):
    folds = stratified_folds(src.labels, k, seed)
    return np.flatnonzero(folds != 0), np.flatnonzero(folds == 0)


def weights(model_dir) -> dict[str, torch.Tensor]:
    return load_file(str(Path(model_dir) / "model.safetensors"))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The tiny model gains nothing from two threads, and on a shared machine their spin-waits cost.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tuned(tiny_clip, tmp_path_factory):
    """One fine-tune on folds 1-3 of the colours, zero-shot scored on fold 0 before and after."""
    root = tmp_path_factory.mktemp("ft")
    src = open_source(make_colours(root / "colours"))
    train, test = split(src)
    before = evaluate_zero_shot(tiny_clip, src, indices=test, templates="bp-photo", workers=0)
    res = finetune(src, root / "out", tiny_clip, train_indices=train, **RECIPE)
    after = evaluate_zero_shot(str(root / "out"), src, indices=test, templates="bp-photo", workers=0)
    return dict(root=root, src=src, train=train, test=test, res=res, out=root / "out", before=before, after=after)


# -- the loss ----------------------------------------------------------------------------------
def test_duplicate_labels_are_positives_hand_computed():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    txt = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])  # pairs 0 and 1: class 0 under two templates
    labels = torch.tensor([0, 0, 1])
    got = contrastive_loss(img, txt, labels, torch.tensor(math.log(2.0))).item()  # temperature 2
    lse = lambda *v: math.log(sum(math.exp(x) for x in v))  # noqa: E731
    # logits = 2 * img @ txt.T = [[2, 1.6, 0], [0, 1.2, 2], [1.2, 1.92, 1.6]]
    # image rows: rows 0 and 1 put 1/2 on columns 0 and 1, row 2 all on column 2
    image_side = [lse(2, 1.6, 0) - (2 + 1.6) / 2, lse(0, 1.2, 2) - (0 + 1.2) / 2, lse(1.2, 1.92, 1.6) - 1.6]
    # text rows (the columns): both class-0 captions have images 0 and 1 as positives
    text_side = [lse(2, 0, 1.2) - (2 + 0) / 2, lse(1.6, 1.2, 1.92) - (1.6 + 1.2) / 2, lse(0, 2, 1.6) - 1.6]
    assert got == pytest.approx((np.mean(image_side) + np.mean(text_side)) / 2, abs=1e-6)
    # Plain CLIP targets (the duplicate as a negative) give another value: 0.8/3 lower here.
    logits = 2 * img @ txt.T
    plain = (F.cross_entropy(logits, torch.arange(3)) + F.cross_entropy(logits.T, torch.arange(3))) / 2
    assert plain.item() == pytest.approx(got - 0.8 / 3, abs=1e-6)


def test_distinct_labels_give_clips_loss_with_temperature_capped_at_100():
    g = torch.Generator().manual_seed(0)
    img, txt = F.normalize(torch.randn(5, 8, generator=g), dim=1), F.normalize(torch.randn(5, 8, generator=g), dim=1)
    for log_scale, scale in ((2.0, math.exp(2.0)), (7.0, 100.0)):
        logits = scale * img @ txt.T
        clip = (F.cross_entropy(logits, torch.arange(5)) + F.cross_entropy(logits.T, torch.arange(5))) / 2
        got = contrastive_loss(img, txt, torch.arange(5), torch.tensor(log_scale))
        assert got.item() == pytest.approx(clip.item(), rel=1e-5)


def test_distinct_captions_encoded_once_and_loss_equals_per_pair_captions(tiny_clip):
    from transformers import AutoTokenizer, CLIPModel

    model, tok = CLIPModel.from_pretrained(tiny_clip), AutoTokenizer.from_pretrained(tiny_clip)
    classes, tpls = ["red", "green", "blue"], ["a photo of a {}", "a {} thing"]
    texts = [t.format(c) for c in classes for t in tpls]
    tokens = dict(tok(texts, padding=True, return_tensors="pt"))
    tokens.pop("token_type_ids", None)
    labels, templates = torch.tensor([0, 2, 0, 0, 1, 2]), torch.tensor([1, 0, 1, 0, 0, 0])
    pixels = torch.randn(6, 3, 30, 30, generator=torch.Generator().manual_seed(0))
    seen = []
    text_features = model.get_text_features
    model.get_text_features = lambda **kw: seen.append(len(kw["input_ids"])) or text_features(**kw)
    loss = _CaptionLoss(model, tokens, len(tpls))({"pixels": pixels, "labels": labels, "templates": templates})
    assert seen == [4]  # (red, t1), (red, t0), (green, t0), (blue, t0): 4 texts, not 6
    ids = (labels * 2 + templates).tolist()
    per_pair = F.normalize(text_features(**{k: v[ids] for k, v in tokens.items()}).pooler_output, dim=1)
    img = F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=1)
    ref = contrastive_loss(img, per_pair, labels, model.logit_scale)
    assert loss.item() == pytest.approx(ref.item(), abs=1e-6)


# -- fine-tuning -----------------------------------------------------------------------------
def test_finetune_learns_the_colours_and_skips_the_broken_image(tuned):
    res, log = tuned["res"], tuned["res"].log
    assert res.status == "trained" and res.steps == 18 and res.n_train == len(tuned["train"])
    assert [s["step"] for s in log["steps"]] == list(range(1, 19))
    epochs = [e["loss"] for e in log["epochs"]]
    assert len(epochs) == 6 and epochs[-1] < 0.7 * epochs[0]
    assert [e["epoch"] for e in log["epochs"]] == [s["epoch"] for s in log["steps"]][::3] == [1, 2, 3, 4, 5, 6]
    assert tuned["before"]["accuracy"] <= 0.6  # a random CLIP is near chance (0.25)
    assert tuned["after"]["accuracy"] >= 0.9
    assert tuned["after"]["accuracy"] - tuned["before"]["accuracy"] >= 0.4
    assert tuned["after"]["macro"]["f1"] >= 0.85
    broken = "red/zz_broken.png"
    in_train = tuned["src"].keys.index(broken) in set(tuned["train"].tolist())
    assert (broken in res.skipped) == in_train and (broken in tuned["after"]["skipped"]) != in_train
    assert all(math.log(1) <= math.log(s["logit_scale"]) <= math.log(100) + 1e-6 for s in log["steps"])
    assert not (tuned["out"] / "checkpoint").exists()  # removed once the model is complete


def test_saved_model_loads_and_encodes_like_a_hub_id(tuned, tiny_clip, tmp_path):
    from transformers import CLIPModel

    out = tuned["out"]
    model = CLIPModel.from_pretrained(out)
    assert not torch.equal(model.visual_projection.weight, CLIPModel.from_pretrained(tiny_clip).visual_projection.weight)
    store = tmp_path / "tuned.h5"
    encode(tuned["src"].root, store, model=str(out), templates=["bp-photo"], dtype="float32", workers=0, progress=False)
    with open_store(store) as s:
        X, y, _ = s.arrays()
        V = s.prompt_set("bp-photo").class_vectors()
        assert s.model_id == str(out)
        rows = [s.keys.index(tuned["src"].keys[i]) for i in tuned["after"]["positions"]]
    # The store's zero-shot on the held-out fold is the in-memory evaluation's.
    pred = (X[rows] @ V.T).argmax(1)
    np.testing.assert_array_equal(pred, tuned["after"]["y_pred"])
    assert (pred == y[rows]).mean() == pytest.approx(tuned["after"]["accuracy"])


def hand_calibration(y, P, n_bins=15) -> dict:
    """ECE (top-label, equal-width bins (b/B, (b+1)/B]), multiclass Brier and NLL, written out."""
    y, P = np.asarray(y), np.asarray(P, np.float64)
    conf, ok = P.max(1), (P.argmax(1) == y).astype(float)
    ece = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        inside = (conf > lo) & (conf <= hi) if b else (conf <= hi)
        if inside.any():
            ece += inside.sum() / len(y) * abs(ok[inside].mean() - conf[inside].mean())
    onehot = np.eye(P.shape[1])[y]
    return {"ece": ece, "brier": float(((P - onehot) ** 2).sum(1).mean()),
            "nll": float(-np.log(P[np.arange(len(y)), y]).mean()), "accuracy": float(ok.mean())}


def check_hand_calibration(cal: dict, y, P) -> None:
    want = hand_calibration(y, P)
    for k, v in want.items():
        assert cal[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k  # NLL: rows renormalised (float32 softmax)


def test_zero_shot_probabilities_are_the_models_softmax_and_calibrated_by_hand(tuned):
    from transformers import AutoProcessor, CLIPModel

    src, after = tuned["src"], tuned["after"]
    model, proc = CLIPModel.from_pretrained(tuned["out"]).eval(), AutoProcessor.from_pretrained(tuned["out"])
    images = [Image.open(Path(src.root) / src.keys[i]).convert("RGB") for i in after["positions"]]
    inputs = proc(text=[f"a photo of a {c}" for c in src.classes], images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = model(**inputs).logits_per_image.softmax(-1).numpy()  # transformers' own CLIP forward
    P = np.asarray(after["proba"])
    np.testing.assert_allclose(P, ref, atol=2e-5)
    assert after["scoring"]["scoring"] == "softmax"
    assert after["calibration"]["probabilities"] == after["scoring"]["text"]
    check_hand_calibration(after["calibration"], src.labels[after["positions"]], P)
    assert after["calibration"]["n_bins"] == 15


def test_a_single_finetune_writes_its_page_with_the_training_curve(tuned, tmp_path):
    from clip_heads.report_folder import render_folder
    from test_report_page import check_page
    from test_report_wiring import check_figure

    out = tuned["out"]
    page, metrics = check_page(out)  # written by finetune itself
    assert metrics["kind"] == "finetune" and page.imgs in ([], ["plots/training.png"])  # the module fixture's env
    assert metrics["loss_curve"]["step"] == list(range(1, 19))
    assert metrics["loss_curve"]["loss"] == [s["loss"] for s in tuned["res"].log["steps"]]
    keys = {tuple(n["key"]) for n in page.nums}
    assert {("n_steps",), ("n_train",)} | {("epochs", i, "loss") for i in range(6)} <= keys
    text = (out / "index.html").read_text()
    assert metrics["info"]["model"]["model_hash"] in text and str(tuned["src"].root) in text  # provenance
    assert metrics["info"]["data"]["fingerprint"] in text and "clip-heads finetune" in text
    copy = tmp_path / "copy"  # figures on, drawn from its metrics.json alone
    copy.mkdir()
    shutil.copy(out / "metrics.json", copy / "metrics.json")
    render_folder(copy, plots=True)
    page, _ = check_page(copy)
    assert page.imgs == ["plots/training.png"] and check_figure(copy / "plots" / "training.png") == (1125, 825)


def test_rerun_is_up_to_date_and_other_settings_are_refused(tuned, tiny_clip):
    kw = dict(RECIPE, train_indices=tuned["train"])
    again = finetune(tuned["src"], tuned["out"], tiny_clip, **kw)
    assert again.status == "up-to-date" and again.steps == 18
    with pytest.raises(ValueError, match=r"lr=0\.001.*lr=0\.002"):
        finetune(tuned["src"], tuned["out"], tiny_clip, **dict(kw, lr=2e-3))
    with pytest.raises(ValueError, match="must divide"):
        finetune(tuned["src"], tuned["out"], tiny_clip, **dict(kw, micro_batch=5))
    with pytest.raises(ValueError, match="CUDA"):
        finetune(tuned["src"], tuned["out"], tiny_clip, **dict(kw, precision="fp16", device="cpu"))


CHILD = """
import json, sys, time
import torch
torch.set_num_threads(1)  # as the test process, so both halves compute alike
import importlib
ft = importlib.import_module("clip_heads.finetune")  # the module; clip_heads.finetune is the function
save = ft._save_checkpoint
def slow_save(*a, **k):  # give the parent time to kill between steps
    save(*a, **k)
    time.sleep(0.15)
ft._save_checkpoint = slow_save
src, out, model, kw = json.loads(sys.argv[1])
ft.finetune(src, out, model, **kw)
"""


def test_sigkilled_finetune_resumes_to_the_same_weights(tuned, tiny_clip, tmp_path):
    out = tmp_path / "killed"
    kw = dict(RECIPE, train_indices=tuned["train"].tolist(), checkpoint_every=1)
    args = json.dumps([tuned["src"].root, str(out), tiny_clip, kw])
    proc = subprocess.Popen([sys.executable, "-c", CHILD, args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1])))
    latest, step, deadline = out / "checkpoint" / "latest", 0, time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            step = int(latest.read_text().strip().split("-")[1])
        except (OSError, IndexError, ValueError):
            step = 0
        if step >= 4:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 4 <= step < 18 and not (out / "train_log.json").exists(), "the kill must land mid-run"

    res = finetune(tuned["src"], out, tiny_clip, **dict(kw, train_indices=tuned["train"]))
    assert res.status == "resumed" and res.steps == 18
    assert [s["step"] for s in res.log["steps"]] == list(range(1, 19))
    ref, got = weights(tuned["out"]), weights(out)
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[k], got[k]) for k in ref), "resumed weights differ from the uninterrupted run"


def test_run_stopped_after_a_short_accumulated_step_resumes_exactly(tuned, tiny_clip, tmp_path, monkeypatch):
    import importlib

    ft = importlib.import_module("clip_heads.finetune")  # the module; clip_heads.finetune is the function

    # 34 images in micro-batches of 8 (8, 8, 8, 8, 2), two per step: steps of 16, 16 and a short 2.
    kw = dict(RECIPE, train_indices=tuned["train"][:34], epochs=2, micro_batch=8, checkpoint_every=1)
    ref = finetune(tuned["src"], tmp_path / "ref", tiny_clip, **kw)
    save = ft._save_checkpoint

    def stop_after_short_step(root, trainer, log):
        save(root, trainer, log)
        if trainer.step == 3 and trainer.epoch == 0:  # checkpointed in on_step, before the epoch closes
            raise RuntimeError("injected stop")

    monkeypatch.setattr(ft, "_save_checkpoint", stop_after_short_step)
    with pytest.raises(RuntimeError, match="injected stop"):
        finetune(tuned["src"], tmp_path / "cut", tiny_clip, **kw)
    monkeypatch.setattr(ft, "_save_checkpoint", save)
    res = finetune(tuned["src"], tmp_path / "cut", tiny_clip, **kw)
    assert res.status == "resumed" and res.steps == ref.steps == 6  # the short step is not taken twice
    a, b = weights(tmp_path / "ref"), weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cross_validation_uses_the_heads_folds_and_the_original_weights(tuned, tiny_clip, tmp_path):
    src = tuned["src"]
    summary = cross_validate_finetune(src, tmp_path / "cv", tiny_clip, cv=3, seed=1, templates="bp-photo", epochs=1,
                                      batch_size=16, micro_batch=8, lr=1e-3, workers=0, gradient_checkpointing=True,
                                      progress=False, plots=True)
    folds = stratified_folds(src.labels, 3, 1)
    with open(tmp_path / "cv" / "folds.csv") as f:
        saved = [int(line.rsplit(",", 1)[1]) for line in f.read().splitlines()[1:]]
    np.testing.assert_array_equal(saved, folds)
    original = model_identity(tiny_clip)["model_hash"]
    for f in range(3):
        fold_dir = tmp_path / "cv" / f"fold-{f:02d}"
        ident = json.loads((fold_dir / "train_log.json").read_text())["identity"]
        assert ident["model_hash"] == original  # every fold starts from the original weights
        assert ident["train_indices"] == hashlib.sha256(np.flatnonzero(folds != f).tobytes()).hexdigest()
        scored = json.loads((fold_dir / "metrics.json").read_text())
        held_out = set(np.flatnonzero(folds == f).tolist()) - {src.keys.index("red/zz_broken.png")}
        assert set(scored["positions"]) == held_out
        assert not list(fold_dir.glob("*.safetensors"))  # weights dropped once scored
    accs = [r["accuracy"] for r in summary["folds"]]
    assert summary["k"] == 3 and summary["mean"]["accuracy"] == pytest.approx(np.mean(accs))
    assert summary["std"]["accuracy"] == pytest.approx(np.std(accs))
    written = json.loads((tmp_path / "cv" / "metrics.json").read_text())
    assert written["kind"] == "cv" and written["info"]["run"]["command"] == "finetune --cv"
    assert written["info"]["data"]["fingerprint"] == src.fingerprint() and written["info"]["run"]["config"]["epochs"] == 1
    # One evaluation in the results layout: the out-of-fold predictions, each image once, by its fold.
    import csv

    rows = list(csv.DictReader(open(tmp_path / "cv" / "predictions.csv")))
    broken = src.keys.index("red/zz_broken.png")
    assert [r["key"] for r in rows] == [k for i, k in enumerate(src.keys) if i != broken]
    assert [int(r["fold"]) for r in rows] == [int(folds[src.keys.index(r["key"])]) + 1 for r in rows]
    assert sum(r["label"] == r["prediction"] for r in rows) / len(rows) == pytest.approx(summary["pooled"]["accuracy"])
    assert (tmp_path / "cv" / "report.txt").read_text() == summary.text
    for name in ("per_class.csv", "confusion_matrix.csv", "folds.csv"):
        assert (tmp_path / "cv" / name).is_file()
    from test_report_page import check_page, parse as parse_page  # its page: the paper's table, mean ± std

    page, _ = check_page(tmp_path / "cv")
    assert {("mean", "accuracy"), ("std", "accuracy"), ("pooled", "accuracy")} <= {tuple(n["key"]) for n in page.nums}
    fold0 = json.loads((tmp_path / "cv" / "fold-00" / "metrics.json").read_text())
    assert fold0["accuracy"] == accs[0] and "Fold 1 of 3" in (tmp_path / "cv" / "fold-00" / "report.txt").read_text()
    # Calibration, out of fold: the probabilities in predictions.csv are each fold model's, and
    # ECE / Brier / NLL in metrics.json and report.txt are theirs, by hand.
    by_key = {}
    for f in range(3):
        rep = json.loads((tmp_path / "cv" / f"fold-{f:02d}" / "metrics.json").read_text())
        by_key.update({src.keys[i]: p for i, p in zip(rep["positions"], rep["proba"], strict=True)})
        check_hand_calibration(rep["calibration"], src.labels[rep["positions"]], rep["proba"])
    cols = [f"proba_{c}" for c in src.classes]
    P = np.array([[float(r[c]) for c in cols] for r in rows])
    np.testing.assert_allclose(P, [by_key[r["key"]] for r in rows], rtol=1e-8)
    y = [src.classes.index(r["label"]) for r in rows]
    cal = written["calibration"]
    check_hand_calibration(cal, y, P)
    assert cal["computed"] == "out of fold" and "softmax" in cal["probabilities"]
    assert f"ECE              {cal['ece']:.4f}" in summary.text and f"NLL              {cal['nll']:.4f}" in summary.text
    # Figures: confusion matrix, per-class bars, fold spread and the reliability diagram; each
    # fold's held-out evaluation has its own page, linked.
    page = parse_page(tmp_path / "cv" / "index.html")
    assert sorted(page.imgs) == sorted(f"plots/{s}.png" for s in ("confusion_matrix", "per_class", "fold_spread",
                                                                     "reliability"))
    assert {f"fold-{f:02d}/index.html" for f in range(3)} <= set(page.refs)
    html = (tmp_path / "cv" / "index.html").read_text()
    assert "3 (stratified, seed 1)" in html and "<h1>clip-heads finetune --cv</h1>" in html
    assert "<h1>clip-heads finetune --cv: fold 2 of 3, zero-shot on its held-out images</h1>" in (
        tmp_path / "cv" / "fold-01" / "index.html").read_text()
    assert ("calibration", "ece") in {tuple(n["key"]) for n in page.nums}
    fold_page, _ = check_page(tmp_path / "cv" / "fold-01")  # numbers only: the figures are the CV page's
    assert fold_page.imgs == [] and ("calibration", "brier") in {tuple(n["key"]) for n in fold_page.nums}
    assert not (tmp_path / "cv" / "fold-01" / "plots").exists()


# -- WiSE-FT ---------------------------------------------------------------------------------
def test_interpolation_endpoints_are_exact_and_midpoint_is_the_mean(tuned, tiny_clip, tmp_path):
    zs, ft = weights(tiny_clip), weights(tuned["out"])
    dirs = interpolate_sweep(tiny_clip, str(tuned["out"]), [0.0, 1.0], tmp_path / "sweep")
    a0, a1 = weights(dirs[0]), weights(dirs[1])
    sweep = json.loads((tmp_path / "sweep" / "metrics.json").read_text())
    assert sweep["kind"] == "wise-ft" and sweep["blends"] == {"0.00": str(dirs[0]), "1.00": str(dirs[1])}
    assert json.loads((dirs[1] / "metrics.json").read_text())["alpha"] == 1.0 and (dirs[1] / "report.txt").is_file()
    from test_report_page import parse  # the sweep's page links each blend's, which names its endpoints

    page = parse(tmp_path / "sweep" / "index.html")
    assert {"alpha-0.00/index.html", "alpha-1.00/index.html"} <= set(page.refs)
    record = json.loads((dirs[1] / "wise_ft.json").read_text())
    blend_page = (dirs[1] / "index.html").read_text()
    assert record["finetuned"]["model_hash"] in blend_page and record["zero_shot"]["model_hash"] in blend_page
    assert all(torch.equal(a0[k], zs[k]) for k in zs) and all(torch.equal(a1[k], ft[k]) for k in ft)
    mid = weights(interpolate(tiny_clip, str(tuned["out"]), 0.5, tmp_path / "mid"))
    for k in zs:
        torch.testing.assert_close(mid[k], (zs[k] + ft[k]) / 2, rtol=0, atol=1e-6)
    assert any(not torch.equal(zs[k], ft[k]) for k in zs)
    assert json.loads((tmp_path / "mid" / "wise_ft.json").read_text())["alpha"] == 0.5
    assert evaluate_zero_shot(str(dirs[1]), tuned["src"], indices=tuned["test"], templates="bp-photo",
                              workers=0)["y_pred"] == tuned["after"]["y_pred"]
    for bad in (-0.1, 1.5, "half"):
        with pytest.raises(ValueError, match=r"alpha must be a number in \[0, 1\]"):
            interpolate(tiny_clip, str(tuned["out"]), bad, tmp_path / "bad")


def test_interpolation_refuses_models_of_other_shapes(tiny_clip, tmp_path):
    other = build_tiny_clip(tmp_path / "other", image_size=20)
    with pytest.raises(ValueError, match="position_embedding.*shape"):
        interpolate(tiny_clip, str(other), 0.5, tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_generalisation_table_along_the_wise_ft_curve(tuned, tiny_clip, tmp_path):
    b = open_source(make_colours(tmp_path / "b", {"black": (10, 10, 10), "white": (245, 245, 245)}, n=6, broken=False))
    result = generalisation(tuned["src"], b, tmp_path / "gen", tiny_clip, alphas=[0.0, 0.5, 1.0], holdout=4, seed=0,
                            finetuned=str(tuned["out"]), a_templates="bp-photo", b_templates="bp-photo", workers=0,
                            plots=True)
    rows = result["rows"]
    assert [r["alpha"] for r in rows] == [0.0, 0.5, 1.0]
    # alpha 0 is the zero-shot model and alpha 1 the fine-tuned one, on the same held-out fold.
    assert rows[0]["a_accuracy"] == pytest.approx(tuned["before"]["accuracy"])
    assert rows[-1]["a_accuracy"] == pytest.approx(tuned["after"]["accuracy"])
    zs_b = evaluate_zero_shot(tiny_clip, b, templates="bp-photo", workers=0)
    ft_b = evaluate_zero_shot(str(tuned["out"]), b, templates="bp-photo", workers=0)
    assert rows[0]["b_accuracy"] == pytest.approx(zs_b["accuracy"])
    assert (rows[0]["b_macro_f1"], rows[-1]["b_macro_f1"]) == pytest.approx((zs_b["macro"]["f1"], ft_b["macro"]["f1"]))
    csv = (tmp_path / "gen" / "generalisation.csv").read_text().splitlines()
    assert csv[0].startswith("alpha,a_accuracy,a_macro_f1") and len(csv) == 4
    assert "alpha" in result["text"] and (tmp_path / "gen" / "alpha-0.50.json").is_file()
    # The results layout on top: report.txt is the table, metrics.json says what was run on what.
    assert (tmp_path / "gen" / "report.txt").read_text() == result.text + "\n"
    written = json.loads((tmp_path / "gen" / "metrics.json").read_text())
    assert written["info"]["run"]["command"] == "generalisation" and written["rows"] == rows
    assert written["info"]["data"]["a"]["n_images"] == len(tuned["test"]) and written["info"]["data"]["b"]["n_images"] == 12
    # Its page: the curve's rows equal metrics.json's, the WiSE-FT figure beside them.
    from test_report_page import check_page

    page, _ = check_page(tmp_path / "gen")
    ends = [f"plots/reports/{a}/{s}/{f}.png" for a in ("0.00", "1.00") for s in "ab"
            for f in ("confusion_matrix", "per_class", "reliability")]
    assert sorted(page.imgs) == sorted(["plots/wise_ft.png", "plots/wise_ft_calibration.png"] + ends)
    html = (tmp_path / "gen" / "index.html").read_text()
    assert "<h1>clip-heads generalisation</h1>" in html  # not a section's
    assert "<th>fingerprint</th>" in html and '{&quot;source_root' not in html  # A's and B's records as tables
    keys = {tuple(n["key"]) for n in page.nums}
    assert {("rows", 2, "b_accuracy"), ("rows", 0, "a_ece"), ("rows", 2, "b_nll")} <= keys
    assert {("reports", "0.00", "a", "calibration", "ece"), ("reports", "1.00", "b", "accuracy")} <= keys
    # Calibration of every blend's probabilities on both sides, by hand, in the rows and report.txt.
    for row in rows:
        cached = json.loads((tmp_path / "gen" / f"alpha-{row['alpha']:.2f}.json").read_text())
        for side, src in (("a", tuned["src"]), ("b", b)):
            rep = cached[side]
            check_hand_calibration(rep["calibration"], src.labels[rep["positions"]], rep["proba"])
            want = hand_calibration(src.labels[rep["positions"]], rep["proba"])
            assert (row[f"{side}_ece"], row[f"{side}_brier"], row[f"{side}_nll"]) == pytest.approx(
                (want["ece"], want["brier"], want["nll"]), rel=1e-6)
            assert written["reports"][f"{row['alpha']:.2f}"][side]["calibration"]["ece"] == row[f"{side}_ece"]
            assert "proba" not in written["reports"][f"{row['alpha']:.2f}"][side]  # the images' columns stay cached
    assert "Calibration of each blend" in result.text and f"{rows[-1]['b_ece']:6.3f}" in result.text
    # compare reads it: one row per alpha and side, alpha 1 on B the fine-tuned model's zero-shot of B.
    from clip_heads.compare import compare_runs

    rows_c = {(r["head"], r["protocol"].split(" ")[0]): r for r in compare_runs([tmp_path / "gen"]).rows}
    assert rows_c[("WiSE-FT alpha 1.00", "zero-shot")]["accuracy_mean"] == rows[-1]["b_accuracy"]
    assert rows_c[("WiSE-FT alpha 0.00", "held-out")]["macro_f1_mean"] == rows[0]["a_macro_f1"]
    with pytest.raises(ValueError, match="alpha"):
        generalisation(tuned["src"], b, tmp_path / "gen", tiny_clip, alphas=[2.0], finetuned=str(tuned["out"]))


# -- provenance: what a fine-tune was made from, and what WiSE-FT may blend ---------------------
def test_finetune_records_its_base_and_resume_refuses_changed_weights(tuned, tiny_clip, tmp_path):
    log = json.loads((tuned["out"] / "train_log.json").read_text())
    assert log["base"] == model_identity(tiny_clip) == log["lineage"][0]
    assert log["identity"]["model_hash"] == model_identity(tiny_clip)["model_hash"]

    base = tmp_path / "base"
    shutil.copytree(tiny_clip, base)
    kw = dict(RECIPE, train_indices=tuned["train"][:16], epochs=1)
    assert finetune(tuned["src"], tmp_path / "ft", str(base), **kw).status == "trained"
    build_tiny_clip(tmp_path / "other", seed=1)
    shutil.copy(tmp_path / "other" / "model.safetensors", base / "model.safetensors")  # same path, new weights
    with pytest.raises(ValueError, match="model_hash.*--overwrite"):
        finetune(tuned["src"], tmp_path / "ft", str(base), **kw)
    # A fine-tune of the fine-tune remembers both ancestors.
    again = finetune(tuned["src"], tmp_path / "ft2", str(tuned["out"]), **kw)
    assert [i["model_hash"] for i in again.log["lineage"]] == [model_identity(tuned["out"])["model_hash"],
                                                               model_identity(tiny_clip)["model_hash"]]


def _wise_warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "clip_heads.wise_ft" and r.levelname == "WARNING"]


def test_wise_ft_warns_when_neither_endpoint_was_fine_tuned_from_the_other(tuned, tiny_clip, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="clip_heads.wise_ft")
    mid = interpolate(tiny_clip, str(tuned["out"]), 0.5, tmp_path / "mid")
    assert _wise_warnings(caplog) == []
    record = json.loads((mid / "wise_ft.json").read_text())
    assert record["zero_shot"] == model_identity(tiny_clip) and record["finetuned"] == model_identity(tuned["out"])
    interpolate(tiny_clip, str(mid), 0.5, tmp_path / "quarter")  # a blend descends from both endpoints
    assert _wise_warnings(caplog) == []

    other = build_tiny_clip(tmp_path / "other", seed=1)
    interpolate(str(other), str(tuned["out"]), 0.5, tmp_path / "unrelated")
    assert len(_wise_warnings(caplog)) == 1 and "neither" in _wise_warnings(caplog)[0]
    caplog.clear()
    interpolate(str(tuned["out"]), tiny_clip, 0.5, tmp_path / "swapped")
    assert len(_wise_warnings(caplog)) == 1 and "swapped" in _wise_warnings(caplog)[0]


def test_wise_ft_never_writes_over_an_input(tuned, tiny_clip, tmp_path):
    from click.testing import CliRunner

    from clip_heads.cli import main

    ft = tmp_path / "models" / "ft"
    shutil.copytree(tuned["out"], ft)
    before = model_identity(ft)["model_hash"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    for out, needle in ((ft, "overlaps the input"), (ft / "blend", "overlaps the input"),
                        (tmp_path / "models", "overlaps the input"), (tmp_path / "mine", "not a WiSE-FT model")):
        res = CliRunner().invoke(main, ["wise-ft", tiny_clip, str(ft), "--alphas", "0.5", "--out", str(out)])
        assert res.exit_code == 1 and needle in res.output and "Traceback" not in res.output, res.output
    assert model_identity(ft)["model_hash"] == before and (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert not (ft / "blend").exists()
    res = CliRunner().invoke(main, ["wise-ft", tiny_clip, str(ft), "--alphas", "0.5", "--out", str(tmp_path / "w")])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["wise-ft", tiny_clip, str(ft), "--alphas", "1", "--out", str(tmp_path / "w")])
    assert res.exit_code == 0, res.output  # an earlier blend is replaced whole
    assert json.loads((tmp_path / "w" / "wise_ft.json").read_text())["alpha"] == 1.0
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith(".") or p.suffix == ".lock"]
    assert left == []  # no staging folder or lock file left behind


def test_wise_ft_refuses_endpoints_of_other_architectures_in_one_line(tiny_clip, tmp_path):
    from click.testing import CliRunner

    from clip_heads.cli import main

    other = build_tiny_clip(tmp_path / "other", image_size=20)
    res = CliRunner().invoke(main, ["-q", "wise-ft", tiny_clip, str(other), "--out", str(tmp_path / "w")])
    assert res.exit_code == 1 and "architectures differ" in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "w").exists()
