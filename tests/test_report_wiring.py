"""Every command draws its figures, reports calibration and writes index.html, through the real commands.

Few runs, many assertions: the suite turns figures off (conftest), these tests turn them on.
"""
import csv
import json
import re
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from clip_heads.calibration import calibration_report
from clip_heads.cli import main
from clip_heads.evaluate import run_zero_shot
from conftest import make_blobs
from test_evaluate import ABCD, blob_store
from test_report_page import check_page

CV_FIGURES = {"confusion_matrix", "per_class", "fold_spread", "reliability", "soft_labels"}


def check_figure(png: Path) -> tuple[int, int]:
    """A valid PNG whose pixel size is the size its SVG states (inches = pt / 72) at 150 dpi."""
    with Image.open(png) as im:
        im.verify()
    with Image.open(png) as im:
        assert im.format == "PNG"
        size = im.size
        dpi = im.info.get("dpi")
    assert dpi == pytest.approx((150, 150), abs=0.1), png
    root = ElementTree.parse(png.with_suffix(".svg")).getroot()
    pt = [float(re.sub(r"pt$", "", root.get(k))) for k in ("width", "height")]
    assert size == tuple(round(v / 72 * 150) for v in pt), (png, size, pt)
    return size


def figures(folder: Path, sub: str = "plots") -> dict[str, tuple[int, int]]:
    """``{stem: pixel size}`` of every figure in ``folder/plots`` (each checked)."""
    return {p.stem: check_figure(p) for p in sorted((folder / sub).glob("*.png"))}


