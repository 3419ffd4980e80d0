import csv
import json

import numpy as np
import pytest
from conftest import make_blobs
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression

from clip_heads.ablation import ablate_prompts
from clip_heads.crossval import cross_validate, read_folds, stratified_folds
from clip_heads.errors import BadValueError
from clip_heads.evaluate import evaluate_head, run_zero_shot, train_head
from clip_heads.label_maps import align_labels, list_label_maps, load_label_map
from clip_heads.tables import read_confusion_csv
from clip_heads.store import PromptSet
from clip_heads.writer import write_store

ABCD = ["a", "b", "c", "d"]


def planted_prompts(vectors, classes, name="default", bad=True, seed=0):
    """Two templates at the class means (+ noise) and, optionally, one pointing at the wrong class."""
    rng = np.random.default_rng(seed)
    C = len(classes)
    templates = ["a photo of {}.", "{}, again."] + (["a bad {} template"] if bad else [])
    embeds, texts, tid, cid = [], [], [], []
    for t, tpl in enumerate(templates):
        for c, cls in enumerate(classes):
            v = vectors[(c + 1) % C] if t == 2 else vectors[c] + 0.05 * rng.normal(size=vectors.shape[1])
            embeds.append(v), texts.append(tpl.format(cls)), tid.append(t), cid.append(c)
    return PromptSet(name, list(classes), templates, texts, np.array(embeds, np.float32), np.array(tid), np.array(cid))


def blob_store(path, classes=ABCD, seed=0, n=40, sep=6.0, model_id="m", prompts=True, extras=None, **kw):
    X, y, means = make_blobs(n_per_class=n, n_classes=len(classes), dim=16, sep=sep, seed=seed)
    ps = [planted_prompts(means, classes)] if prompts else []
    write_store(path, X, y, classes, keys=[f"img{i:04d}.png" for i in range(len(y))], model_id=model_id,
                prompt_sets=ps, extras=extras, **kw)
    return path, X, y, means


# ---------------------------------------------------------------------------------------- folds and CV
def test_folds_are_stratified_disjoint_covering_and_seeded():
    y = np.repeat(np.arange(4), [50, 23, 7, 31])
    np.random.default_rng(0).shuffle(y)
    folds = stratified_folds(y, k=5, seed=0)
    assert folds.shape == y.shape and set(folds.tolist()) == set(range(5))
    # Each sample is in exactly one test fold; the test folds cover all samples.
    test_sets = [set(np.flatnonzero(folds == f)) for f in range(5)]
    assert sum(map(len, test_sets)) == len(y) and set().union(*test_sets) == set(range(len(y)))
    for f in range(5):
        for c, n_c in enumerate(np.bincount(y)):
            assert abs(np.sum(y[folds == f] == c) - n_c / 5) <= 1
    np.testing.assert_array_equal(folds, stratified_folds(y, 5, 0))
    assert (folds != stratified_folds(y, 5, 1)).any()
    # Folds depend on the labels' grouping only, not on their names.
    names = np.array(["zz", "aa", "mm", "bb"])[y]
    np.testing.assert_array_equal(folds, stratified_folds(names, 5, 0))
    with pytest.raises(ValueError, match="k must be between 2"):
        stratified_folds(y, 1)


class Spy(ClassifierMixin, BaseEstimator):
    """Records the rows (column 0 holds the row id) it was fitted on."""

    fitted: list = []

    def fit(self, X, y):
        self.rows_ = X[:, 0].astype(int)
        Spy.fitted.append(self.rows_)
        self.model_ = LogisticRegression().fit(X[:, 1:], y)
        self.classes_ = self.model_.classes_
        return self

    def predict(self, X):
        return self.model_.predict(X[:, 1:])


def test_cv_never_fits_on_the_test_fold():
    X, y, _ = make_blobs(n_per_class=20, n_classes=3, dim=4)
    X = np.c_[np.arange(len(y)), X]
    Spy.fitted = []
    res = cross_validate(Spy(), X, y, k=5, seed=0)  # an estimator: cloned per fold
    made = []
    res2 = cross_validate(lambda: made.append(Spy()) or made[-1], X, y, k=5, seed=0)  # a factory
    assert len(made) == 5 and len(Spy.fitted) == 10
    for r, fitted in ((res, Spy.fitted[:5]), (res2, [s.rows_ for s in made])):
        for f, rows in enumerate(fitted):
            assert not set(rows) & set(np.flatnonzero(r.folds == f))
            assert set(rows) == set(np.flatnonzero(r.folds != f))


