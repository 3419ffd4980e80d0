import csv
import json

import numpy as np
import pytest
from conftest import make_blobs
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression

from clip_heads.ablation import ablate_prompts
from clip_heads.crossval import cross_validate, read_folds, stratified_folds
from clip_heads.evaluate import evaluate_head, run_zero_shot, train_head
from clip_heads.label_maps import align_labels, list_label_maps, load_label_map
from clip_heads.metrics import read_confusion_csv
from clip_heads.store import PromptSet, write_store

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
    alone = run_zero_shot(path, templates="0")
    assert alone.metrics["accuracy"] > 0.9 and alone.metrics["info"]["templates"] == ["a photo of {}."]
    assert run_zero_shot(path, templates=["a bad {} template"]).metrics["accuracy"] < 0.1
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
    assert "a bad {} template" in abl.text.splitlines()[-1]


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
    with pytest.raises(ValueError, match="has no template '7'.*0: a photo of"):
        run_zero_shot(tmp_path / "t.h5", templates="7")
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