def proba_of(folder: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(true class index, probabilities, classes) read back from predictions.csv."""
    with open(folder / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    cols = [c for c in rows[0] if c.startswith("proba_")]
    classes = [c[len("proba_"):] for c in cols]
    y = np.array([classes.index(r["label"]) for r in rows])
    P = np.array([[float(r[c]) for c in cols] for r in rows])
    return y, P, classes


def check_calibration(folder: Path, section: dict) -> None:
    """metrics.json's ECE, Brier and NLL are those of the run's own predictions.csv probabilities."""
    y, P, classes = proba_of(folder)
    assert classes == section["classes"]
    assert np.array_equal(P.argmax(1), [classes.index(p) for p in _column(folder, "prediction")]) or \
        section.get("kind") == "cv"  # CV: the head's own predict, which may differ from the argmax on ties
    want = calibration_report(y, P, classes)
    cal = section["calibration"]
    for k in ("ece", "mce", "brier", "nll", "accuracy", "mean_confidence"):
        assert cal[k] == pytest.approx(want[k], rel=1e-6, abs=1e-7), k
    assert [b["count"] for b in cal["bins"]] == [b["count"] for b in want["bins"]]


def _column(folder: Path, name: str) -> list[str]:
    with open(folder / "predictions.csv", newline="") as f:
        return [r[name] for r in csv.DictReader(f)]


@pytest.fixture
def figures_on(monkeypatch):
    monkeypatch.setenv("CLIP_HEADS_PLOTS", "1")  # the default a user gets; the suite turns it off


def soft_store(path):
    """Four separable classes with vote distributions over them (columns in another order, plus neutral)."""
    _, y, _ = make_blobs(n_per_class=18, n_classes=4, dim=16, sep=2.2, seed=0)  # blob_store's labels
    rng = np.random.default_rng(3)
    votes = rng.dirichlet(np.ones(5), len(y))
    votes[np.arange(len(y)), y] += 1.5  # mostly the true class, never only it
    cols = ["d", "a", "neutral", "c", "b"]
    dist = (votes / votes.sum(1, keepdims=True))[:, [ABCD.index(c) if c in ABCD else 4 for c in cols]]
    blob_store(path, n=18, sep=2.2, extras={"emotion_distribution": dist},
               extras_columns={"emotion_distribution": cols})
    return path


def test_every_command_writes_figures_calibration_and_a_page(tmp_path, monkeypatch, figures_on):
    monkeypatch.chdir(tmp_path)  # relative paths, as a user types them
    soft_store(Path("s.h5"))
    runner = CliRunner()

    def run(*args):
        res = runner.invoke(main, ["-q", *map(str, args)])
        assert res.exit_code == 0, res.output
        return res.output

    out = run("train-head", "linear", "s.h5", "--cv", "3", "--out", "head", "--param", "C=1.0")
    assert "report page: head/index.html" in out and "Calibration (72 samples, out of fold" in out
    cv = json.loads(Path("head/cv/metrics.json").read_text())
    assert set(figures(Path("head/cv"))) == CV_FIGURES
    check_calibration(Path("head/cv"), cv)  # out of fold: each probability from the model that did not see it
    assert cv["calibration"]["computed"] == "out of fold"
    assert set(cv["soft_labels"]["by_dominant_class"]) <= set(ABCD)
    page, _ = check_page(Path("head"))
    assert sorted(page.imgs) == sorted(f"cv/plots/{s}.png" for s in CV_FIGURES) and "cv/index.html" in page.refs
    page, metrics = check_page(Path("head/cv"))
    assert {("calibration", "ece"), ("calibration", "brier"), ("calibration", "nll"),
            ("soft_labels", "kl")} <= {tuple(n["key"]) for n in page.nums}
    # The page shows each figure at the size it was drawn: CSS px = PNG px * 96 / 150.
    html = Path("head/cv/index.html").read_text()
    with Image.open("head/cv/plots/reliability.png") as im:
        assert 'src="plots/reliability.png" alt=' in html and f'style="width:{round(im.size[0] * 96 / 150)}px"' in html
    assert "head" in Path("head/index.html").read_text().split("<h1>")[1].split("</h1>")[0]
    assert "staging" not in html  # the page names the folder, not the one it was built in

    run("evaluate", "head", "s.h5", "--out", "ev")
    ev = json.loads(Path("ev/metrics.json").read_text())
    assert set(figures(Path("ev"))) == {"confusion_matrix", "per_class", "reliability", "soft_labels"}
    check_calibration(Path("ev"), ev)
    assert "Calibration (72 samples" in Path("ev/report.txt").read_text()
    assert ev["calibration"]["probabilities"] == "the head's predict_proba"
    check_page(Path("ev"))

    run("zero-shot", "s.h5", "--out", "zs")
    zs = json.loads(Path("zs/metrics.json").read_text())
    assert set(figures(Path("zs"))) == {"confusion_matrix", "per_class", "reliability", "soft_labels"}
    check_calibration(Path("zs"), zs)
    assert zs["calibration"]["probabilities"] == "softmax over 100 * cos"  # the store's own rule
    check_page(Path("zs"))

    run("ablate-prompts", "s.h5", "--out", "abl")
    abl = json.loads(Path("abl/metrics.json").read_text())
    assert set(figures(Path("abl"))) == {"ablation"}
    assert set(figures(Path("abl"), "plots/rank1")) == {"confusion_matrix", "per_class", "reliability", "soft_labels"}
    check_calibration(Path("abl"), abl["rank1"])  # its CSVs and calibration are the rank-1 prompt's
    page, _ = check_page(Path("abl"))
    assert "plots/ablation.png" in page.imgs and ("rank1", "calibration", "ece") in {tuple(n["key"]) for n in page.nums}
    assert "Rank 1 (" in Path("abl/report.txt").read_text()

    # --no-plots: the same numbers and page, no figures.
    run("zero-shot", "s.h5", "--out", "zs-fast", "--no-plots")
    assert not Path("zs-fast/plots").exists() and json.loads(Path("zs-fast/metrics.json").read_text())["calibration"] \
        == zs["calibration"]
    page, _ = check_page(Path("zs-fast"))
    assert page.imgs == [] and "not drawn" in Path("zs-fast/index.html").read_text()


def test_a_100_class_store_gets_legible_figures_and_a_folded_table(tmp_path):
    classes = [f"class_{i:03d}" for i in range(100)]
    path, X, y, _ = blob_store(tmp_path / "c100.h5", classes=classes, n=4, sep=3.0)
    rep = run_zero_shot(path, out_dir=tmp_path / "zs", plots=True)
    sizes = figures(tmp_path / "zs")
    assert set(sizes) == {"confusion_matrix", "per_class", "reliability"}
    assert 1500 < sizes["confusion_matrix"][0] < 4000 and sizes["per_class"][1] > 2000  # grown for 100 classes
    check_calibration(tmp_path / "zs", rep.metrics)
    page, metrics = check_page(tmp_path / "zs")
    html = (tmp_path / "zs" / "index.html").read_text()
    assert html.index("Macro Avg.") < html.index("<details>")  # the averages first, 100 rows one click away
    assert {("per_class", c, "f1") for c in classes} <= {tuple(n["key"]) for n in page.nums}
