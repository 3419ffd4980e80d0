"""The few-shot heads (zs-lp, clap, lpp, gda, prolip) against their papers' formulas and the Bayes rate."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.base import clone

from clip_heads.heads import (CLAPHead, GDAHead, Head, LinearHead, LPPHead, MLPHead, ProLIPHead, TipAdapterHead,
                              ZeroShotHead, ZSLPHead)
from clip_heads.heads.gda import gda_classifier
from clip_heads.heads.lpp import lipschitz_steps

K, D = 4, 16


def unit(a):
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def planted():
    """Four Gaussian classes around unit directions; prompts near the directions (informative
    but noisy). The Bayes classifier of isotropic classes with equal-norm means is argmax x . mu."""
    rng = np.random.default_rng(0)
    dirs = unit(rng.normal(size=(K, D)))
    means = 0.6 * dirs
    n = 1200
    y = rng.integers(0, K, size=n)
    X = (means[y] + 0.25 * rng.normal(size=(n, D))).astype(np.float32)
    good = unit(dirs + 0.3 * rng.normal(size=(K, D))).astype(np.float32)
    noisy = unit(dirs + 1.2 * rng.normal(size=(K, D))).astype(np.float32)
    tr, te = np.arange(200), np.arange(200, n)
    bayes = float((np.argmax(X[te] @ means.T, 1) == y[te]).mean())
    return dict(X=X, y=y, tr=tr, te=te, good=good, noisy=noisy, bayes=bayes)


def few(planted, shots, seed=0):
    rng = np.random.default_rng(seed)
    idx = np.concatenate([rng.choice(np.flatnonzero(planted["y"][planted["tr"]] == c), shots, replace=False)
                          for c in range(K)])
    return planted["X"][idx], planted["y"][idx]


def zero_shot(prompts):
    return ZeroShotHead(prompt_embeds=prompts).fit(None, np.arange(K))


# -- zs-lp -----------------------------------------------------------------------------------------
def test_zs_lp_at_zero_epochs_is_zero_shot_exactly(planted):
    X, y = few(planted, 4)
    Xte = planted["X"][planted["te"]]
    head = ZSLPHead(prompt_embeds=planted["good"], epochs=0).fit(X, y)
    # Equal up to float64 rounding (the prototypes are renormalised in the forward pass: 1e-7 relative).
    np.testing.assert_allclose(head.decision_function(Xte), zero_shot(planted["good"]).decision_function(Xte),
                               rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(head.predict(Xte), zero_shot(planted["good"]).predict(Xte))
    np.testing.assert_array_equal(head.prototypes_, zero_shot(planted["good"]).class_embeds_.numpy())
    assert head.n_epochs_ == 0 and head.loss_curve_ == []


def test_zs_lp_learns_past_noisy_prompts(planted):
    X, y = few(planted, 16)
    Xte, yte = planted["X"][planted["te"]], planted["y"][planted["te"]]
    zs = zero_shot(planted["noisy"]).score(Xte, yte)
    head = ZSLPHead(prompt_embeds=planted["noisy"]).fit(X, y)
    assert head.stop_reason_ == "plateau"
    # Noisy prompts score 0.29 here, a logistic regression on the 64 shots 0.80, the Bayes rule 0.89.
    assert head.score(Xte, yte) > zs + 0.3, (head.score(Xte, yte), zs)


# -- clap ------------------------------------------------------------------------------------------
def test_clap_infinite_penalty_is_zero_shot_and_zero_penalty_is_zs_lp(planted):
    X, y = few(planted, 8)
    Xte = planted["X"][planted["te"]]
    inf = CLAPHead(prompt_embeds=planted["noisy"], penalty=math.inf).fit(X, y)
    np.testing.assert_allclose(inf.decision_function(Xte), zero_shot(planted["noisy"]).decision_function(Xte),
                               rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(inf.prototypes_, zero_shot(planted["noisy"]).class_embeds_.numpy())
    np.testing.assert_array_equal(inf.predict(Xte), zero_shot(planted["noisy"]).predict(Xte))
    assert inf.multipliers_ is None
    none = CLAPHead(prompt_embeds=planted["noisy"], penalty=0.0).fit(X, y)
    zslp = ZSLPHead(prompt_embeds=planted["noisy"]).fit(X, y)
    np.testing.assert_array_equal(none.prototypes_, zslp.prototypes_)
    np.testing.assert_array_equal(none.decision_function(Xte), zslp.decision_function(Xte))
    # A finite penalty keeps the prototypes closer to the prompts than ZS-LP does.
    mid = CLAPHead(prompt_embeds=planted["noisy"], penalty=1.0).fit(X, y)
    dist = lambda h: np.linalg.norm(h.prototypes_ - planted["noisy"], axis=1).sum()  # noqa: E731
    assert dist(mid) < dist(zslp)


def test_clap_multipliers_are_the_mean_zero_shot_confidence_in_the_true_class(planted):
    X, y = few(planted, 8)
    head = CLAPHead(prompt_embeds=planted["good"], epochs=1).fit(X, y)
    logits = 100.0 * unit(X.astype(np.float64)) @ planted["good"].astype(np.float64).T
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    expected = [p[y == c, c].mean() for c in range(K)]
    np.testing.assert_allclose(head.initial_multipliers_, expected, rtol=1e-5)
    np.testing.assert_allclose(head.multipliers_, expected, rtol=1e-5)  # fixed (alm=False): the paper's CLAP


def test_clap_alm_moves_the_multipliers_by_the_phr_step(planted):
    X, y = few(planted, 8)
    head = CLAPHead(prompt_embeds=planted["noisy"], alm=True).fit(X, y)
    assert head.n_epochs_ > 1
    assert np.all(head.multipliers_ >= np.asarray(head.initial_multipliers_) - 1e-12)  # rho, h >= 0
    assert not np.allclose(head.multipliers_, head.initial_multipliers_)


# -- lpp -------------------------------------------------------------------------------------------
def test_lpp_objective_never_increases_and_beats_noisy_zero_shot(planted):
    X, y = few(planted, 16)
    Xte, yte = planted["X"][planted["te"]], planted["y"][planted["te"]]
    head = LPPHead(prompt_embeds=planted["noisy"]).fit(X, y)
    curve = np.asarray(head.objective_curve_)
    assert len(curve) == head.n_iter_ + 1 and head.n_iter_ > 10
    assert np.all(np.diff(curve) <= 1e-12), np.diff(curve).max()
    assert curve[-1] < 0.5 * curve[0]
    assert head.score(Xte, yte) > zero_shot(planted["noisy"]).score(Xte, yte) + 0.3


def test_lpp_step_sizes_are_the_inverse_curvature_bounds_of_the_data(planted):
    X, y = few(planted, 4)
    Fm = unit(X.astype(np.float64))
    G = Fm @ planted["good"].astype(np.float64).T
    step_w, step_a = lipschitz_steps(torch.from_numpy(Fm), torch.from_numpy(G))
    n = len(Fm)
    assert step_w == pytest.approx(2 * n / np.linalg.eigvalsh(Fm.T @ Fm).max(), rel=1e-10)
    np.testing.assert_allclose(step_a.numpy(), 2 * n / (G ** 2).sum(0), rtol=1e-10)
    head = LPPHead(prompt_embeds=planted["good"], max_iter=0).fit(X, y)
    # Zero iterations: the class means plus the zero-shot classifier (alpha starts at the scale).
    means = np.stack([Fm[y == c].mean(0) for c in range(K)])
    np.testing.assert_allclose(head.coef_, means, rtol=1e-5)
    np.testing.assert_allclose(head.alpha_, 100.0)
    Xte = planted["X"][planted["te"]]
    ref = unit(Xte.astype(np.float64)) @ (means + 100.0 * planted["good"]).T
    np.testing.assert_allclose(head.decision_function(Xte), ref, rtol=1e-4, atol=1e-4)


# -- gda -------------------------------------------------------------------------------------------
def test_gda_classifier_is_the_papers_formula():
    rng = np.random.default_rng(3)
    X, y = rng.normal(size=(30, 5)), np.repeat(np.arange(3), 10)
    W, b = gda_classifier(torch.from_numpy(X), torch.from_numpy(y), 3)
    mu = np.stack([X[y == c].mean(0) for c in range(3)])
    C = X - mu[y]
    S = C.T @ C / 29
    P = 5 * np.linalg.inv(29 * S + np.trace(S) * np.eye(5))
    np.testing.assert_allclose(W.numpy(), mu @ P, rtol=1e-8)
    np.testing.assert_allclose(b.numpy(), np.log(1 / 3) - 0.5 * np.einsum("kd,de,ke->k", mu, P, mu), rtol=1e-8)


def test_gda_reaches_the_bayes_rate_of_gaussians_with_a_shared_covariance():
    rng = np.random.default_rng(5)
    d, k = 8, 3
    A = rng.normal(size=(d, d))
    cov = A @ A.T / d + 0.1 * np.eye(d)
    means = rng.normal(size=(k, d)) * 0.8
    L = np.linalg.cholesky(cov)
    y = rng.integers(0, k, size=22000)
    X = (means[y] + rng.normal(size=(len(y), d)) @ L.T).astype(np.float32)
    tr, te = slice(0, 2000), slice(2000, None)
    P = np.linalg.inv(cov)
    bayes_logits = X[te] @ (means @ P).T - 0.5 * np.einsum("kd,de,ke->k", means, P, means)
    bayes = float((bayes_logits.argmax(1) == y[te]).mean())
    # The zero-shot term vanishes (random prompts at a tiny scale): GDA alone.
    head = GDAHead(prompt_embeds=unit(rng.normal(size=(k, d))), logit_scale=1e-9, alpha=1.0,
                   normalize=False).fit(X[tr], y[tr])
    acc = head.score(X[te], y[te])
    assert 0.6 < bayes < 0.95
    assert acc >= bayes - 0.01, (acc, bayes)


def test_gda_chooses_alpha_from_the_training_samples_alone(planted):
    X, y = few(planted, 8)
    head = GDAHead(prompt_embeds=planted["noisy"]).fit(X, y)
    assert sorted(head.alpha_scores_) == sorted(head.alphas)
    assert head.alpha_scores_[head.alpha_] == max(head.alpha_scores_.values())
    one = GDAHead(prompt_embeds=planted["noisy"]).fit(*few(planted, 1))
    assert one.alpha_ == 1.0 and one.alpha_scores_ == {}  # no fold can hold a singleton out


# -- prolip ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pre(planted):
    """Pre-projection features Z (n, 24) whose pretrained projection P0 (16, 24) gives ``planted``'s X."""
    rng = np.random.default_rng(7)
    P0 = rng.normal(size=(D, 24)) / np.sqrt(24)
    Z = (planted["X"].astype(np.float64) @ np.linalg.pinv(P0).T).astype(np.float32)
    return dict(P0=P0.astype(np.float32), Z=Z)