def test_cv_on_separable_blobs():
    X, y, _ = make_blobs(n_per_class=30, n_classes=4, dim=16, sep=3.0)
    res = cross_validate(LogisticRegression(max_iter=200), X, y, k=10, seed=0, classes=[0, 1, 2, 3])
    assert res.k == 10 and len(res.fold_reports) == 10
    assert res.report["mean"]["accuracy"] > 0.9
    assert res.report["mean"]["accuracy"] == pytest.approx(np.mean([r["accuracy"] for r in res.fold_reports]))
    assert np.sum(res.report["pooled"]["confusion_matrix"]) == len(y)
    assert res.report["pooled"]["accuracy"] == pytest.approx(np.mean(res.y_pred == y))
    np.testing.assert_allclose(res.y_score.sum(1), 1.0, atol=1e-6)


# ---------------------------------------------------------------------------------------- zero-shot and ablation
def test_zero_shot_planted_prompts_and_bad_template_ranks_last(tmp_path):
    path, X, y, means = blob_store(tmp_path / "s.h5")
    rep = run_zero_shot(path, out_dir=tmp_path / "zs")
    assert rep.metrics["accuracy"] > 0.9
    alone = run_zero_shot(path, template_ids="0")
    assert alone.metrics["accuracy"] > 0.9 and alone.metrics["info"]["templates"] == ["a photo of {}."]
    assert run_zero_shot(path, template_ids=["a bad {} template"]).metrics["accuracy"] < 0.1
    # The deprecated keyword templates= is gone (it names template sets elsewhere): an error, not a silent default.
    with pytest.raises(TypeError, match="templates"):
        run_zero_shot(path, templates="0")
    abl = ablate_prompts(path, out_dir=tmp_path / "abl")
    rows = abl.rows
    assert abl.summary()["rank"] == 1 and abl.summary()["accuracy"] == max(r["accuracy"] for r in rows)
    assert len(rows) == 4 and rows[-1]["template"] == "a bad {} template" and rows[-1]["rank"] == 4
    # The fast path agrees with the plain zero-shot report and with sklearn.
    ens = next(r for r in rows if r["template_id"] is None)
    assert ens["accuracy"] == pytest.approx(rep.metrics["accuracy"], abs=1e-12)
    assert ens["macro_f1"] == pytest.approx(rep.metrics["macro"]["f1"], abs=1e-12)
    assert ens["weighted_f1"] == pytest.approx(rep.metrics["weighted"]["f1"], abs=1e-12)
    one = next(r for r in rows if r["template_id"] == 0)
    assert one["macro_f1"] == pytest.approx(alone.metrics["macro"]["f1"], abs=1e-12)
    table = list(csv.DictReader(open(tmp_path / "abl" / "ablation.csv")))
    assert [int(r["rank"]) for r in table] == [1, 2, 3, 4] and table[-1]["template"] == "a bad {} template"
    assert "a bad {} template" in next(line for line in abl.text.splitlines() if line.startswith("   4  "))


def test_zero_shot_matches_prompts_by_name(tmp_path):
    X, y, means = make_blobs(n_per_class=30, n_classes=3, dim=16, sep=6.0)
    # The prompt set lists its classes in another order, plus one the store does not have.
    extra = np.r_[means[[2, 0, 1]], np.ones((1, 16))]
    ps = planted_prompts(extra, ["C", "A", "B", "other"], bad=False)
    write_store(tmp_path / "s.h5", X, y, ["a", "b", "c"], prompt_sets=[ps])
    rep = run_zero_shot(tmp_path / "s.h5")
    assert rep.metrics["accuracy"] > 0.9 and rep.metrics["classes"] == ["a", "b", "c"]
    ps2 = planted_prompts(means[:2], ["a", "b"], name="two", bad=False)
    write_store(tmp_path / "t.h5", X, y, ["a", "b", "c"], prompt_sets=[ps2])
    with pytest.raises(ValueError, match=r"no prompt for store classes \['c'\]"):
        run_zero_shot(tmp_path / "t.h5")
    with pytest.raises(BadValueError, match="has no template '7'.*0: a photo of"):  # a bad value: exit 2
        run_zero_shot(tmp_path / "t.h5", template_ids="7")
    # Prompts of another label set, met through a label map: classes a, b -> "low"; c -> "high".
    write_store(tmp_path / "u.h5", X, (y == 2).astype(int), ["low", "high"], prompt_sets=[ps])
    lm = {"from": {"A": "low", "B": "low", "C": "high", "other": "low"}}
    rep = run_zero_shot(tmp_path / "u.h5", label_map=lm)
    assert rep.metrics["classes"] == ["low", "high"] and rep.metrics["alignment"]["mode"] == "common"
    assert rep.summary()["accuracy"] == rep.metrics["accuracy"] > 0.9


