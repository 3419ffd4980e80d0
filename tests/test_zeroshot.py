"""The zero-shot kernel against hand computations, against PromptSet's ensembling, and in use:
every consumer's output moves when the kernel's ensembling or scoring rule is changed."""
from __future__ import annotations

import json
import math
import re
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch

from clip_heads import ensembling, zeroshot
from clip_heads.ablation import ablate_prompts
from clip_heads.evaluate import run_zero_shot, train_head
from clip_heads.heads import class_prompt_vectors
from clip_heads.retrieval import top_k_images
from clip_heads.store import PromptSet, open_store
from clip_heads.writer import write_store
from clip_heads.zeroshot import ScoringRule
from conftest import make_blobs


def prompt_set(C=4, T=3, D=8, seed=0, synonyms=2) -> PromptSet:
    """T templates x C classes x a few phrasings, random vectors of uneven length."""
    rng = np.random.default_rng(seed)
    tid, cid = np.meshgrid(np.arange(T), np.arange(C), indexing="ij")
    tid, cid = np.repeat(tid.ravel(), synonyms), np.repeat(cid.ravel(), synonyms)
    E = (rng.normal(size=(len(tid), D)) * rng.uniform(0.5, 3, size=(len(tid), 1))).astype(np.float32)
    return PromptSet("p", [f"c{c}" for c in range(C)], [f"t{t} {{}}" for t in range(T)],
                     [f"text {i}" for i in range(len(tid))], E, tid, cid)


# -- ensembling ----------------------------------------------------------------------------
def test_ensemble_is_promptsets_rule_bit_for_bit():
    ps = prompt_set()
    for ids in (None, [0], [1, 2], [2, 0]):
        np.testing.assert_array_equal(zeroshot.class_vectors(ps, ids), ps.class_vectors(ids))
    # By hand: normalise each prompt, sum per class, normalise the sum.
    E = ps.embeds / np.linalg.norm(ps.embeds, axis=1, keepdims=True)
    c1 = E[ps.class_id == 1].sum(0)
    np.testing.assert_allclose(zeroshot.class_vectors(ps)[1], c1 / np.linalg.norm(c1), atol=1e-6)


def test_ensemble_torch_and_numpy_agree_and_match_the_heads_rule():
    ps = prompt_set(seed=1)
    V = zeroshot.ensemble(ps.embeds, ps.class_id, 4)
    Vt = zeroshot.ensemble(torch.from_numpy(ps.embeds), torch.from_numpy(ps.class_id), 4)
    assert isinstance(Vt, torch.Tensor) and Vt.dtype == torch.float32 and V.dtype == np.float32
    np.testing.assert_allclose(Vt.numpy(), V, atol=1e-6)
    # The heads' ensembling is the kernel's (test_heads_ensemble_with_the_kernel below).
    per_class = {c: ps.embeds[ps.class_id == i] for i, c in enumerate(ps.classes)}
    np.testing.assert_array_equal(class_prompt_vectors(per_class, ps.classes), V)


def test_ensemble_names_a_class_without_prompts():
    ps = prompt_set()
    keep = ps.class_id != 2
    with pytest.raises(ValueError, match=r"no prompt for classes \['c2'\]"):
        zeroshot.ensemble(ps.embeds[keep], ps.class_id[keep], 4, ps.classes, "these prompts")
    with pytest.raises(ValueError, match=r"no prompt for classes \['c2'\]"):
        zeroshot.ensemble(torch.from_numpy(ps.embeds[keep]), ps.class_id[keep], 4, ps.classes)


def test_template_vectors_are_each_templates_own_ensemble():
    ps = prompt_set()
    order = ["c3", "c0", "c1", "c2"]
    V, complete = zeroshot.template_vectors(ps, order)
    assert V.shape == (3, 4, 8) and complete.all()
    for t in range(3):
        np.testing.assert_allclose(V[t], zeroshot.class_vectors(ps, [t], classes=order), atol=1e-6)
    drop = ~((ps.template_id == 1) & (ps.class_id == 0))
    holey = PromptSet("h", ps.classes, ps.templates, ps.texts, ps.embeds[drop], ps.template_id[drop], ps.class_id[drop])
    assert zeroshot.template_vectors(holey, order)[1].tolist() == [True, False, True]


# -- scoring ---------------------------------------------------------------------------------
COS = np.array([[0.2, 0.1, -0.3], [0.05, 0.3, 0.29]], np.float32)