def test_prolip_infinite_reg_leaves_the_projection_and_is_zero_shot(planted, pre):
    idx = np.concatenate([np.flatnonzero(planted["y"][:200] == c)[:4] for c in range(K)])
    head = ProLIPHead(prompt_embeds=planted["noisy"], projection=pre["P0"], reg=math.inf).fit(pre["Z"][idx],
                                                                                          planted["y"][idx])
    np.testing.assert_array_equal(head.projection_, pre["P0"])
    te = planted["te"]
    embeds = pre["Z"][te].astype(np.float64) @ pre["P0"].astype(np.float64).T
    np.testing.assert_allclose(head.decision_function(pre["Z"][te]),
                               zero_shot(planted["noisy"]).decision_function(embeds), atol=1e-3)
    # A huge but finite lambda: the projection hardly moves.
    big = ProLIPHead(prompt_embeds=planted["noisy"], projection=pre["P0"], reg=1e6).fit(pre["Z"][idx],
                                                                                     planted["y"][idx])
    assert np.abs(big.projection_ - pre["P0"]).max() < 1e-3


def test_prolip_default_lambda_is_one_over_the_shots_and_it_learns(planted, pre):
    idx = np.concatenate([np.flatnonzero(planted["y"][:200] == c)[:16] for c in range(K)])
    head = ProLIPHead(prompt_embeds=planted["noisy"], projection=pre["P0"]).fit(pre["Z"][idx], planted["y"][idx])
    assert head.reg_ == pytest.approx(1 / 16)
    te = planted["te"]
    zs = zero_shot(planted["noisy"]).score(planted["X"][te], planted["y"][te])
    assert head.score(pre["Z"][te], planted["y"][te]) > zs + 0.1