def test_zero_shot_report_files(tmp_path):
    path, X, y, _ = blob_store(tmp_path / "s.h5")
    rep = run_zero_shot(path, out_dir=tmp_path / "zs")
    out = tmp_path / "zs"
    assert json.loads((out / "metrics.json").read_text())["accuracy"] == rep.metrics["accuracy"]
    assert (out / "report.txt").read_text() == rep.text and "Macro Avg." in rep.text
    classes, cm = read_confusion_csv(out / "confusion_matrix.csv")
    assert classes == ABCD and cm.sum() == len(y)
    preds = list(csv.DictReader(open(out / "predictions.csv")))
    assert len(preds) == len(y) and preds[0]["key"] == "img0000.png"
    assert np.mean([p["label"] == p["prediction"] for p in preds]) == pytest.approx(rep.metrics["accuracy"])
    assert [r["class"] for r in csv.DictReader(open(out / "per_class.csv"))] == ABCD


# ---------------------------------------------------------------------------------------- label maps
def test_builtin_label_maps():
    assert {"fi_to_emotion6", "to_sentiment", "webemo25_to_webemo7"} <= set(list_label_maps())
    fi = ["amusement", "anger", "awe", "contentment", "disgust", "excitement", "fear", "sadness"]
    e6 = ["anger", "disgust", "fear", "joy", "sadness", "surprise"]
    a = align_labels(e6, fi, "fi_to_emotion6")  # Emotion6 head on FI: FI labels become Emotion6's
    assert a.mode == "labels" and [a.classes[i] for i in a.truth] == ["joy", "anger", "joy", "joy", "disgust", "joy", "fear", "sadness"]
    b = align_labels(fi, e6 + ["neutral"], "to_sentiment")  # FI head on Emotion6, both to polarity
    assert b.mode == "common" and b.classes == ["negative", "positive"] and b.dropped == ["neutral"]
    assert [b.classes[i] for i in b.truth[:6]] == ["negative"] * 3 + ["positive", "negative", "positive"]
    w = load_label_map("webemo25_to_webemo7").mapping
    assert w["contentment"] == "joy" and w["disgust"] == "anger" and len(w) == 25
    assert load_label_map("to_sentiment").mapping["confusion"] == "negative"
    with pytest.raises(ValueError, match="neither a built-in"):
        load_label_map("nope")


def test_cross_dataset_with_label_map_drops_and_errors(tmp_path):
    A, XA, yA, means = blob_store(tmp_path / "a.h5")
    # Store B: the same four blobs under other names, plus a class that maps to nothing.
    rng = np.random.default_rng(1)
    yB = np.repeat(np.arange(4), 40)
    XB = np.r_[means[yB] + rng.normal(size=(160, 16)), rng.normal(size=(10, 16))]
    yB = np.r_[yB, np.full(10, 4)]
    write_store(tmp_path / "b.h5", XB, yB, ["W", "x", "y", "z", "junk"], model_id="m")
    lm = {"from": {"w": "a", "x": "b", "y": "c", "z": "d", "junk": None}}
    rep = train_head("linear", A, tmp_path / "head", eval_store=tmp_path / "b.h5", label_map=lm, head_params={"C": 1.0})
    ev = rep.metrics["eval"]
    assert ev["accuracy"] > 0.9 and ev["n_samples"] == 160 and ev["classes"] == ABCD
    assert ev["alignment"]["n_dropped"] == 10 and ev["alignment"]["dropped_classes"] == ["junk"]
    assert (tmp_path / "head" / "eval" / "report.txt").is_file() and (tmp_path / "head" / "model.safetensors").is_file()
    bad = {"from": {"w": "a", "x": "b", "junk": None}}
    with pytest.raises(ValueError, match=r"does not map store b.h5 classes \['y', 'z'\] onto the head 'head' classes \['a', 'b', 'c', 'd'\]"):
        evaluate_head(tmp_path / "head", tmp_path / "b.h5", label_map=bad)
    with pytest.raises(ValueError, match="pass a label map"):
        evaluate_head(tmp_path / "head", tmp_path / "b.h5")
    # Common mode: the head's four classes and the store's polarity meet in {neg, pos}.
    write_store(tmp_path / "p.h5", XB[:160], (yB[:160] >= 2).astype(int), ["pos", "neg"], model_id="m")
    pol = evaluate_head(tmp_path / "head", tmp_path / "p.h5", label_map={"from": {"a": "pos", "b": "pos", "c": "neg", "d": "neg"}})
    assert pol.metrics["classes"] == ["pos", "neg"] and pol.metrics["accuracy"] > 0.9


