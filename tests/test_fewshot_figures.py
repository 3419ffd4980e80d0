"""few-shot's per-evaluation results: calibration per fit, and each head's pooled largest-shot figures."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix, log_loss

from clip_heads.calibration import calibration_report
from clip_heads.fewshot import aligned_proba, largest_shots, run_few_shot
from clip_heads.heads import get_head, make_head
from clip_heads.store import open_store
from test_fewshot import CLASSES, planted_store
from test_report_page import check_page, parse

HEADS = ["linear", "gda"]
LINEAR = {"Cs": [1.0, 100.0]}
SEEDS = [1, 2, 3]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsfig")
    X, y = planted_store(root / "s.h5")
    # Shots out of order: the largest (4) is pooled and drawn, whatever its place in the list.
    rep = run_few_shot(root / "s.h5", root / "out", heads=HEADS, shots="4,2", seeds=SEEDS,
                       params={"linear": LINEAR}, plots=True)
    return root, X, y, rep


def refit_linear(root, X, seed, shots):
    """linear refitted by hand on the sample the run drew (its recorded keys), and the test rows."""
    out = root / "out"
    samples = json.loads((out / "samples.json").read_text())
    split = list(csv.DictReader((out / "split.csv").open()))
    row = {r["key"]: i for i, r in enumerate(split)}
    test = np.asarray([i for i, r in enumerate(split) if r["split"] == "test"])
    idx = np.asarray([row[k] for k in samples[str(seed)][str(shots)]])
    cls = get_head("linear")
    assert not cls.uses_prompts and not cls.zero_shot_scoring  # its parameters are LINEAR and the seed alone
    with open_store(root / "s.h5") as s:
        names = np.asarray(s.classes, dtype=object)
        y = s.labels
    head = make_head("linear", {**LINEAR, "random_state": seed}).fit(X[idx], names[y[idx]])
    return head, test, y[test]


def test_csv_calibration_equals_the_calibration_of_the_head_refitted_by_hand(run):
    root, X, _, _ = run
    rows = list(csv.DictReader((root / "out" / "few_shot.csv").open()))
    assert list(rows[0])[-3:] == ["ece", "brier", "nll"] and len(rows) == len(HEADS) * 2 * len(SEEDS)
    row = next(r for r in rows if (r["head"], r["shots"], r["seed"]) == ("linear", "2", "3"))
    head, test, truth = refit_linear(root, X, 3, 2)
    P = aligned_proba(head, X[test], {c: i for i, c in enumerate(CLASSES)})
    np.testing.assert_allclose(P.sum(1), 1.0, atol=1e-9)
    cal = calibration_report(truth, P)
    onehot = np.eye(len(CLASSES))[truth]
    pred = np.asarray([CLASSES.index(p) for p in head.predict(X[test])])
    assert float(row["accuracy"]) == pytest.approx(float((pred == truth).mean()), abs=1e-6)  # the same fit
    assert float(row["ece"]) == pytest.approx(cal["ece"], abs=1e-6)
    assert float(row["brier"]) == pytest.approx(((P - onehot) ** 2).sum(1).mean(), abs=1e-6)
    assert float(row["nll"]) == pytest.approx(log_loss(truth, P, labels=range(len(CLASSES))), abs=1e-6)
    assert 0 < float(row["ece"]) < 1 and float(row["nll"]) > 0
    # metrics.json's mean ± std over seeds are those of the CSV's values (ddof=1, as accuracy's).
    m = json.loads((root / "out" / "metrics.json").read_text())
    for h in HEADS:
        for k in ("2", "4"):
            for metric in ("ece", "brier", "nll"):
                v = [float(r[metric]) for r in rows if r["head"] == h and r["shots"] == k]
                cell = m["calibration_table"][h][k][metric]
                assert cell["mean"] == pytest.approx(np.mean(v), abs=1e-6)
                assert cell["std"] == pytest.approx(np.std(v, ddof=1), abs=1e-6) and cell["n_seeds"] == 3
    text = (root / "out" / "report.txt").read_text()
    ece = m["calibration_table"]["gda"]["4"]["ece"]
    assert "ECE (15 bins)" in text and f"{ece['mean']:.4f} ± {ece['std']:.4f}" in text


def test_pooled_confusion_matrix_is_sklearns_over_the_concatenated_seeds(run):
    root, X, _, _ = run
    m = json.loads((root / "out" / "metrics.json").read_text())
    assert largest_shots([4, 2]) == 4 and largest_shots([16, "all", 1]) == "all"
    assert m["pooled"]["shots"] == "4" and m["pooled"]["seeds"] == SEEDS and list(m["pooled"]["heads"]) == HEADS
    preds, truths, probas = [], [], []
    for seed in SEEDS:
        head, test, truth = refit_linear(root, X, seed, 4)
        preds.append([CLASSES.index(p) for p in head.predict(X[test])])
        probas.append(aligned_proba(head, X[test], {c: i for i, c in enumerate(CLASSES)}))
        truths.append(truth)
    pred, truth = np.concatenate(preds), np.concatenate(truths)
    rep = m["pooled"]["heads"]["linear"]
    assert rep["n_samples"] == len(truth) == 3 * m["n_test"]  # the largest shot count's predictions only
    assert rep["confusion_matrix"] == confusion_matrix(truth, pred, labels=range(len(CLASSES))).tolist()
    assert rep["accuracy"] == pytest.approx(float((pred == truth).mean()))
    cal = calibration_report(truth, np.concatenate(probas))
    assert rep["calibration"]["ece"] == pytest.approx(cal["ece"], abs=1e-5)  # kept as float32
    assert rep["calibration"]["nll"] == pytest.approx(cal["nll"], abs=1e-5)
    assert sum(b["count"] for b in rep["calibration"]["bins"]) == len(truth)
    gda = m["pooled"]["heads"]["gda"]
    assert np.asarray(gda["confusion_matrix"]).sum() == len(truth) and gda["accuracy"] > 0.5  # chance 0.25


def test_the_page_has_a_section_and_three_figures_per_head_and_every_image_exists(run):
    root, *_ = run
    out = root / "out"
    page, metrics = check_page(out)  # every reference exists, every number equals metrics.json
    assert page.imgs[0] == "few_shot.png"
    for h in HEADS:
        assert [i for i in page.imgs if f"/{h}/" in i] == [f"plots/pooled/heads/{h}/{s}.png"
                                                          for s in ("confusion_matrix", "per_class", "reliability")]
        assert f"{h} at 4 shots per class, test predictions pooled over seeds 1, 2, 3" in "".join(page.text)
    assert len(page.imgs) == 1 + 3 * len(HEADS)
    keys = {tuple(n["key"]) for n in page.nums}
    assert ("pooled", "heads", "gda", "confusion_matrix") not in keys  # drawn, not tabled
    assert ("pooled", "heads", "linear", "calibration", "ece") in keys
    assert ("calibration_table", "gda", "2", "nll", "mean") in keys
    from PIL import Image

    for img in page.imgs:
        with Image.open(out / img) as im:
            assert im.format == "PNG" and min(im.size) > 200


def test_without_plots_the_page_still_has_the_numbers_and_no_image(tmp_path):
    planted_store(tmp_path / "s.h5")
    run_few_shot(tmp_path / "s.h5", tmp_path / "o", heads=["gda"], shots="2", seeds=[1, 2])  # CLIP_HEADS_PLOTS=0
    page = parse(tmp_path / "o" / "index.html")
    assert page.imgs == [] and not (tmp_path / "o" / "plots").exists()
    assert "Figures were not drawn" in "".join(page.text)
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["pooled"]["heads"]["gda"]["calibration"]["n_samples"] == 2 * m["n_test"]
