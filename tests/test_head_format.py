"""The saved folder of the five prompt-based few-shot heads is a format: its config keys and its
tensors' names, shapes and dtypes are written down here as main wrote them before their shared
part (``class_embeds``) moved into ``PromptHead``, so a refactor of the save/load code that
changes what is on disk fails here, not in a user's old folder."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from safetensors import safe_open

from clip_heads.heads import CLAPHead, GDAHead, Head, LPPHead, ProLIPHead, ZSLPHead

K, D, PRE = 3, 8, 12
NAMES = np.array(["anger", "awe", "fear"])

CONFIG = ["backbone", "classes", "clip_heads_version", "extra", "head", "n_features_in", "params", "training_data",
          "weights_sha256"]
TRAINED_EXTRA = ["best_epoch_", "loss_curve_", "n_epochs_", "stop_reason_", "val_scores_"]
ZSLP_PARAMS = ["batch_size", "device", "epochs", "logit_bias", "logit_scale", "lr", "patience", "random_state",
               "scoring", "tol", "use_views", "validation_fraction", "weight_decay"]
# head -> (params, extra, {tensor: (shape, dtype)}), as main's code saved them (commit fc0fcc5).
GOLDEN = {
    "zs-lp": (ZSLP_PARAMS, TRAINED_EXTRA,
              {"class_embeds": ([K, D], "F32"), "model.weight": ([K, D], "F32")}),
    "clap": (sorted(ZSLP_PARAMS + ["alm", "multipliers", "penalty"]),
             sorted(TRAINED_EXTRA + ["initial_multipliers_", "multipliers_"]),
             {"class_embeds": ([K, D], "F32"), "model.weight": ([K, D], "F32")}),
    "lpp": (["alpha_init", "device", "logit_bias", "logit_scale", "max_iter", "random_state", "scoring", "tol",
             "use_views"],
            ["n_iter_", "objective_curve_", "step_w_", "steps_alpha_"],
            {"alpha": ([K], "F32"), "class_embeds": ([K, D], "F32"), "coef": ([K, D], "F32")}),
    "gda": (["alpha", "alphas", "cv", "device", "fallback_alpha", "logit_bias", "logit_scale", "normalize", "priors",
             "random_state", "scoring", "use_views"],
            ["alpha_", "alpha_scores_"],
            {"class_embeds": ([K, D], "F32"), "coef": ([K, D], "F32"), "intercept": ([K], "F32")}),
    "prolip": (sorted(ZSLP_PARAMS + ["reg"]), sorted(TRAINED_EXTRA + ["reg_"]),
               {"class_embeds": ([K, D], "F32"), "init_projection": ([D, PRE], "F32"),
                "model.weight": ([D, PRE], "F32")}),
}


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    dirs = rng.normal(size=(K, D))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    y = np.repeat(np.arange(K), 10)
    X = (0.6 * dirs[y] + 0.3 * rng.normal(size=(len(y), D))).astype(np.float32)
    prompts = (dirs + 0.5 * rng.normal(size=(K, D))).astype(np.float32)
    P0 = (rng.normal(size=(D, PRE)) / np.sqrt(PRE)).astype(np.float32)
    Z = (X.astype(np.float64) @ np.linalg.pinv(P0).T).astype(np.float32)  # pre-projection features of X
    return dict(X=X, Z=Z, y=NAMES[y], prompts={n: prompts[i] for i, n in enumerate(NAMES)}, P0=P0)


def fitted(name, data):
    pe = data["prompts"]
    head = {"zs-lp": lambda: ZSLPHead(prompt_embeds=pe), "clap": lambda: CLAPHead(prompt_embeds=pe),
            "lpp": lambda: LPPHead(prompt_embeds=pe), "gda": lambda: GDAHead(prompt_embeds=pe),
            "prolip": lambda: ProLIPHead(prompt_embeds=pe, projection=data["P0"])}[name]()
    X = data["Z"] if name == "prolip" else data["X"]
    return head.fit(X, data["y"]).set_backbone("org/clip", "sha256:abc", X.shape[1]), X


def learned(head) -> dict[str, np.ndarray]:
    """What each saved tensor must hold, read from the fitted head's attributes."""
    out = {"class_embeds": np.asarray(head.class_embeds_)}
    if isinstance(head, ZSLPHead):
        out["model.weight"] = head.model_.weight.detach().numpy()
    if isinstance(head, ProLIPHead):
        out["init_projection"] = np.asarray(head.init_projection_)
    if isinstance(head, (LPPHead, GDAHead)):
        out["coef"] = head.coef_
        out["alpha" if isinstance(head, LPPHead) else "intercept"] = getattr(
            head, "alpha_" if isinstance(head, LPPHead) else "intercept_")
    return out


@pytest.mark.parametrize("name", list(GOLDEN))
def test_saved_prompt_heads_keep_mains_format_and_load_to_the_same_predictions(name, data, tmp_path):
    head, X = fitted(name, data)
    head.save_pretrained(tmp_path / "h")
    cfg = json.loads((tmp_path / "h" / "config.json").read_text())
    params, extra, tensors = GOLDEN[name]
    assert (sorted(cfg), sorted(cfg["params"]), sorted(cfg["extra"])) == (CONFIG, params, extra)
    assert cfg["head"] == name and cfg["classes"] == NAMES.tolist()
    with safe_open(str(tmp_path / "h" / "model.safetensors"), framework="pt") as f:
        found = {k: (list(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
        values = {k: f.get_tensor(k).numpy() for k in f.keys()}
    assert found == tensors
    want = learned(head)
    assert set(want) == set(tensors)  # every tensor is named for what it holds
    for k, v in want.items():
        np.testing.assert_array_equal(values[k], v, err_msg=k)
    back = Head.from_pretrained(tmp_path / "h")
    assert type(back) is type(head)
    np.testing.assert_array_equal(back.predict_proba(X), head.predict_proba(X))
    np.testing.assert_array_equal(back.class_embeds_, head.class_embeds_)
    np.testing.assert_array_equal(back.prompt_embeds, np.asarray(head.class_embeds_))  # clone() + fit() works


def test_a_prompt_heads_file_missing_its_class_vectors_is_refused(data, tmp_path):
    from safetensors.torch import load_file, save_file

    from clip_heads.heads import HeadFileError

    head, _ = fitted("gda", data)
    head.save_pretrained(tmp_path / "h")
    path = tmp_path / "h" / "model.safetensors"
    tensors = load_file(str(path))
    del tensors["class_embeds"]
    save_file(tensors, str(path))
    cfg = json.loads((tmp_path / "h" / "config.json").read_text())  # a consistent folder, short of the tensor
    cfg["weights_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (tmp_path / "h" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HeadFileError, match=r"missing \['class_embeds'\]"):
        Head.from_pretrained(tmp_path / "h")