def test_native_cross_dataset_for_text_heads_and_model_check(tmp_path):
    A, XA, yA, means = blob_store(tmp_path / "a.h5")
    # B: other blobs, other class names, its own prompts (same model): no label map needed.
    blob_store(tmp_path / "b.h5", classes=["w", "x", "y"], seed=5)
    rep = train_head("zero-shot", A, tmp_path / "zs", eval_store=tmp_path / "b.h5")
    ev = rep.metrics["eval"]
    assert ev["classes"] == ["w", "x", "y"] and ev["accuracy"] > 0.9 and ev["alignment"]["mode"] == "native"
    assert "via its prompt set 'default'" in rep.text
    blob_store(tmp_path / "other.h5", classes=["w", "x", "y"], seed=5, model_id="openai/other-clip")
    with pytest.raises(ValueError, match="trained on model m .*store has model openai/other-clip"):
        train_head("zero-shot", A, tmp_path / "zs2", eval_store=tmp_path / "other.h5")
    with pytest.raises(ValueError, match="model m .*openai/other-clip"):
        evaluate_head(tmp_path / "zs", tmp_path / "other.h5")
    # The same store again through the saved head: direct, and identical to run_zero_shot.
    again = evaluate_head(tmp_path / "zs", A)
    assert again.metrics["accuracy"] == pytest.approx(run_zero_shot(A).metrics["accuracy"])


# ---------------------------------------------------------------------------------------- train / evaluate
def test_train_head_cv_saves_folds_head_and_reports(tmp_path):
    path, X, y, _ = blob_store(tmp_path / "s.h5", n=25, sep=3.0)
    rep = train_head("linear", path, tmp_path / "out", cv=5, seed=3, head_params={"C": 1.0})
    out = tmp_path / "out"
    assert rep.cv is not None and rep.metrics["cv"]["mean"]["accuracy"] > 0.9
    assert rep.summary()["cv"]["accuracy"] == rep.metrics["cv"]["mean"]["accuracy"] and "accuracy_std" in rep.summary()["cv"]
    np.testing.assert_array_equal(read_folds(out / "cv" / "folds.csv"), stratified_folds(y, 5, 3))
    keys = [f"img{i:04d}.png" for i in range(len(y))][::-1]
    np.testing.assert_array_equal(read_folds(out / "cv" / "folds.csv", keys), stratified_folds(y, 5, 3)[::-1])
    cvm = json.loads((out / "cv" / "metrics.json").read_text())
    assert cvm["k"] == 5 and len(cvm["folds"]) == 5 and cvm["seed"] == 3
    assert "±" in (out / "cv" / "report.txt").read_text() and (out / "report.txt").read_text() == rep.text
    oof = list(csv.DictReader(open(out / "cv" / "predictions.csv")))
    assert np.mean([r["label"] == r["prediction"] for r in oof]) == pytest.approx(cvm["pooled"]["accuracy"])
    config = json.loads((out / "config.json").read_text())
    assert config["classes"] == ABCD and config["backbone"]["model_id"] == "m"
    ev = evaluate_head(out, path, out_dir=tmp_path / "ev")
    assert ev.metrics["accuracy"] > 0.9 and (tmp_path / "ev" / "metrics.json").is_file()