def test_softmax_at_the_scale_by_hand():
    rule = ScoringRule()  # what a store without a recorded scale gets: CLIP's softmax at 100
    assert (rule.scoring, rule.logit_scale) == ("softmax", 100.0)
    got = rule.scores(COS)
    e = [math.exp(100 * (c - 0.2)) for c in (0.2, 0.1, -0.3)]
    np.testing.assert_allclose(got[0], [v / sum(e) for v in e], rtol=1e-5)
    assert got.dtype == np.float32
    np.testing.assert_allclose(rule.distribution(COS), got)
    # Another temperature moves the probabilities, never the prediction.
    cool = ScoringRule("softmax", 10.0).scores(COS)
    e = [math.exp(10 * c) for c in COS[1]]
    np.testing.assert_allclose(cool[1], [v / sum(e) for v in e], rtol=1e-5)
    np.testing.assert_array_equal(cool.argmax(1), got.argmax(1))


def test_sigmoid_with_bias_by_hand():
    rule = ScoringRule("sigmoid", 10.0, -5.0)  # SigLIP: independent sigmoids of scale * cos + bias
    got = rule.scores(COS)
    hand = [[1 / (1 + math.exp(-(10 * c - 5))) for c in row] for row in COS.tolist()]
    np.testing.assert_allclose(got, hand, rtol=1e-5)
    assert not np.allclose(got.sum(1), 1)
    dist = rule.distribution(COS)
    np.testing.assert_allclose(dist, np.asarray(hand) / np.asarray(hand).sum(1, keepdims=True), rtol=1e-5)
    np.testing.assert_array_equal(dist.argmax(1), COS.argmax(1))
    torch_scores = rule.scores(torch.from_numpy(COS))
    np.testing.assert_allclose(torch_scores.numpy(), hand, rtol=1e-5)
    assert rule.describe() == "sigmoid(10 * cos -5)"


def test_scoring_rule_from_store_attrs_and_from_a_model(tiny_clip):
    assert ScoringRule.from_attrs({}) == ScoringRule("softmax", 100.0, 0.0)
    siglip = ScoringRule.from_attrs({"family": "siglip", "logit_scale": np.float64(117.3), "logit_bias": np.float32(-12.5)})
    assert siglip == ScoringRule("sigmoid", 117.3, -12.5) and type(siglip.logit_scale) is float
    assert ScoringRule.from_attrs({"family": "clip", "logit_scale": 50.0}).logit_scale == 50.0
    assert ScoringRule.from_attrs({"scoring": "sigmoid"}).scoring == "sigmoid"
    for bad, match in (({"scoring": "tanh"}, "unknown zero-shot scoring 'tanh'"), ({"logit_scale": -1.0}, "> 0"),
                       ({"logit_scale": float("nan")}, "finite")):
        with pytest.raises(ValueError, match=match):
            ScoringRule.from_attrs(bad)
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(tiny_clip)
    rule = ScoringRule.from_model(model)  # the model's own temperature: exp of the learned log-scale
    assert (rule.scoring, rule.logit_bias) == ("softmax", 0.0)
    assert rule.logit_scale == pytest.approx(math.exp(model.logit_scale.item())) and rule.logit_scale != 100.0
    fake = SimpleNamespace(config=SimpleNamespace(model_type="siglip"), logit_scale=torch.tensor([math.log(10.0)]),
                           logit_bias=torch.tensor([-10.0]))
    rule = ScoringRule.from_model(fake)
    assert (rule.scoring, rule.logit_bias) == ("sigmoid", -10.0) and rule.logit_scale == pytest.approx(10.0)


# -- every consumer goes through the kernel ----------------------------------------------------
def planted_store(path, C=4, n=25, soft=False):
    X, y, means = make_blobs(n_per_class=n, n_classes=C, dim=16, sep=8.0)
    classes = [f"k{c}" for c in range(C)]
    ps = PromptSet("planted", classes, ["{}"], classes, means.astype(np.float32), np.zeros(C, int), np.arange(C))
    extras = None
    if soft:
        rng = np.random.default_rng(3)
        extras = {"emotion_distribution": rng.dirichlet(np.ones(C), size=len(y))}
    write_store(path, X, y, classes, keys=[f"i{i:03d}" for i in range(len(y))], prompt_sets=[ps], extras=extras,
                extras_columns={"emotion_distribution": classes} if soft else None)
    return path, X, y


@pytest.fixture
def roll_kernel(monkeypatch):
    """Call it to make the kernel's ensembling hand class c the vector of class c + 1: a
    consumer that uses the kernel then predicts (c - 1) mod C wherever it predicted c. The
    ensemble lives in clip_heads.ensembling (class_vectors, PromptSet.class_vectors call it
    there) and is re-exported by the kernel (the heads call zeroshot.ensemble): both names."""
    real = ensembling.ensemble

    def rolled(*args, **kw):
        V = real(*args, **kw)
        return V.roll(-1, 0) if isinstance(V, torch.Tensor) else np.roll(V, -1, axis=0)

    def roll() -> None:
        monkeypatch.setattr(ensembling, "ensemble", rolled)
        monkeypatch.setattr(zeroshot, "ensemble", rolled)

    return roll