def test_prolip_refuses_a_missing_or_mismatched_projection(planted, pre):
    with pytest.raises(ValueError, match="pre-projection"):
        ProLIPHead(prompt_embeds=planted["good"]).fit(pre["Z"][:20], planted["y"][:20])
    with pytest.raises(ValueError, match=r"pre_dim=24"):
        ProLIPHead(prompt_embeds=planted["good"], projection=pre["P0"][:, :10]).fit(pre["Z"][:20], planted["y"][:20])


# -- all five: save/load, views ----------------------------------------------------------------------
def build(name, planted, pre, **kw):
    kw.setdefault("prompt_embeds", planted["noisy"])
    if name == "prolip":
        return ProLIPHead(projection=pre["P0"], **kw)
    return {"zs-lp": ZSLPHead, "clap": CLAPHead, "lpp": LPPHead, "gda": GDAHead}[name](**kw)


NAMES = ["zs-lp", "clap", "lpp", "gda", "prolip"]


@pytest.mark.parametrize("name", NAMES)
def test_save_load_round_trip(name, planted, pre, tmp_path):
    idx = np.concatenate([np.flatnonzero(planted["y"][:200] == c)[:8] for c in range(K)])
    X = pre["Z"] if name == "prolip" else planted["X"]
    names = np.array(["anger", "awe", "fear", "joy"])  # string labels, prompts by name
    head = build(name, planted, pre, prompt_embeds={n: planted["noisy"][i] for i, n in enumerate(names)})
    head.fit(X[idx], names[planted["y"][idx]]).set_backbone("org/clip", "abc", X.shape[1])
    head.save_pretrained(tmp_path / "h")
    back = Head.from_pretrained(tmp_path / "h")
    assert type(back) is type(head) and back.get_params().keys() == head.get_params().keys()
    Xte = X[planted["te"]]
    np.testing.assert_array_equal(back.predict_proba(Xte), head.predict_proba(Xte))
    np.testing.assert_array_equal(back.predict(Xte), head.predict(Xte))
    # A loaded head's parameters rebuild it: clone + fit gives the same head again.
    again = clone(back).fit(X[idx], names[planted["y"][idx]])
    np.testing.assert_allclose(again.decision_function(Xte), head.decision_function(Xte), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_use_views_needs_views_and_trains_on_them_as_rows(name, planted, pre):
    idx = np.concatenate([np.flatnonzero(planted["y"][:200] == c)[:4] for c in range(K)])
    X = (pre["Z"] if name == "prolip" else planted["X"])[idx]
    y = planted["y"][idx]
    with pytest.raises(ValueError, match="--views"):
        build(name, planted, pre, use_views=True).fit(X, y)
    views = X[:, None, :] + 0.05 * np.random.default_rng(0).normal(size=(len(X), 2, X.shape[1])).astype(np.float32)
    with_views = build(name, planted, pre, use_views=True).fit(X, y, views=views)
    assert not np.allclose(with_views.decision_function(X), build(name, planted, pre).fit(X, y).decision_function(X))
    if name == "lpp":  # deterministic full batch: exactly the stacked rows
        rows = np.concatenate([X, views.reshape(-1, X.shape[1])])
        stacked = build(name, planted, pre).fit(rows, np.concatenate([y, np.repeat(y, 2)]))
        np.testing.assert_allclose(with_views.coef_, stacked.coef_, rtol=1e-6)


# -- views in the existing heads -----------------------------------------------------------------------
def test_tip_adapter_keys_average_the_views_as_the_formula_by_hand():
    rng = np.random.default_rng(11)
    X = rng.normal(size=(6, 5)).astype(np.float32)
    y = np.array([0, 0, 1, 1, 2, 2])
    V = (X[:, None, :] + 0.3 * rng.normal(size=(6, 3, 5))).astype(np.float32)
    T = unit(rng.normal(size=(3, 5))).astype(np.float32)
    head = TipAdapterHead(prompt_embeds=T, alpha=2.0, beta=3.0, use_views=True).fit(X, y, views=V)
    Q = rng.normal(size=(4, 5))
    keys = unit(unit(V.astype(np.float64)).mean(1))
    cache = np.exp(-3.0 * (1 - unit(Q) @ keys.T)) @ np.eye(3)[y]
    Tk = head.class_embeds_.numpy().astype(np.float64)  # the kernel's unit prompt vectors
    np.testing.assert_allclose(head.decision_function(Q), 100.0 * unit(Q) @ Tk.T + 2.0 * cache, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(head.keys_.numpy(), keys, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="--views"):
        TipAdapterHead(prompt_embeds=T, use_views=True).fit(X, y)
    with pytest.raises(ValueError, match=r"shape \(n_samples=6, K >= 1, dim=5\)"):
        TipAdapterHead(prompt_embeds=T, alpha=1.0, beta=1.0, use_views=True).fit(X, y, views=V[:, :, :4])


def test_linear_with_views_trains_on_the_views_and_validates_on_plain_images(planted):
    X, y = few(planted, 8)
    V = (X[:, None, :] + 0.1 * np.random.default_rng(2).normal(size=(len(X), 2, D))).astype(np.float32)
    a = LinearHead(C=1.0, use_views=True).fit(X, y, views=V)
    b = LinearHead(C=1.0).fit(np.concatenate([X, V.reshape(-1, D)]), np.concatenate([y, np.repeat(y, 2)]))
    np.testing.assert_allclose(a.coef_, b.coef_, rtol=1e-5, atol=1e-6)
    searched = LinearHead(use_views=True).fit(X, y, views=V)
    assert len(searched.val_scores_) >= 2
    # Its validation split is 20% of the 32 images (6 plain vectors), not of the 96 rows with views.
    assert all(abs(s * 6 - round(s * 6)) < 1e-9 for s in searched.val_scores_.values())
    assert any(0 < s < 1 for s in searched.val_scores_.values())
    with pytest.raises(ValueError, match="--views"):
        LinearHead(use_views=True).fit(X, y)


def test_mlp_with_views_validates_on_plain_images_only(planted):
    X, y = few(planted, 8)
    V = (X[:, None, :] + 0.1 * np.random.default_rng(2).normal(size=(len(X), 2, D))).astype(np.float32)
    head = MLPHead(hidden=16, epochs=5, use_views=True).fit(X, y, views=V)
    # validation_fraction 0.1 of 32 images: 4 plain vectors (one a class), never 10% of the 96 rows.
    assert all(abs(s * 4 - round(s * 4)) < 1e-9 for s in head.val_scores_)
    with pytest.raises(ValueError, match="--views"):
        MLPHead(use_views=True).fit(X, y)