def test_evaluate_reports_soft_labels(tmp_path):
    X, y, means = make_blobs(n_per_class=30, n_classes=3, dim=16, sep=6.0)
    # Distribution columns in their own order (joy, anger, neutral, fear); store classes anger, joy, fear.
    dist = np.full((len(y), 4), 0.05)
    dist[np.arange(len(y)), np.array([1, 0, 3])[y]] = 0.6
    dist[:, 2] = 0.25  # a "neutral" column the head has no class for
    ps = planted_prompts(means, ["anger", "joy", "fear"], bad=False)
    write_store(tmp_path / "e6.h5", X, y, ["anger", "joy", "fear"], prompt_sets=[ps], model_id="m",
                extras={"emotion_distribution": dist}, extras_columns={"emotion_distribution": ["joy", "anger", "neutral", "fear"]})
    rep = run_zero_shot(tmp_path / "e6.h5")
    soft = rep.metrics["soft_labels"]
    assert soft["columns"] == ["anger", "joy", "fear"] and soft["n_samples"] == len(y)
    # Aligned by name, an image's true top class is its own class, so top-1 agreement = accuracy.
    assert soft["top1_agreement"] == pytest.approx(rep.metrics["accuracy"]) and soft["top1_agreement"] > 0.9
    assert "top-1 agreement" in rep.text


def test_folds_when_every_class_is_smaller_than_k():
    # 30 classes of 1-9 samples: scikit-learn's StratifiedKFold refuses k=10 outright.
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(30), rng.integers(1, 10, 30))
    folds = stratified_folds(y, k=10, seed=0)
    assert set(folds) == set(range(10))
    sizes = np.bincount(folds, minlength=10)
    assert sizes.max() - sizes.min() <= 1  # balanced folds
    for c in range(30):  # stratified: no class has two samples in one fold before every fold has one
        per_fold = np.bincount(folds[y == c], minlength=10)
        assert per_fold.max() <= 1
    np.testing.assert_array_equal(folds, stratified_folds(y, k=10, seed=0))
    assert not np.array_equal(folds, stratified_folds(y, k=10, seed=1))


# ---------------------------------------------------------------------------------------- issue 8: results that mean what they say
HASH = "sha256:" + "ab" * 32  # a recorded model identity (a real encode records the weights' hash)


def test_cv_class_absent_from_some_folds_against_pooled_reference():
    # Class "rare" has 3 samples: with k=5 it is missing from the test part of 2 folds. The blobs
    # are far apart, so every fold predicts every present sample right: the per-class means must
    # equal the pooled (out-of-fold) figures, 1.0, instead of 3/5 (folds without the class as 0).
    X, y, _ = make_blobs(n_per_class=40, n_classes=3, dim=8, sep=12.0, seed=2)
    keep = np.r_[np.flatnonzero(y != 2), np.flatnonzero(y == 2)[:3]]
    X, y = X[keep], np.array(["a", "b", "rare"])[y[keep]]
    res = cross_validate(LogisticRegression(max_iter=500), X, y, k=5, seed=0, classes=["a", "b", "rare"])
    mean, pooled = res.report["mean"]["per_class"]["rare"], res.report["pooled"]["per_class"]["rare"]
    present = [f for f in range(5) if (y[res.folds == f] == "rare").any()]
    assert len(present) == 3 and pooled["recall"] == 1.0 and pooled["f1"] == 1.0
    assert mean["recall"] == pooled["recall"] and mean["f1"] == pooled["f1"] and mean["precision"] == pooled["precision"]
    assert mean["n_folds"] == {"precision": 3, "recall": 3, "f1": 3}
    # A reference computed per fold with scikit-learn, averaged over the folds holding each class.
    from sklearn.metrics import recall_score

    for c, name in enumerate(["a", "b", "rare"]):
        folds = [f for f in range(5) if (res.y_true[res.folds == f] == c).any()]
        ref = np.mean([recall_score(res.y_true[res.folds == f], res.y_pred[res.folds == f], labels=[c], average="macro")
                       for f in folds])
        assert res.report["mean"]["per_class"][name]["recall"] == pytest.approx(ref, abs=1e-12)
    # The pooled report has top-k from the out-of-fold probabilities.
    assert res.report["pooled"]["top_k_accuracy"]["2"] == 1.0