def test_store_consumers_follow_the_kernels_ensembling(tmp_path, roll_kernel):
    path, X, y = planted_store(tmp_path / "s.h5")
    names = [f"k{c}" for c in range(4)]
    base = run_zero_shot(path)
    ens = ablate_prompts(path).rows
    top = top_k_images(path, k=5)
    head = train_head("zero-shot", path, tmp_path / "zs-head")
    assert base.metrics["accuracy"] > 0.95 and ens[0]["accuracy"] > 0.95 and head.metrics["train"]["accuracy"] > 0.95

    roll_kernel()
    shift = {c: names[(i - 1) % 4] for i, c in enumerate(names)}
    moved = run_zero_shot(path)
    assert moved.predictions["prediction"] == [shift[p] for p in base.predictions["prediction"]]
    ensemble_row = next(r for r in ablate_prompts(path).rows if r["template_id"] is None)
    assert ensemble_row["accuracy"] < 0.05  # now wrong for (almost) every image
    moved_top = top_k_images(path, k=5)
    assert [moved_top[c] for c in names] == [top[names[(i + 1) % 4]] for i in range(4)]
    head = train_head("zero-shot", path, tmp_path / "zs-head-2")
    assert head.metrics["train"]["accuracy"] < 0.05


def test_zero_shot_scores_with_the_stores_rule(tmp_path):
    path, X, y = planted_store(tmp_path / "s.h5", soft=True)
    clip = run_zero_shot(path).metrics
    assert clip["scoring"]["text"] == "softmax over 100 * cos"
    with h5py.File(path, "r+") as f:  # a store that records SigLIP's rule (issue 10's attributes)
        f.attrs["family"], f.attrs["logit_scale"], f.attrs["logit_bias"] = "siglip", 10.0, -4.0
    sig = run_zero_shot(path).metrics
    assert sig["scoring"] == {"scoring": "sigmoid", "logit_scale": 10.0, "logit_bias": -4.0,
                              "text": "sigmoid(10 * cos -4)"}
    assert sig["confusion_matrix"] == clip["confusion_matrix"]  # the same argmax
    # The soft-label KL is computed from the sigmoid distribution, by hand here.
    with open_store(path) as s:
        V = s.prompt_set().class_vectors()
        D = s.extra("emotion_distribution")
    cos = (X / np.linalg.norm(X, axis=1, keepdims=True)) @ V.T
    q = 1 / (1 + np.exp(-(10 * cos - 4)))
    q /= q.sum(1, keepdims=True)
    p, q = (D + 1e-6) / (D + 1e-6).sum(1, keepdims=True), (q + 1e-6) / (q + 1e-6).sum(1, keepdims=True)
    assert sig["soft_labels"]["kl"] == pytest.approx(np.mean((p * np.log(p / q)).sum(1)), rel=1e-4)
    assert sig["soft_labels"]["kl"] != pytest.approx(clip["soft_labels"]["kl"], rel=1e-3)


def test_fine_tune_zero_shot_follows_the_kernel(tiny_clip, tmp_path, roll_kernel):
    from test_finetune import make_colours

    from clip_heads.datasets import open_source
    from clip_heads.finetune_eval import evaluate_zero_shot

    src = open_source(make_colours(tmp_path / "colours", n=4, broken=False))
    base = evaluate_zero_shot(tiny_clip, src, templates="bp-photo", workers=0)
    roll_kernel()
    moved = evaluate_zero_shot(tiny_clip, src, templates="bp-photo", workers=0)
    assert moved["y_pred"] == [(p - 1) % 4 for p in base["y_pred"]]


# -- the heads score through the kernel ----------------------------------------------------------
def test_heads_ensemble_with_the_kernel(roll_kernel):
    ps = prompt_set(seed=2)
    per_class = {c: ps.embeds[ps.class_id == i] for i, c in enumerate(ps.classes)}
    np.testing.assert_array_equal(class_prompt_vectors(per_class, ps.classes), zeroshot.class_vectors(ps))
    before = class_prompt_vectors(per_class, ps.classes)
    roll_kernel()  # the heads' class vectors move with the kernel's ensembling
    np.testing.assert_array_equal(class_prompt_vectors(per_class, ps.classes), np.roll(before, -1, axis=0))


