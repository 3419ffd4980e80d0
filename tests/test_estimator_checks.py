"""Every head passes scikit-learn's estimator checks, and its parameters are validated strictly."""
from __future__ import annotations

import collections
import warnings

import numpy as np
import pytest
from sklearn.utils.estimator_checks import check_estimator, check_param_validation, parametrize_with_checks

from clip_heads.heads import (HEADS, ContrastiveHead, LinearHead, MLPHead, ParameterError, TipAdapterHead,
                              ZeroShotHead, list_heads, make_head)


def check_prompts(dim: int, seed: int = 0) -> dict:
    """Prompt vectors for every label scikit-learn's checks use (ints, their str(), words, floats)."""
    rng = np.random.default_rng(seed)
    labels = [str(i) for i in range(-2, 12)] + ["one", "two", "three", "a", "b", "c", "0.0", "1.0", "2.0"]
    return {label: rng.normal(size=dim) for label in labels}


# Small training budgets: the checks test the estimator contract (and, in check_classifiers_train,
# that blobs are learned), not the plateau, and they fit a few hundred times.
@parametrize_with_checks([LinearHead(), MLPHead(patience=2), ContrastiveHead(prompt_embeds=check_prompts(7), patience=2)])
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


# Zero-shot and Tip-Adapter score images against prompt vectors, so the image dimension is fixed
# by the prompts: a check on 3-feature data can only apply to a head holding 3-d prompts. Each head
# is checked with prompts of every dimension the checks use, and each check must pass for one of
# them; what fails for all of them cannot apply, for the reason given.
PROMPT_DIMS = (1, 2, 3, 4, 5, 10)
CANNOT_APPLY = {
    "zero-shot": {"check_classifiers_train": "zero-shot learns nothing from (X, y): its accuracy on the "
                                             "check's blobs is that of random prompt vectors"},
    "tip-adapter": {}, "zs-lp": {}, "clap": {}, "lpp": {}, "gda": {}, "prolip": {},
}


def prompt_head(name: str, dim: int):
    """A prompt head for data of ``dim`` features (prolip: pre-projection features mapped to 4-d prompts)."""
    # Small budgets for the trained ones: the checks fit hundreds of times. GDA's logits shrink with
    # D / N (its precision estimator), far below 100 * cos to random prompts on the checks' 2-d blobs,
    # so its zero-shot term is scaled down there: the checks test the estimator, not the prompts.
    if name == "prolip":
        projection = np.random.default_rng(dim).normal(size=(4, dim))
        return HEADS[name](prompt_embeds=check_prompts(4), projection=projection, epochs=5, lr=3e-2)
    fast = {"epochs": 5, "lr": 3e-2}
    kw = {"zs-lp": fast, "clap": fast, "gda": {"logit_scale": 1e-3}}.get(name, {})
    return HEADS[name](prompt_embeds=check_prompts(dim), **kw)


@pytest.mark.parametrize("name", ["zero-shot", "tip-adapter", "zs-lp", "clap", "lpp", "gda", "prolip"])
def test_prompt_heads_pass_every_check_that_can_apply(name):
    outcomes = collections.defaultdict(list)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for dim in PROMPT_DIMS:
            results = check_estimator(prompt_head(name, dim), on_fail=None)
            for i, r in enumerate(results):  # one class, so the same checks in the same order
                outcomes[(i, r["check_name"])].append(r["status"])
    # A check scikit-learn skipped where it applied (pandas absent, say) is not a failure.
    never = {check for (_, check), statuses in outcomes.items() if not {"passed", "skipped"} & set(statuses)}
    assert never == set(CANNOT_APPLY[name]), never
    assert len(outcomes) >= 50


@pytest.mark.parametrize("name", list_heads())
def test_param_validation_names_the_parameter(name):
    # scikit-learn's own check: every parameter has a constraint, and a bad type or value raises
    # InvalidParameterError "The 'p' parameter of Head must be ... Got ... instead." from fit.
    kw = {"prompt_embeds": check_prompts(5)} if HEADS[name].uses_prompts else {}
    if name == "prolip":
        kw["projection"] = np.eye(5)
    check_param_validation(HEADS[name].__name__, HEADS[name](**kw))