def _merging_store(path):
    """A 3-class store (A, B, C) with vote distributions, and prompts over five classes where
    a1, a2, a3 all mean A. Some images sit just nearer b than any single a-prompt, but the
    three a-prompts together carry more probability: head argmax B, summed decision A."""
    rng = np.random.default_rng(0)
    E = np.eye(8)
    rows, labels, dist = [], [], []
    for kind in ["ambiguous"] * 12 + ["a"] * 10 + ["b"] * 10 + ["c"] * 10:
        if kind == "ambiguous":
            v, lab, votes = np.r_[0.49, 0.49, 0.49, 0.50, 0, 0.02 * rng.random(3)], 0, [0.6, 0.3, 0.1]
        elif kind == "a":
            v, lab, votes = E[0] + 0.3 * E[1], 0, [0.8, 0.1, 0.1]
        else:
            i = {"b": 3, "c": 4}[kind]
            v, lab, votes = E[i] + 0.05 * rng.random(8), {"b": 1, "c": 2}[kind], [0.1, 0.1, 0.8] if kind == "c" else [0.2, 0.7, 0.1]
        rows.append(v), labels.append(lab), dist.append(votes)
    ps = PromptSet("five", ["a1", "a2", "a3", "b", "c"], ["{}"], ["a1", "a2", "a3", "b", "c"],
                   E[:5].astype(np.float32), np.zeros(5, int), np.arange(5))
    write_store(path, np.array(rows), np.array(labels), ["A", "B", "C"], keys=[f"k{i:03d}" for i in range(len(rows))],
                model_id="m", model_hash=HASH, prompt_sets=[ps], extras={"emotion_distribution": np.array(dist)},
                extras_columns={"emotion_distribution": ["A", "B", "C"]})
    return path, np.array(dist), np.array(labels)


def test_merged_label_map_every_metric_from_one_decision_rule(tmp_path):
    path, dist, labels = _merging_store(tmp_path / "s.h5")
    lm = {"from": {"a1": "A", "a2": "A", "a3": "A", "b": "B", "c": "C"}, "to": ["A", "B", "C"]}
    rep = run_zero_shot(path, label_map=lm, out_dir=tmp_path / "zs")
    m = rep.metrics
    assert m["decision_rule"]["rule"] == "summed-probability" and m["decision_rule"]["merged"] == {"A": ["a1", "a2", "a3"]}
    assert "Decision rule" in rep.text and "A = a1 + a2 + a3" in rep.text
    preds = list(csv.DictReader(open(tmp_path / "zs" / "predictions.csv")))
    pred = np.array([p["prediction"] for p in preds])
    # The ambiguous images: the single nearest prompt is b, the summed decision A.
    assert (pred[:12] == "A").all()
    # Accuracy and the soft-label agreement both follow from the run's own predictions.
    col = {"A": 0, "B": 1, "C": 2}
    assert m["accuracy"] == pytest.approx(np.mean(pred == np.array(["A", "B", "C"])[labels]))
    got = dist[np.arange(len(pred)), [col[p] for p in pred]]
    assert m["soft_labels"]["top1_agreement"] == pytest.approx(np.mean(got >= dist.max(1) - 1e-12))
    top2 = -np.sort(-dist, 1)[:, 1]
    assert m["soft_labels"]["top2_agreement"] == pytest.approx(np.mean(got >= top2 - 1e-12))
    # Top-1 of the ranking used for top-k is the prediction: top-k starts at the accuracy.
    assert m["top_k_accuracy"]["2"] >= m["accuracy"]
    # The confusion matrix is that of predictions.csv.
    cm = np.zeros((3, 3), int)
    for p in preds:
        cm[col[p["label"]], col[p["prediction"]]] += 1
    assert cm.tolist() == m["confusion_matrix"]


def _e6_like(path, seed=0, n=30, keys_prefix="img"):
    X, y, means = make_blobs(n_per_class=n, n_classes=3, dim=16, sep=2.0, seed=seed)
    rng = np.random.default_rng(seed)
    dist = rng.dirichlet(np.ones(4), len(y))
    dist[np.arange(len(y)), np.array([1, 0, 3])[y]] += 1.0  # votes lean to the image's class
    dist /= dist.sum(1, keepdims=True)
    ps = planted_prompts(means, ["anger", "joy", "fear"], bad=False)
    write_store(path, X, y, ["anger", "joy", "fear"], keys=[f"{keys_prefix}{i:04d}" for i in range(len(y))],
                prompt_sets=[ps], model_id="m", model_hash=HASH, extras={"emotion_distribution": dist},
                extras_columns={"emotion_distribution": ["joy", "anger", "neutral", "fear"]})
    return path, X, y, dist