def test_zero_shot_and_tip_adapter_heads_score_with_the_rule_they_are_given():
    from clip_heads.heads import TipAdapterHead, ZeroShotHead

    X, y, means = make_blobs(n_per_class=30, n_classes=3, dim=8, sep=3.0)
    V = means / np.linalg.norm(means, axis=1, keepdims=True)
    cos = (X / np.linalg.norm(X, axis=1, keepdims=True)) @ V.T
    clip = ZeroShotHead(V, classes=[0, 1, 2]).fit()
    np.testing.assert_allclose(clip.decision_function(X), 100 * cos, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(clip.predict_proba(X), ScoringRule().distribution(cos), rtol=1e-4, atol=1e-6)
    sig = ZeroShotHead(V, classes=[0, 1, 2], scoring="sigmoid", logit_scale=10.0, logit_bias=-4.0).fit()
    np.testing.assert_allclose(sig.decision_function(X), 10 * cos - 4, rtol=1e-5, atol=1e-5)
    s = 1 / (1 + np.exp(-(10 * cos - 4)))  # by hand: independent sigmoids, renormalised to a distribution
    np.testing.assert_allclose(sig.predict_proba(X), s / s.sum(1, keepdims=True), rtol=1e-5, atol=1e-6)
    assert not np.allclose(sig.predict_proba(X), clip.predict_proba(X), atol=1e-2)
    np.testing.assert_array_equal(sig.predict(X), clip.predict(X))  # both rank classes by cosine
    # Tip-Adapter's zero-shot term is the same rule: with the cache off it is the zero-shot head.
    tip = TipAdapterHead(V, alpha=0.0, beta=1.0, scoring="sigmoid", logit_scale=10.0, logit_bias=-4.0).fit(X, y)
    np.testing.assert_allclose(tip.decision_function(X), sig.decision_function(X), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(tip.predict_proba(X), sig.predict_proba(X), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("params, needle", [({"scoring": "tanh"}, "'scoring' parameter of ZeroShotHead"),
                                            ({"logit_bias": float("nan")}, "logit_bias must be a finite number"),
                                            ({"logit_scale": float("inf")}, "'logit_scale' parameter of ZeroShotHead must be a float in the range (0.0, inf)"),
                                            ({"logit_bias": True}, "'logit_bias' parameter")])
def test_a_bad_scoring_parameter_is_refused_when_the_head_is_made(params, needle):
    from clip_heads.heads import ParameterError, make_head

    with pytest.raises(ParameterError, match=re.escape(needle)):
        make_head("zero-shot", params)


def test_train_head_scores_a_sigmoid_store_as_zero_shot_does_and_saves_the_rule(tmp_path):
    from clip_heads.heads import Head

    path, X, y = planted_store(tmp_path / "s.h5", soft=True)
    with h5py.File(path, "r+") as f:  # a store that records SigLIP's rule (issue 10's attributes)
        f.attrs["family"], f.attrs["logit_scale"], f.attrs["logit_bias"] = "siglip", 10.0, -4.0
    zs = run_zero_shot(path).metrics
    rep = train_head("zero-shot", path, tmp_path / "head")
    # The same probabilities: the soft-label KL of the train section equals zero-shot's.
    assert rep.metrics["train"]["soft_labels"]["kl"] == pytest.approx(zs["soft_labels"]["kl"], rel=1e-5)
    config = json.loads((tmp_path / "head" / "config.json").read_text())
    assert {k: config["params"][k] for k in ("scoring", "logit_scale", "logit_bias")} == \
        {"scoring": "sigmoid", "logit_scale": 10.0, "logit_bias": -4.0}
    head = Head.from_pretrained(tmp_path / "head")
    with open_store(path) as s:
        V = s.prompt_set().class_vectors()
    cos = (X / np.linalg.norm(X, axis=1, keepdims=True)) @ V.T
    np.testing.assert_allclose(head.predict_proba(X), ScoringRule("sigmoid", 10.0, -4.0).distribution(cos),
                               rtol=1e-4, atol=1e-6)
    # A head saved before the rule was a parameter (no scoring, no logit_bias) loads as CLIP's softmax.
    old = tmp_path / "old-head"
    old.mkdir()
    for name in ("model.safetensors",):
        (old / name).write_bytes((tmp_path / "head" / name).read_bytes())
    config["params"] = {k: v for k, v in config["params"].items() if k not in ("scoring", "logit_bias")}
    (old / "config.json").write_text(json.dumps(config))
    legacy = Head.from_pretrained(old)
    assert (legacy.scoring, legacy.logit_scale, legacy.logit_bias) == ("softmax", 10.0, 0.0)
    np.testing.assert_allclose(legacy.predict_proba(X), ScoringRule("softmax", 10.0).distribution(cos),
                               rtol=1e-4, atol=1e-6)