@pytest.mark.parametrize("params, needle", [
    ({"epochs": 0}, r"'epochs' parameter of MLPHead must be an int in the range \[1, inf\)\. Got 0 instead"),
    ({"hidden": 0}, r"'hidden' parameter of MLPHead must be an int in the range \[1, inf\)\. Got 0"),
    ({"patience": -1}, r"'patience' parameter of MLPHead must be an int in the range \[1, inf\) or None\. Got -1"),
    ({"epochs": "one"}, r"'epochs' parameter of MLPHead must be an int .* Got 'one' instead"),
    ({"epochs": True}, r"'epochs' parameter of MLPHead must be an int .* Got True instead"),
    ({"dropout": 1.0}, r"'dropout' parameter of MLPHead must be a float in the range \[0\.0, 1\.0\)"),
    ({"batch_size": 0}, r"'batch_size' parameter of MLPHead must be .*'auto'.* Got 0"),
    ({"device": "meta"}, r"'device' parameter of MLPHead must be 'cpu', 'cuda', 'cuda:N' or 'mps'\. Got 'meta'"),
    ({"hiddn": 256}, r"the 'mlp' head has no parameter 'hiddn' \(did you mean 'hidden'\?\); its parameters are "
                     r"batch_size, device, dropout, epochs, hidden, "),
])
def test_make_head_refuses_bad_parameters_in_one_line(params, needle):
    with pytest.raises(ParameterError, match=needle) as e:
        make_head("mlp", params)
    assert "\n" not in str(e.value) and isinstance(e.value, ValueError)


def test_make_head_checks_grids_and_builds_valid_heads():
    with pytest.raises(ParameterError, match=r"'Cs' parameter of LinearHead must be a non-empty list of positive"):
        make_head("linear", {"Cs": [1.0, -1.0]})
    with pytest.raises(ParameterError, match=r"'betas' parameter of TipAdapterHead must be a non-empty list"):
        make_head("tip-adapter", {"betas": []})
    with pytest.raises(ParameterError, match=r"'C' parameter of LinearHead must be a float in the range \(0\.0, inf\)"):
        make_head("linear", {"C": 0})
    head = make_head("mlp", {"hidden": 64, "device": "cpu"})
    assert isinstance(head, MLPHead) and head.hidden == 64
    with pytest.raises(ValueError, match="unknown head 'svm'"):
        make_head("svm")
    # The same check runs at fit for a head built directly.
    with pytest.raises(ParameterError, match="'epochs' parameter"):
        MLPHead(epochs=0).fit(np.eye(4), [0, 1, 0, 1])


def test_capabilities_are_declared():
    assert {n for n, h in HEADS.items() if h.uses_prompts} == {"zero-shot", "contrastive", "tip-adapter", "zs-lp",
                                                                "clap", "lpp", "gda", "prolip"}
    assert {n for n, h in HEADS.items() if getattr(h, "uses_pre_projection", False)} == {"prolip"}
    assert {n for n, h in HEADS.items() if h.can_requery} == {"zero-shot", "contrastive"}
    assert all(hasattr(h, "with_prompts") == h.can_requery for h in HEADS.values())
    assert ZeroShotHead.can_requery and not TipAdapterHead.can_requery


@pytest.mark.parametrize("param, needle", [
    ("epochs=0", "'epochs' parameter of MLPHead must be an int in the range [1, inf). Got 0 instead."),
    ("hidden=0", "'hidden' parameter of MLPHead must be an int in the range [1, inf). Got 0 instead."),
    ("patience=-1", "'patience' parameter of MLPHead must be an int in the range [1, inf) or None. Got -1"),
    ("hiddn=256", "the 'mlp' head has no parameter 'hiddn' (did you mean 'hidden'?); its parameters are"),
    ("epochs=one", "'epochs' parameter of MLPHead must be an int in the range [1, inf). Got 'one' instead."),
])
def test_train_head_refuses_a_bad_param_with_one_line_and_exit_2(param, needle, tmp_path):
    from click.testing import CliRunner

    from clip_heads.cli import main
    from clip_heads.writer import write_store

    rng = np.random.default_rng(0)
    write_store(tmp_path / "s.h5", rng.normal(size=(40, 8)), np.arange(40) % 2, ["a", "b"], model_id="m",
                model_hash="sha256:0")
    res = CliRunner().invoke(main, ["train-head", "mlp", str(tmp_path / "s.h5"), "--out", str(tmp_path / "h"),
                                    "--param", param])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and needle in errors[0], res.output
    assert not (tmp_path / "h" / "config.json").exists()  # refused before any work