def test_cv_on_soft_labels_reports_out_of_fold_soft_metrics(tmp_path):
    path, X, y, dist = _e6_like(tmp_path / "e6.h5")
    rep = train_head("linear", path, tmp_path / "h", cv=3, seed=0, head_params={"C": 1.0})
    soft = rep.metrics["cv"]["soft_labels"]
    assert soft["computed"] == "out of fold" and soft["columns"] == ["anger", "joy", "fear"]
    # By hand: the same folds and head, each image's probabilities from the fold that did not see it.
    from clip_heads.heads import get_head

    names = np.array(["anger", "joy", "fear"])[y]
    folds = stratified_folds(names, 3, 0)
    P = np.zeros((len(y), 3))
    for f in range(3):
        h = get_head("linear")(C=1.0, random_state=0).fit(X[folds != f], names[folds != f])
        P[np.ix_(folds == f, [["anger", "joy", "fear"].index(c) for c in h.classes_])] = h.predict_proba(X[folds == f])
    t = dist[:, [1, 0, 3]]  # the distribution's anger, joy, fear columns
    eps = 1e-6
    tp, q = (t + eps) / (t + eps).sum(1, keepdims=True), (P + eps) / (P + eps).sum(1, keepdims=True)
    t = t / t.sum(1, keepdims=True)
    assert soft["kl"] == pytest.approx(np.mean((tp * np.log(tp / q)).sum(1)), rel=1e-9)
    assert soft["top1_agreement"] == pytest.approx(np.mean(t[np.arange(len(y)), P.argmax(1)] >= t.max(1) - 1e-12))
    assert soft["n_samples"] == len(y)
    report = (tmp_path / "h" / "cv" / "report.txt").read_text()
    assert "Out of fold" in report and "mean KL(true || predicted)" in report


def test_store_fingerprint_is_content_based(tmp_path):
    from clip_heads.results import store_fingerprint

    X, y, _ = make_blobs(n_per_class=10, n_classes=3, dim=8)
    keys = [f"k{i}" for i in range(len(y))]
    common = dict(keys=keys, model_id="m", model_hash=HASH)
    write_store(tmp_path / "a.h5", X, y, ["a", "b", "c"], **common)
    write_store(tmp_path / "copy" / "b.h5", X, y, ["a", "b", "c"], dtype="float16", **common)  # same data, re-encoded
    fa = store_fingerprint(tmp_path / "a.h5")
    assert len(fa) == 64 and store_fingerprint(tmp_path / "copy" / "b.h5") == fa
    y2 = y.copy()
    y2[0] = (y2[0] + 1) % 3
    variants = {"label": dict(y=y2), "key": dict(keys=["x"] + keys[1:]), "model": dict(model_hash="sha256:" + "cd" * 32),
                "classes": dict(classes=["a", "b", "z"])}
    for name, change in variants.items():
        kw = dict(common, **{k: v for k, v in change.items() if k in common})
        write_store(tmp_path / f"{name}.h5", X, change.get("y", y), change.get("classes", ["a", "b", "c"]), **kw)
        assert store_fingerprint(tmp_path / f"{name}.h5") != fa, name


