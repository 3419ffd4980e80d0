"""Heads on planted synthetic 'embeddings': they learn what is learnable, and behave as estimators."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score

from clip_heads import __version__
from clip_heads.heads import (HEADS, ContrastiveHead, Head, LinearHead, TipAdapterHead, ZeroShotHead,
                              class_prompt_vectors, get_head, list_heads, tip_adapter)
from clip_heads.heads.contrastive import class_clip_loss, multi_positive_clip_loss
from conftest import make_blobs

N_CLASSES, DIM, N_TRAIN = 4, 16, 600
TEXT_HEADS = {"zero-shot", "contrastive", "tip-adapter", "zs-lp", "clap", "lpp", "gda", "prolip"}


@pytest.fixture(scope="module")
def data():
    """Four isotropic Gaussian classes with equal-norm means, and prompt vectors planted near them.

    With equal priors, equal covariances and equal-norm means, the Bayes classifier is
    ``argmax_c x . mean_c``; its accuracy on the test rows is the ceiling every head is held to.
    """
    X, y, means = make_blobs(n_per_class=400, n_classes=N_CLASSES, dim=DIM, sep=2.0, seed=0)
    rng = np.random.default_rng(1)
    prompts = means / np.linalg.norm(means, axis=1, keepdims=True) + 0.05 * rng.normal(size=means.shape)
    Xte, yte = X[N_TRAIN:], y[N_TRAIN:]
    bayes = float((np.argmax(Xte @ means.T, axis=1) == yte).mean())
    return dict(Xtr=X[:N_TRAIN], ytr=y[:N_TRAIN], Xte=Xte, yte=yte, means=means, prompts=prompts, bayes=bayes)


def make_head(name, data, **kw):
    if name in TEXT_HEADS:
        kw.setdefault("prompt_embeds", data["prompts"])
    if name == "prolip":  # the identity projection: its pre-projection features are the vectors themselves
        kw.setdefault("projection", np.eye(DIM, dtype=np.float32))
    return get_head(name)(**kw)


def test_registry_lists_every_head_and_refuses_unknown_names():
    assert list_heads() == ["zero-shot", "linear", "mlp", "contrastive", "tip-adapter", "zs-lp", "clap", "lpp", "gda",
                            "prolip"]
    assert all(HEADS[n].name == n for n in list_heads())
    with pytest.raises(ValueError, match="unknown head 'svm'.*linear"):
        get_head("svm")


@pytest.mark.parametrize("name", list_heads())
def test_head_reaches_near_bayes_accuracy_on_held_out_data(name, data):
    assert 0.8 < data["bayes"] < 0.9  # hard enough that the ceiling means something
    head = make_head(name, data).fit(data["Xtr"], data["ytr"])
    acc = head.score(data["Xte"], data["yte"])
    assert acc >= data["bayes"] - 0.05, f"{name}: {acc:.3f} vs Bayes {data['bayes']:.3f}"
    assert acc > 1 / N_CLASSES + 0.5
    proba = head.predict_proba(data["Xte"])
    assert proba.shape == (len(data["Xte"]), N_CLASSES)
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(head.predict(data["Xte"]), head.classes_[proba.argmax(1)])


@pytest.mark.parametrize("C", [0.05, 1.0])
def test_linear_matches_sklearn_logistic_regression_at_the_same_C(C, data):
    ours = LinearHead(C=C, normalize=False).fit(data["Xtr"], data["ytr"])
    ref = LogisticRegression(C=C, max_iter=2000, tol=1e-8).fit(data["Xtr"], data["ytr"])
    assert abs(ours.score(data["Xte"], data["yte"]) - ref.score(data["Xte"], data["yte"])) <= 0.005
    np.testing.assert_allclose(ours.predict_proba(data["Xte"]), ref.predict_proba(data["Xte"]), atol=2e-3)
    assert ours.C_ == C and ours.val_scores_ == {}


def test_linear_chooses_C_on_a_validation_split(data):
    Cs = [1e-3, 1e-1, 10.0]
    head = LinearHead(Cs=Cs).fit(data["Xtr"], data["ytr"])
    assert sorted(head.val_scores_) == Cs
    # C_ is read from the peak, between the best one's neighbours.
    best = max(head.val_scores_, key=head.val_scores_.get)
    assert Cs[max(0, Cs.index(best) - 1)] <= head.C_ <= Cs[min(len(Cs) - 1, Cs.index(best) + 1)]
    # Heavy regularisation of unit vectors leaves little signal; the search must see that.
    assert head.val_scores_[1e-3] < head.val_scores_[best]


def test_coarse_then_fine_C_search_chooses_the_full_grids_C_on_unimodal_curves():
    from clip_heads.heads.linear import search_grid

    rng = np.random.default_rng(0)
    for trial in range(500):
        m = int(rng.integers(1, 16))
        peak = int(rng.integers(0, m))
        # Rising to a peak (or a flat top of random width), then falling; scores in 1/100ths so that ties happen.
        top = int(rng.integers(0, 3))
        up = np.sort(rng.integers(0, 60, size=peak))
        down = np.sort(rng.integers(0, 60, size=max(0, m - peak - 1 - top)))[::-1]
        curve = np.concatenate([up, [60] * (1 + top), down])[:m] / 100.0
        grid = np.logspace(-3, 3, m)
        calls = []
        C, scores = search_grid(grid, lambda c, g=list(grid), v=curve, k=calls: (k.append(c), v[g.index(c)])[1])
        full = grid[int(np.argmax(curve))]  # the first maximum: the smallest C among ties
        assert C == full, (trial, curve.tolist(), C, full)
        assert len(calls) == len(set(calls)) and scores == {c: curve[list(grid).index(c)] for c in calls}
        if m >= 9 and peak <= 2 and top == 0:  # an early peak: the coarse pass stops well short of the grid's end
            assert len(calls) < m
    # Not unimodal, a second higher peak beyond the patience: the search stops before it (the price).
    curve = [0.5, 0.6, 0.55, 0.5, 0.45, 0.4, 0.35, 0.3, 0.9]
    assert search_grid(range(1, 10), lambda c: curve[int(c) - 1])[0] == 2


def test_linear_fit_in_blocks_is_the_whole_batch_fit(data, monkeypatch):
    from clip_heads.heads import linear

    X, y = torch.from_numpy(data["Xtr"]), torch.from_numpy(data["ytr"]).long()
    order = torch.from_numpy(np.random.default_rng(0).permutation(len(X)))
    unit = linear.working_copy(X, order, normalize=True, block=7)  # built 7 rows at a time
    torch.testing.assert_close(unit, torch.nn.functional.normalize(X[order], dim=1), rtol=0, atol=0)
    assert linear.working_copy(X, None, normalize=False) is X  # nothing to change: no copy
    whole = linear.fit_logistic(unit, y[order], N_CLASSES, 0.1, tol=1e-6)
    monkeypatch.setattr(linear, "FIT_BLOCK", 64)  # the loss summed over 10 blocks
    blocked = linear.fit_logistic(unit, y[order], N_CLASSES, 0.1, tol=1e-6)
    assert whole[3] and blocked[3]
    torch.testing.assert_close(blocked[0], whole[0], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(blocked[1], whole[1], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", list_heads())
def test_save_load_round_trip_gives_identical_predictions(name, data, tmp_path):
    names = np.array(["anger", "awe", "fear", "joy"])  # string labels must survive the trip
    y = names[data["ytr"]]
    kw = {"prompt_embeds": {n: data["prompts"][i] for i, n in enumerate(names)}} if name in TEXT_HEADS else {}
    head = make_head(name, data, **kw).fit(data["Xtr"], y).set_backbone("org/clip-b32", "abc123", DIM)
    head.save_pretrained(tmp_path / "h")
    assert sorted(p.name for p in (tmp_path / "h").iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "h" / "config.json").read_text())
    assert config["head"] == name and config["classes"] == names.tolist()
    assert config["backbone"] == {"model_id": "org/clip-b32", "model_hash": "abc123", "dim": DIM}
    assert config["clip_heads_version"] == __version__

    loaded = Head.from_pretrained(tmp_path / "h")
    assert type(loaded) is type(head) and loaded.get_params().keys() == head.get_params().keys()
    np.testing.assert_array_equal(loaded.predict_proba(data["Xte"]), head.predict_proba(data["Xte"]))
    np.testing.assert_array_equal(loaded.predict(data["Xte"]), head.predict(data["Xte"]))
    loaded.check_backbone("org/clip-b32", "abc123", DIM)


def test_from_pretrained_refuses_a_missing_dir_and_the_wrong_head_class(data, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a saved head"):
        Head.from_pretrained(tmp_path / "nothing")
    LinearHead(C=1.0).fit(data["Xtr"], data["ytr"]).save_pretrained(tmp_path / "lin")
    with pytest.raises(ValueError, match="holds a 'linear' head, not 'mlp'"):
        get_head("mlp").from_pretrained(tmp_path / "lin")


def test_check_backbone_compares_id_hash_and_dim_and_refuses_what_it_cannot_verify(data):
    head = LinearHead(C=1.0).fit(data["Xtr"], data["ytr"])
    with pytest.raises(ValueError, match="cannot verify: the head records no backbone"):
        head.check_backbone("org/clip-b32", "abc123", DIM)
    with pytest.raises(ValueError, match="cannot record the backbone: .* no model hash.*; re-encode"):
        head.set_backbone("org/clip-b32", "", DIM)
    head.set_backbone("org/clip-b32", "abc123", DIM)
    head.check_backbone("org/clip-b32", "abc123", DIM)
    # A store without a hash cannot be matched: it used to be accepted whatever its weights were.
    for missing in (None, ""):
        with pytest.raises(ValueError, match=r"^cannot verify: the store \(model org/clip-b32\) has no model hash; "
                                             r"re-encode with this clip-heads"):
            head.check_backbone("org/clip-b32", missing, DIM)
    with pytest.raises(ValueError, match=r"model_id, dim disagree: head was trained on model org/clip-b32 "
                                         r"\(hash abc123, dim 16\) but the store has model org/clip-l14"):
        head.check_backbone("org/clip-l14", "abc123", 768)
    with pytest.raises(ValueError, match="^model_hash disagree"):
        head.check_backbone("org/clip-b32", "fff000", DIM)
    # An old head saved with `model_hash: null` is refused with the same reason.
    head.backbone_ = {"model_id": "org/clip-b32", "model_hash": None, "dim": DIM}
    with pytest.raises(ValueError, match=r"cannot verify: the head \(trained on model org/clip-b32\) has no model hash"):
        head.check_backbone("org/clip-b32", "abc123", DIM)


@pytest.mark.parametrize("name", list_heads())
def test_clone_and_cross_val_score_work(name, data):
    head = make_head(name, data, random_state=3)
    twin = clone(head)
    assert twin is not head and twin.get_params()["random_state"] == 3 and not hasattr(twin, "classes_")
    scores = cross_val_score(twin, data["Xtr"], data["ytr"], cv=3)
    assert scores.mean() >= data["bayes"] - 0.08


def test_two_classes_follow_sklearn_binary_conventions(data):
    keep = data["ytr"] < 2
    X, y = data["Xtr"][keep], data["ytr"][keep]
    head = LinearHead(C=1.0).fit(X, y)
    margin = head.decision_function(X)
    assert margin.shape == (len(X),)  # logit of classes_[1] minus that of classes_[0]
    np.testing.assert_array_equal(head.predict(X), head.classes_[(margin > 0).astype(int)])
    assert cross_val_score(LinearHead(C=1.0), X, y, cv=3, scoring="roc_auc").mean() > 0.9


@pytest.mark.parametrize("name", list_heads())
def test_predict_before_fit_raises_not_fitted(name, data):
    head = make_head(name, data).set_backbone("org/clip-b32", "abc123", DIM)  # provenance is not a fit
    with pytest.raises(NotFittedError):
        head.predict(data["Xte"])
    with pytest.raises(NotFittedError):
        head.save_pretrained("/nonexistent")


@pytest.mark.parametrize("name", list_heads())
def test_same_seed_same_predictions(name, data):
    first = make_head(name, data, random_state=5).fit(data["Xtr"], data["ytr"]).predict_proba(data["Xte"])
    again = make_head(name, data, random_state=5).fit(data["Xtr"], data["ytr"]).predict_proba(data["Xte"])
    np.testing.assert_array_equal(first, again)
    if name in ("mlp", "contrastive"):  # and the seed is what decides: another one differs
        other = make_head(name, data, random_state=6).fit(data["Xtr"], data["ytr"]).predict_proba(data["Xte"])
        assert not np.array_equal(first, other)


@pytest.mark.parametrize("name", list_heads())
def test_bad_input_is_refused_with_a_message(name, data):
    head = make_head(name, data)
    if name != "zero-shot":  # zero-shot takes its classes from the prompts, not from y
        with pytest.raises(ValueError, match="at least 2 classes"):
            head.fit(data["Xtr"][:10], np.zeros(10, int))
    bad = data["Xtr"].copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        head.fit(bad, data["ytr"])
    head.fit(data["Xtr"], data["ytr"])
    with pytest.raises(ValueError, match="has 8 features"):
        head.predict(data["Xte"][:, :8])


def test_class_prompt_vectors_ensembles_templates_and_keeps_class_order():
    rng = np.random.default_rng(0)
    templates = {"cat": rng.normal(size=(3, 5)), "dog": rng.normal(size=(2, 5)) * 10}
    out = class_prompt_vectors(templates, ["dog", "cat"])
    unit = {k: v / np.linalg.norm(v, axis=1, keepdims=True) for k, v in templates.items()}
    expect = np.stack([unit["dog"].mean(0), unit["cat"].mean(0)])
    np.testing.assert_allclose(out, expect / np.linalg.norm(expect, axis=1, keepdims=True), rtol=1e-5)
    # The same ensemble from a (n_classes, n_templates, dim) array; labels may be looked up by str().
    np.testing.assert_allclose(class_prompt_vectors(np.stack([templates["cat"][:2], templates["dog"]]), [0, 1])[1],
                               out[0], rtol=1e-5)
    assert class_prompt_vectors({"0": templates["cat"]}, [0]).shape == (1, 5)
    with pytest.raises(ValueError, match=r"no prompts for classes \['bird'\]"):
        class_prompt_vectors(templates, ["cat", "bird"])
    with pytest.raises(ValueError, match="n_classes=3"):
        class_prompt_vectors(rng.normal(size=(2, 5)), ["a", "b", "c"])


def test_zero_shot_fits_from_prompts_alone_and_follows_the_given_class_order(data):
    order = ["c3", "c1", "c0", "c2"]  # rows of the prompt array follow this, not sorted order
    rows = data["prompts"][[3, 1, 0, 2]]
    head = ZeroShotHead(prompt_embeds=rows, classes=order).fit()
    assert head.classes_.tolist() == ["c0", "c1", "c2", "c3"]
    names = np.array(["c0", "c1", "c2", "c3"])
    assert head.score(data["Xte"], names[data["yte"]]) >= data["bayes"] - 0.05
    # The temperature changes confidence, never the decision.
    cooler = ZeroShotHead(prompt_embeds=rows, classes=order, logit_scale=10.0).fit()
    np.testing.assert_array_equal(cooler.predict(data["Xte"]), head.predict(data["Xte"]))
    assert cooler.predict_proba(data["Xte"]).max(1).mean() < head.predict_proba(data["Xte"]).max(1).mean()
    with pytest.raises(ValueError, match="needs prompt_embeds"):
        ZeroShotHead().fit(data["Xtr"], data["ytr"])
    with pytest.raises(ValueError, match="labels outside classes"):
        ZeroShotHead(prompt_embeds=rows, classes=order).fit(None, ["c0", "dog"])


def test_multi_positive_loss_treats_same_class_columns_alike():
    F = torch.nn.functional
    # Two different texts per class (say two templates): which same-class image sits in which
    # column must not matter, since any image of the class is a right answer for either text.
    labels = torch.tensor([0, 0, 1, 1])
    gen = torch.Generator().manual_seed(0)
    text, image = torch.randn(4, 8, generator=gen), torch.randn(4, 8, generator=gen)
    swapped = image[[1, 0, 3, 2]]
    loss = multi_positive_clip_loss(image, text, labels, 0.1)
    assert multi_positive_clip_loss(swapped, text, labels, 0.1).item() == pytest.approx(loss.item(), rel=1e-6)

    def diagonal(img):
        logits = F.normalize(text) @ F.normalize(img).T / 0.1
        return 0.5 * (F.cross_entropy(logits, torch.arange(4)) + F.cross_entropy(logits.T, torch.arange(4)))

    assert abs(diagonal(swapped).item() - diagonal(image).item()) > 1e-2
    # Without duplicate labels it is the ordinary symmetric CLIP loss.
    distinct = multi_positive_clip_loss(image, text, torch.arange(4), 0.1)
    assert distinct.item() == pytest.approx(diagonal(image).item(), rel=1e-6)
    # One text per class, aligned images: the minimum, the entropy of the targets.
    labels = torch.tensor([0, 0, 0, 1, 1])
    onehot = torch.eye(2)[labels]
    assert multi_positive_clip_loss(onehot, onehot, labels, 0.01).item() == pytest.approx(
        (3 * np.log(3) + 2 * np.log(2)) / 5, abs=1e-6)


@pytest.mark.parametrize("n_classes, batch", [(8, 512), (3, 5), (100, 64), (2, 1)])
def test_class_clip_loss_is_the_pairwise_loss_of_one_text_per_class(n_classes, batch):
    # The contrastive head trains with the per-class form; it must be the pairwise loss, value and
    # gradient, also when some classes are absent from the batch (100 classes, 64 samples).
    gen = torch.Generator().manual_seed(n_classes)
    image = torch.randn(batch, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    text = torch.randn(n_classes, 16, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, n_classes, (batch,), generator=gen)
    ours = class_clip_loss(image, text, labels, 0.075)
    (g_ours,) = torch.autograd.grad(ours, image)
    pairwise = multi_positive_clip_loss(image, text[labels], labels, 0.075)  # float32 targets inside
    (g_pairwise,) = torch.autograd.grad(pairwise, image)
    assert ours.item() == pytest.approx(pairwise.item(), rel=1e-6)
    torch.testing.assert_close(g_ours, g_pairwise, rtol=1e-5, atol=1e-7)


def test_contrastive_head_classifies_over_a_new_label_set():
    # The text space is a random rotation of the image space into more dimensions, so the head
    # must learn the map. Two new classes sit between seen ones, as related labels do
    # ("contentment" between "joy" and "awe"); their prompts are never seen in training.
    dim, text_dim, sep, n = 16, 24, 3.0, 300
    X, y, means = make_blobs(n_per_class=n, n_classes=4, dim=dim, sep=sep, seed=2)
    rng = np.random.default_rng(3)
    rotation = np.linalg.qr(rng.normal(size=(text_dim, text_dim)))[0][:, :dim]  # (text_dim, dim), orthonormal
    unit = means / sep
    new_means = np.stack([unit[0] + unit[1], unit[2] + unit[3]])
    new_means /= np.linalg.norm(new_means, axis=1, keepdims=True)
    to_text = lambda v: v @ rotation.T + 0.05 * rng.normal(size=(len(v), text_dim))  # noqa: E731
    seen_prompts, new_prompts = to_text(unit), to_text(new_means)
    X_new = np.concatenate([rng.normal(size=(n, dim)) + sep * m for m in new_means]).astype(np.float32)
    y_new = np.repeat(["mix01", "mix23"], n)
    names = np.array(list("abcd"))
    Xte, yte = X[800:], names[y[800:]]

    head = ContrastiveHead(prompt_embeds=dict(zip("abcd", seen_prompts, strict=True))).fit(X[:800], names[y[:800]])
    assert head.class_embeds_.shape == (4, text_dim)
    bayes = (np.argmax(Xte @ means.T, axis=1) == y[800:]).mean()
    assert head.score(Xte, yte) >= bayes - 0.05

    only_new = head.with_prompts(new_prompts, ["mix01", "mix23"])
    assert only_new.classes_.tolist() == ["mix01", "mix23"]
    assert only_new.score(X_new, y_new) > 0.9  # chance 1/2
    # A label set mixing seen classes with a new one that is not made of them.
    for seen, new in (("cd", 0), ("ab", 1)):
        mixed = head.with_prompts({**{c: seen_prompts["abcd".index(c)] for c in seen},
                                   y_new[new * n]: new_prompts[new]})
        is_new = y_new == y_new[new * n]
        assert mixed.score(X_new[is_new], y_new[is_new]) > 0.7  # chance 1/3
        is_seen = np.isin(yte, list(seen))
        assert mixed.score(Xte[is_seen], yte[is_seen]) > 0.8
    assert head.classes_.tolist() == list("abcd")  # the trained head itself is untouched
    with pytest.raises(ValueError, match="dim 16, the head projects to 24"):
        head.with_prompts(unit, ["a", "b", "c", "d"])


def test_tip_adapter_alpha_zero_is_zero_shot_and_blocks_change_nothing(data, monkeypatch):
    kw = dict(prompt_embeds=data["prompts"])
    plain = TipAdapterHead(alpha=0.0, beta=5.5, **kw).fit(data["Xtr"], data["ytr"])
    assert plain.search_scores_ is None and plain.alpha_ == 0.0
    zero_shot = ZeroShotHead(**kw).fit(data["Xtr"], data["ytr"])
    # Tip-Adapter scores in float32 (the zero-shot head in float64): logits of scale 100 agree to 1e-4.
    np.testing.assert_allclose(plain.decision_function(data["Xte"]), zero_shot.decision_function(data["Xte"]),
                               rtol=1e-6, atol=1e-4)
    searched = TipAdapterHead(**kw).fit(data["Xtr"], data["ytr"])
    assert np.shape(searched.search_scores_) == (len(tip_adapter.DEFAULT_ALPHAS), len(tip_adapter.DEFAULT_BETAS))
    whole = searched.decision_function(data["Xte"])
    # The reference formula, unchunked, in float64.
    X = torch.nn.functional.normalize(torch.from_numpy(data["Xte"]).double(), dim=1)
    keys, labels = searched.keys_.double(), searched.cache_labels_
    cache = torch.exp(-searched.beta_ * (1 - X @ keys.T)) @ torch.nn.functional.one_hot(labels).double()
    ref = 100 * X @ torch.nn.functional.normalize(searched.class_embeds_.double(), dim=1).T + searched.alpha_ * cache
    np.testing.assert_allclose(whole, ref.numpy(), rtol=1e-5, atol=1e-3)
    monkeypatch.setattr(tip_adapter, "BLOCK_ELEMENTS", 1000)  # ~1 row per block in the search
    monkeypatch.setattr(tip_adapter, "KEY_BLOCK", 7)  # and at predict, a few keys per chunk
    monkeypatch.setattr(tip_adapter, "QUERY_BLOCK", 3)
    np.testing.assert_allclose(searched.decision_function(data["Xte"]), whole, rtol=1e-5, atol=1e-4)
    again = TipAdapterHead(**kw).fit(data["Xtr"], data["ytr"])
    assert (again.alpha_, again.beta_) == (searched.alpha_, searched.beta_)


def test_tip_adapter_scores_a_row_the_same_alone_or_among_others(data):
    """Predict runs in float32 in fixed-shape blocks: a row's scores may not depend on its neighbours."""
    head = TipAdapterHead(prompt_embeds=data["prompts"]).fit(data["Xtr"], data["ytr"])
    X = np.concatenate([data["Xte"]] * 3)[:700]  # more than two query blocks, the last one partial
    whole = head.decision_function(X)
    order = np.random.default_rng(0).permutation(len(X))
    np.testing.assert_array_equal(head.decision_function(X[order]), whole[order])
    for i in (0, 5, 255, 256, 699):
        np.testing.assert_array_equal(head.decision_function(X[i:i + 1]), whole[i:i + 1])
    np.testing.assert_array_equal(head.decision_function(X[250:520]), whole[250:520])
    np.testing.assert_array_equal(head.predict_proba(X[::7]), head.predict_proba(X)[::7])


