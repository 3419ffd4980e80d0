import csv
import json

import numpy as np
import pytest
from scipy.stats import entropy
from sklearn import metrics as skm

from clip_heads.metrics import (
    classification_report,
    confusion_matrices,
    metrics_from_confusion,
    soft_label_report,
    summarize_folds,
)
from clip_heads.tables import format_table, read_confusion_csv, write_report

CLASSES = ["amusement", "anger", "awe", "contentment", "disgust"]


def _random_preds(n=300, C=5, seed=0, acc=0.6):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, n)
    p = np.where(rng.random(n) < acc, y, rng.integers(0, C, n))
    return y, p


def test_report_equals_sklearn():
    y, p = _random_preds()
    rng = np.random.default_rng(1)
    score = rng.random((len(y), 5)) + np.eye(5)[p]
    r = classification_report(y, p, CLASSES, y_score=score)
    assert r["accuracy"] == pytest.approx(skm.accuracy_score(y, p), abs=1e-15)
    assert r["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, p), abs=1e-15)
    for avg in ("macro", "weighted"):
        P, R, F, _ = skm.precision_recall_fscore_support(y, p, average=avg, zero_division=0)
        assert (r[avg]["precision"], r[avg]["recall"], r[avg]["f1"]) == pytest.approx((P, R, F), abs=1e-15)
    P, R, F, S = skm.precision_recall_fscore_support(y, p, zero_division=0)
    for i, c in enumerate(CLASSES):
        pc = r["per_class"][c]
        assert (pc["precision"], pc["recall"], pc["f1"], pc["support"]) == pytest.approx((P[i], R[i], F[i], S[i]))
    np.testing.assert_array_equal(r["confusion_matrix"], skm.confusion_matrix(y, p))
    assert r["top_k_accuracy"]["2"] == pytest.approx(skm.top_k_accuracy_score(y, score, k=2))
    assert r["top_k_accuracy"]["3"] == pytest.approx(skm.top_k_accuracy_score(y, score, k=3))
    assert r["n_samples"] == 300 and r["classes"] == CLASSES


def test_hand_computed_tiny_case():
    # Confusion [[1,1,0],[0,2,0],[1,0,0]]: a P=R=F=1/2; b P=2/3 R=1 F=0.8; c never predicted -> 0.
    r = classification_report([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], ["a", "b", "c"])
    assert r["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert r["per_class"]["b"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    assert r["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert r["accuracy"] == pytest.approx(0.6)
    assert r["balanced_accuracy"] == pytest.approx(0.5)
    assert r["macro"] == pytest.approx({"precision": (0.5 + 2 / 3) / 3, "recall": 0.5, "f1": 1.3 / 3})
    assert r["weighted"] == pytest.approx({"precision": (1 + 4 / 3) / 5, "recall": 0.6, "f1": 2.6 / 5})


def test_absent_class_keeps_its_row_but_not_the_macro_average():
    # Class "d" neither occurs nor is predicted: a zero row, support 0, left out of the macro mean.
    y, p = [0, 1, 2, 2], [0, 1, 2, 1]
    r = classification_report(y, p, ["a", "b", "c", "d"])
    assert np.array(r["confusion_matrix"]).shape == (4, 4) and r["per_class"]["d"]["support"] == 0
    assert r["macro"]["f1"] == pytest.approx(skm.f1_score(y, p, average="macro"))
    with pytest.raises(ValueError, match=r"labels \[7\] are out of range"):
        classification_report([0, 7], [0, 1], ["a", "b"])


def test_metrics_from_confusion_equal_sklearn_to_1e12():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 6, 500)
    y[y == 5] = 4  # class 5 never occurs in the truth ...
    preds = np.stack([np.where(rng.random(500) < a, y, rng.integers(0, 6, 500)) for a in (0.1, 0.5, 0.9)], 1)
    preds[:, 2][preds[:, 2] == 3] = 0  # ... and class 3 is never predicted by the last one
    m = metrics_from_confusion(confusion_matrices(y, preds, 6))
    for j in range(preds.shape[1]):
        p = preds[:, j]
        assert abs(m["accuracy"][j] - skm.accuracy_score(y, p)) < 1e-12
        for avg in ("macro", "weighted"):
            P, R, F, _ = skm.precision_recall_fscore_support(y, p, average=avg, zero_division=0)
            assert abs(m[f"{avg}_f1"][j] - F) < 1e-12
            assert abs(m[f"{avg}_precision"][j] - P) < 1e-12
            assert abs(m[f"{avg}_recall"][j] - R) < 1e-12
        r = classification_report(y, p, [str(i) for i in range(6)])
        assert abs(m["macro_f1"][j] - r["macro"]["f1"]) < 1e-12


def test_soft_labels_identical_is_zero_and_matches_scipy():
    rng = np.random.default_rng(0)
    P = rng.dirichlet(np.ones(4), 50)
    same = soft_label_report(P, P)
    assert same["kl"] == 0.0 and same["top1_agreement"] == 1.0 and same["top2_agreement"] == 1.0
    Q = rng.dirichlet(np.ones(4), 50)
    eps = 1e-6
    ref = np.mean([entropy(p + eps, q + eps) for p, q in zip(P, Q, strict=True)])  # scipy renormalises both
    got = soft_label_report(P, Q, eps=eps)
    assert got["kl"] == pytest.approx(ref, rel=1e-10)
    assert got["top1_agreement"] == pytest.approx(np.mean(P.argmax(1) == Q.argmax(1)))


def test_soft_labels_align_columns_by_name_and_renormalise():
    true_cols = ["anger", "disgust", "fear", "joy", "sadness", "surprise", "neutral"]
    P_true = np.array([[0.1, 0.0, 0.0, 0.4, 0.0, 0.0, 0.5],   # joy is the top shared class
                       [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0],   # only neutral: cannot be compared
                       [0.3, 0.0, 0.3, 0.0, 0.2, 0.2, 0.0]])  # tie between anger and fear
    pred_cols = ["joy", "anger", "fear"]  # a head over three classes, in its own order
    P_pred = np.array([[0.8, 0.1, 0.1], [0.3, 0.3, 0.4], [0.1, 0.2, 0.7]])
    r = soft_label_report(P_true, P_pred, true_cols, pred_cols, k=2, eps=1e-6)
    assert r["columns"] == ["joy", "anger", "fear"] and r["n_samples"] == 2 and r["n_dropped"] == 1
    t = np.array([[0.4, 0.1, 0.0], [0.0, 0.3, 0.3]])
    t = (t + 1e-6) / (t + 1e-6).sum(1, keepdims=True)
    q = (P_pred[[0, 2]] + 1e-6) / (P_pred[[0, 2]] + 1e-6).sum(1, keepdims=True)
    assert r["kl"] == pytest.approx(np.mean([(a * np.log(a / b)).sum() for a, b in zip(t, q, strict=True)]), rel=1e-12)
    assert r["top1_agreement"] == 1.0  # row 1 predicts joy (true top); row 3 predicts fear (tied top)
    with pytest.raises(ValueError, match="share fewer than 2 names"):
        soft_label_report(P_true, P_pred[:, :1], true_cols, ["calm"])


def test_topk_agreement_counts_ties():
    P_true = np.array([[0.5, 0.3, 0.2, 0.0], [0.4, 0.2, 0.2, 0.2]])
    P_pred = np.array([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    r = soft_label_report(P_true, P_pred, k=2)
    # row 1: predicted class has 0.2 < second-best 0.3 -> miss; row 2: 0.2 ties the second-best -> hit
    assert r["top1_agreement"] == 0.0 and r["top2_agreement"] == 0.5


def test_table_layout_and_digits():
    r = classification_report([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], ["Amusement", "Anger", "Awe"])
    text = format_table(r, "Table 2")
    lines = text.splitlines()
    assert lines[0] == "Table 2" and lines[1].split() == ["Precision", "Recall", "F1-Score", "Support"]
    assert [ln.split()[0] for ln in lines[2:5]] == ["Amusement", "Anger", "Awe"]
    assert lines[3].split() == ["Anger", "0.67", "1.00", "0.80", "2"]
    labels = [ln.strip() for ln in lines if ln.strip().startswith(("Macro", "Weighted", "Accuracy"))]
    assert [lab.split("  ")[0] for lab in labels] == ["Macro Avg.", "Weighted Avg.", "Accuracy"]
    assert labels[-1].split() == ["Accuracy", "0.60", "5"]
    assert "0.6667" in format_table(r, digits=4)


def test_cv_summary_and_mean_std_table():
    folds = [classification_report(*_random_preds(60, 3, s), ["a", "b", "c"]) for s in range(4)]
    s = summarize_folds(folds)
    accs = [f["accuracy"] for f in folds]
    assert s["mean"]["accuracy"] == pytest.approx(np.mean(accs)) and s["std"]["accuracy"] == pytest.approx(np.std(accs))
    assert s["mean"]["per_class"]["b"]["f1"] == pytest.approx(np.mean([f["per_class"]["b"]["f1"] for f in folds]))
    assert s["mean"]["per_class"]["a"]["support"] == sum(f["per_class"]["a"]["support"] for f in folds)
    acc_line = [ln for ln in format_table(s, "CV").splitlines() if ln.strip().startswith("Accuracy")][0]
    assert f"{np.mean(accs):.2f} ± {np.std(accs):.2f}" in acc_line


def test_write_report_files_read_back(tmp_path):
    y, p = _random_preds(100, 3)
    r = classification_report(y, p, ["a", "b", "c"])
    write_report(r, tmp_path, title="T")
    assert json.loads((tmp_path / "metrics.json").read_text()) == r
    rows = list(csv.DictReader(open(tmp_path / "per_class.csv")))
    assert [row["class"] for row in rows] == ["a", "b", "c"]
    assert float(rows[1]["f1"]) == pytest.approx(r["per_class"]["b"]["f1"], abs=1e-15)
    assert int(rows[2]["support"]) == r["per_class"]["c"]["support"]
    classes, cm = read_confusion_csv(tmp_path / "confusion_matrix.csv")
    assert classes == ["a", "b", "c"] and cm.tolist() == r["confusion_matrix"]
    assert (tmp_path / "report.txt").read_text() == format_table(r, "T")
    # A CV summary: mean/std columns and the pooled confusion matrix.
    s = summarize_folds([r, r], pooled=classification_report(np.r_[y, y], np.r_[p, p], ["a", "b", "c"]))
    write_report(s, tmp_path / "cv")
    rows = list(csv.DictReader(open(tmp_path / "cv" / "per_class.csv")))
    assert float(rows[0]["f1_std"]) == 0.0 and float(rows[0]["f1_mean"]) == pytest.approx(r["per_class"]["a"]["f1"])
    assert read_confusion_csv(tmp_path / "cv" / "confusion_matrix.csv")[1].sum() == 200


def test_cv_per_class_means_only_over_folds_where_defined(tmp_path):
    # Class c is in fold 1's truth, absent and never predicted in fold 2, absent but (wrongly)
    # predicted once in fold 3. Class d never occurs and is never predicted.
    names = ["a", "b", "c", "d"]
    folds = [([0, 0, 1, 2], [0, 1, 1, 2]), ([0, 1, 1], [0, 1, 0]), ([0, 1], [2, 1])]
    reports = [classification_report(y, p, names) for y, p in folds]
    pooled = classification_report(sum((y for y, _ in folds), []), sum((p for _, p in folds), []), names)
    s = summarize_folds(reports, pooled)
    c = s["mean"]["per_class"]["c"]
    # precision: folds 1 (1.0) and 3 (0.0); recall: fold 1 only; F1 (2TP / (support + predicted)): folds 1 and 3.
    assert c["precision"] == pytest.approx(0.5) and c["recall"] == 1.0 and c["f1"] == pytest.approx(0.5)
    assert c["n_folds"] == {"precision": 2, "recall": 1, "f1": 2}
    assert s["std"]["per_class"]["c"]["recall"] == 0.0 and s["std"]["per_class"]["c"]["precision"] == pytest.approx(0.5)
    # Counting undefined folds as 0 (scikit-learn's zero_division=0) would have given recall 1/3.
    assert np.mean([r["per_class"]["c"]["recall"] for r in reports]) == pytest.approx(1 / 3)
    # a is never predicted in fold 3: its precision is the mean of folds 1 (1/1) and 2 (1/2) only.
    a = s["mean"]["per_class"]["a"]
    assert a["precision"] == pytest.approx(0.75) and a["n_folds"] == {"precision": 2, "recall": 3, "f1": 3}
    assert a["recall"] == pytest.approx(np.mean([0.5, 1.0, 0.0]))
    # b is defined in every fold: a plain mean over the three.
    for m in ("precision", "recall", "f1"):
        assert s["mean"]["per_class"]["b"][m] == pytest.approx(np.mean([r["per_class"]["b"][m] for r in reports]))
    d = s["mean"]["per_class"]["d"]
    assert (d["precision"], d["recall"], d["f1"], d["n_folds"]["recall"]) == (None, None, None, 0)
    assert [f["fold"] for f in s["folds"]] == [1, 2, 3]
    # Macro/weighted/accuracy stay per-fold means over all folds.
    assert s["mean"]["accuracy"] == pytest.approx(np.mean([r["accuracy"] for r in reports]))

    text = format_table(s, "CV")
    mean_part = text.split("Pooled out-of-fold")[0]
    rows = {ln.split()[0]: ln for ln in mean_part.splitlines() if ln.strip()[:2] in ("a ", "b ", "c ", "d ")}
    assert "1.00 ± 0.00*" in rows["c"] and rows["d"].split()[1:4] == ["–", "–", "–"]
    assert "Mean ± std over the 3 folds" in text and "Pooled out-of-fold: the 9 held-out predictions" in text
    pooled_part = text.split("Pooled out-of-fold")[1]
    assert f"{pooled['per_class']['c']['precision']:.2f}" in [w for ln in pooled_part.splitlines() if ln.strip().startswith("c ")
                                                               for w in ln.split()]
    write_report(s, tmp_path)
    table = {r["class"]: r for r in csv.DictReader(open(tmp_path / "per_class.csv"))}
    assert table["c"]["recall_folds"] == "1" and float(table["c"]["recall_mean"]) == 1.0
    assert float(table["c"]["precision_pooled"]) == pytest.approx(pooled["per_class"]["c"]["precision"])
    assert table["d"]["recall_mean"] == "" and table["d"]["recall_folds"] == "0"