def test_evaluate_on_the_training_data_is_labelled_resubstitution(tmp_path, caplog):
    import logging

    A, XA, yA, _ = blob_store(tmp_path / "a.h5", model_hash=HASH)
    blob_store(tmp_path / "again" / "a.h5", model_hash=HASH)  # the same data encoded again elsewhere
    blob_store(tmp_path / "b.h5", seed=7, model_hash=HASH)  # other images of the same classes
    train_head("linear", A, tmp_path / "head", head_params={"C": 1.0})
    config = json.loads((tmp_path / "head" / "config.json").read_text())
    assert config["training_data"]["store"] == str(A) and len(config["training_data"]["fingerprint"]) == 64
    for store, expected in ((A, True), (tmp_path / "again" / "a.h5", True), (tmp_path / "b.h5", False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="clip_heads.evaluate"):
            rep = evaluate_head(tmp_path / "head", store)
        assert rep.metrics["info"]["resubstitution"] is expected, store
        assert ("(resubstitution" in rep.text) is expected and ("resubstitution" in caplog.text) is expected
        assert rep.metrics["info"]["trained_on"] == str(A)
    # train-head's eval store holding its own training data is labelled too.
    rep = train_head("linear", A, tmp_path / "h2", eval_store=tmp_path / "again" / "a.h5", head_params={"C": 1.0})
    assert rep.metrics["eval"]["info"]["resubstitution"] is True and "(resubstitution: the same data" in rep.text


LAYOUT = {"report.txt", "metrics.json", "per_class.csv", "confusion_matrix.csv", "predictions.csv"}


def test_every_evaluation_writes_one_layout_and_refuses_to_replace_another_run(tmp_path):
    A, X, y, _ = blob_store(tmp_path / "a.h5", model_hash=HASH)
    zs = run_zero_shot(A, out_dir=tmp_path / "zs")
    abl = ablate_prompts(A, out_dir=tmp_path / "abl")
    tr = train_head("linear", A, tmp_path / "head", cv=3, head_params={"C": 1.0})
    ev = evaluate_head(tmp_path / "head", A, out_dir=tmp_path / "ev")
    for folder in ("zs", "abl", "head/cv", "ev"):
        assert LAYOUT <= {p.name for p in (tmp_path / folder).iterdir()}, folder
    assert {"report.txt", "metrics.json", "config.json", "model.safetensors", "cv"} <= {p.name for p in (tmp_path / "head").iterdir()}
    # The ablation's per-class files are those of its rank-1 prompt, scored in full.
    top = abl.rows[0]
    best = run_zero_shot(A, template_ids=None if top["template_id"] is None else [top["template_id"]])
    assert json.loads((tmp_path / "abl" / "metrics.json").read_text())["rank1"]["accuracy"] == best.metrics["accuracy"] == top["accuracy"]
    assert read_confusion_csv(tmp_path / "abl" / "confusion_matrix.csv")[1].tolist() == best.metrics["confusion_matrix"]
    # Each records what was run and on which data.
    for rep in (zs, ev):
        assert rep.metrics["info"]["data"]["n_images"] == len(y) and rep.metrics["info"]["run"]["store"].endswith("a.h5")
    assert tr.metrics["info"]["data"]["fingerprint"] == ev.metrics["info"]["data"]["fingerprint"]
    # Folds are numbered 1..k wherever a user reads them.
    oof = list(csv.DictReader(open(tmp_path / "head" / "cv" / "predictions.csv")))
    assert sorted({int(r["fold"]) for r in oof}) == [1, 2, 3]
    assert [f["fold"] for f in tr.metrics["cv"]["folds"]] == [1, 2, 3]
    with open(tmp_path / "head" / "cv" / "folds.csv") as f:  # ids, documented as 0-based, in their own column
        assert sorted({int(r["fold_id"]) for r in csv.DictReader(f)}) == [0, 1, 2]
    np.testing.assert_array_equal(read_folds(tmp_path / "head" / "cv" / "folds.csv"), tr.cv.folds)
    # Another evaluation into the same folder is refused, the first results intact; the same one reruns.
    lm = {"from": {"a": "a", "b": "b", "c": "c", "d": "d"}}
    before = (tmp_path / "ev" / "metrics.json").read_text()
    with pytest.raises(FileExistsError, match="holds the results of another run"):
        evaluate_head(tmp_path / "head", A, out_dir=tmp_path / "ev", label_map=lm)
    assert (tmp_path / "ev" / "metrics.json").read_text() == before
    evaluate_head(tmp_path / "head", A, out_dir=tmp_path / "ev")
    evaluate_head(tmp_path / "head", A, out_dir=tmp_path / "ev", label_map=lm, overwrite=True)
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["info"]["run"]["label_map"] == "<dict>"
    with pytest.raises(FileExistsError, match="holds the results of another run"):
        run_zero_shot(A, template_ids="0", out_dir=tmp_path / "zs")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="files that are not results"):
        run_zero_shot(A, out_dir=tmp_path / "mine")
    # Retraining into a head folder replaces the previous run's sections, keeps a user's files.
    (tmp_path / "head" / "notes.txt").write_text("keep me")
    train_head("linear", A, tmp_path / "head", head_params={"C": 1.0})
    names = {p.name for p in (tmp_path / "head").iterdir()}
    assert "train" in names and "cv" not in names and (tmp_path / "head" / "notes.txt").read_text() == "keep me"


def test_read_folds_reads_files_of_either_column_name(tmp_path):
    (tmp_path / "old.csv").write_text("key,label,fold\nx,a,0\ny,b,1\nz,a,1\n")
    np.testing.assert_array_equal(read_folds(tmp_path / "old.csv", ["z", "x"]), [1, 0])
    (tmp_path / "new.csv").write_text("key,label,fold_id\nx,a,0\ny,b,1\nz,a,1\n")
    np.testing.assert_array_equal(read_folds(tmp_path / "new.csv", ["z", "x"]), [1, 0])
    (tmp_path / "bad.csv").write_text("key,label\nx,a\n")
    with pytest.raises(ValueError, match="not a folds file"):
        read_folds(tmp_path / "bad.csv")