def test_tip_adapter_f_trains_the_keys(data):
    head = TipAdapterHead(prompt_embeds=data["prompts"], finetune_keys=True, epochs=5)
    head.fit(data["Xtr"], data["ytr"])
    unit = data["Xtr"] / np.linalg.norm(data["Xtr"], axis=1, keepdims=True)
    assert not np.allclose(head.keys_.numpy(), unit, atol=1e-4)
    assert 1 <= head.best_epoch_ <= 5
    assert head.score(data["Xte"], data["yte"]) >= data["bayes"] - 0.05


def test_validation_split_with_tiny_classes():
    from sklearn.model_selection import train_test_split

    from clip_heads.heads.base import validation_split

    y = np.repeat(np.arange(4), 10)
    tr, va = validation_split(y, 0.2, seed=3)  # the ordinary case is scikit-learn's split
    ref_tr, ref_va = train_test_split(np.arange(40), test_size=8, stratify=y, random_state=3)
    np.testing.assert_array_equal(va, np.sort(ref_va))
    # Singletons stay in training; other classes give round(fraction * n), clipped to [1, n - 1].
    y = np.array([0, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3])
    tr, va = validation_split(y, 0.2, seed=0)
    assert np.bincount(y[va], minlength=4).tolist() == [0, 1, 1, 2]
    assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == len(y)
    with pytest.raises(ValueError, match="one sample a class"):
        validation_split(np.arange(5), 0.2, seed=0)


def test_heads_fit_when_some_classes_have_one_sample():
    X, y, _ = make_blobs(n_per_class=6, n_classes=5, seed=2)
    keep = np.ones(len(y), bool)
    keep[np.flatnonzero(y == 4)[1:]] = False  # class 4 keeps a single sample
    for name in ("linear", "mlp"):
        head = get_head(name)(random_state=0).fit(X[keep], y[keep])
        assert list(head.classes_) == [0, 1, 2, 3, 4]
        assert head.score(X[keep], y[keep]) > 0.8
