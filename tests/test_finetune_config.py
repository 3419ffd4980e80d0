"""The fine-tune's typed recipe: validated in one line, round-tripped, saved with every
checkpoint in the form earlier versions wrote, and compared on resume (an old run resumes to
the same weights; a changed setting is refused naming it). And the one "is this emotion data"."""
from __future__ import annotations

import dataclasses
import importlib
import json

import pytest
import torch
from safetensors.torch import load_file

from clip_heads.datasets import open_source
from clip_heads.finetune import finetune
from clip_heads.finetune_config import (FinetuneConfig, FinetuneIdentity, default_caption_templates, default_epochs,
                                        plan_finetune)
from clip_heads.kinds import is_emotion_data
from clip_heads.prompts import EMOTION_DEFAULTS, OBJECT_DEFAULTS, default_template_sets
from test_finetune import make_colours

ft = importlib.import_module("clip_heads.finetune")  # the module; clip_heads.finetune is the function

# The identity a fine-tune recorded before this change (train_log.json and checkpoint log.json),
# key for key and in this order, as written by clip-heads 787c65d.
OLD_IDENTITY_KEYS = ["model_id", "model_revision", "model_hash", "source", "train_indices", "templates", "epochs",
                     "batch_size", "micro_batch", "lr", "weight_decay", "warmup", "max_grad_norm", "seed"]
SMALL = dict(templates="bp-photo", epochs=2, batch_size=8, lr=1e-3, workers=0, seed=0, checkpoint_every=1)


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    return open_source(make_colours(tmp_path_factory.mktemp("cfg") / "colours", n=4, broken=False))


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_config_defaults_are_the_papers_recipe_and_round_trip():
    c = FinetuneConfig()
    assert (c.lr, c.weight_decay, c.batch_size, c.epochs, c.templates) == (2e-5, 0.2, 256, None, None)
    d = c.replace(epochs=3, micro_batch=64).to_dict()
    assert FinetuneConfig.from_options(json.loads(json.dumps(d))) == c.replace(epochs=3, micro_batch=64)
    assert list(d) == FinetuneConfig.names()
    with pytest.raises(TypeError, match=r"unknown fine-tune option\(s\) \['epoch'\]; valid: templates, epochs"):
        FinetuneConfig.from_options({"epoch": 3})


@pytest.mark.parametrize("change, match", [
    ({"epochs": 0}, r"epochs=0 is invalid: an integer >= 1"),
    ({"micro_batch": 5, "batch_size": 16}, r"micro_batch \(5\) must divide batch_size \(16\)"),
    ({"lr": -1.0}, r"lr=-1.0 is invalid: a number > 0"),
    ({"precision": "fp8"}, r"precision='fp8' is invalid: one of auto, fp32, fp16, bf16"),
    ({"batch_size": True}, r"batch_size=True is invalid"),
    ({"checkpoint_every": -1}, r"checkpoint_every=-1 is invalid"),
])
def test_config_refuses_bad_values_in_one_line(change, match):
    with pytest.raises(ValueError, match=match) as e:
        FinetuneConfig(**change)
    assert "\n" not in str(e.value)


def test_identity_is_written_as_before_and_read_back(colours, tiny_clip):
    plan = plan_finetune(colours, tiny_clip, FinetuneConfig(templates="bp-photo", batch_size=8))
    d = plan.identity.to_dict()
    assert list(d) == OLD_IDENTITY_KEYS and d["templates"] == ["a photo of a {}"] and d["epochs"] == 1
    assert d["micro_batch"] == 8 and d["source"] == colours.fingerprint()
    assert FinetuneIdentity.from_dict(json.loads(json.dumps(d))) == plan.identity
    # Logs written before model revisions were recorded name the model "model".
    legacy = {("model" if k == "model_id" else k): v for k, v in d.items() if k != "model_revision"}
    assert FinetuneIdentity.from_dict(legacy).model_id == d["model_id"]
    plan.identity.check(legacy, "old-run")
    with pytest.raises(ValueError, match="recorded with optimizer='sgd', which this clip-heads does not know"):
        FinetuneIdentity.from_dict(dict(d, optimizer="sgd"), "old-run")
    with pytest.raises(ValueError, match="records no lr"):
        FinetuneIdentity.from_dict({k: v for k, v in d.items() if k != "lr"}, "old-run")
    for key, value in (("lr", 0.5), ("templates", ["a {}"]), ("seed", 7), ("train_indices", "0" * 64)):
        with pytest.raises(ValueError, match=rf"old-run holds a fine-tune with {key}=.*but this run has {key}="):
            plan.identity.check(dict(d, **{key: value}), "old-run")
    with pytest.raises(ValueError, match="model_hash"):
        plan.identity.check(dict(d, model_hash="sha256:" + "1" * 64), "old-run")


def _stop_after(monkeypatch, step):
    save = ft._save_checkpoint

    def stop(root, trainer, log):
        save(root, trainer, log)
        if trainer.step == step:
            raise RuntimeError("injected stop")

    monkeypatch.setattr(ft, "_save_checkpoint", stop)
    return save


def test_a_checkpoint_in_the_old_format_resumes_to_the_same_weights(colours, tiny_clip, tmp_path, monkeypatch,
                                                                    one_thread):
    ref = finetune(colours, tmp_path / "ref", tiny_clip, progress=False, **SMALL)
    save = _stop_after(monkeypatch, 2)
    with pytest.raises(RuntimeError, match="injected stop"):
        finetune(colours, tmp_path / "cut", tiny_clip, progress=False, **SMALL)
    monkeypatch.setattr(ft, "_save_checkpoint", save)
    ckpt = tmp_path / "cut" / "checkpoint"
    log_path = ckpt / (ckpt / "latest").read_text().strip() / "log.json"
    log = json.loads(log_path.read_text())
    assert log["config"] == FinetuneConfig(**SMALL).to_dict()  # the typed recipe is saved with the checkpoint
    # Rewrite it as the oldest logs were: no config, the model named "model", no revision.
    ident = log["identity"]
    old = {"model": ident["model_id"], **{k: v for k, v in ident.items() if k not in ("model_id", "model_revision")}}
    log_path.write_text(json.dumps(dict({k: v for k, v in log.items() if k != "config"}, identity=old)))
    res = finetune(colours, tmp_path / "cut", tiny_clip, progress=False, **SMALL)
    assert res.status == "resumed" and res.steps == ref.steps == 4
    a, b = load_file(str(tmp_path / "ref" / "model.safetensors")), load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # A finished run's train_log.json of that age is up to date; another lr is refused, naming it.
    done = tmp_path / "ref" / "train_log.json"
    finished = json.loads(done.read_text())
    done.write_text(json.dumps(dict({k: v for k, v in finished.items() if k != "config"}, identity=old)))
    assert finetune(colours, tmp_path / "ref", tiny_clip, progress=False, **SMALL).status == "up-to-date"
    with pytest.raises(ValueError, match=r"holds a fine-tune with lr=0\.001, but this run has lr=0\.002") as e:
        finetune(colours, tmp_path / "ref", tiny_clip, progress=False, **dict(SMALL, lr=2e-3))
    assert "\n" not in str(e.value)


def test_a_checkpoint_with_another_recipe_is_refused_in_one_line(colours, tiny_clip, tmp_path, monkeypatch, one_thread):
    save = _stop_after(monkeypatch, 1)
    with pytest.raises(RuntimeError, match="injected stop"):
        finetune(colours, tmp_path / "cut", tiny_clip, progress=False, **SMALL)
    monkeypatch.setattr(ft, "_save_checkpoint", save)
    with pytest.raises(ValueError, match=r"checkpoint holds a fine-tune with batch_size=8, but this run has batch_size=4"):
        finetune(colours, tmp_path / "cut", tiny_clip, progress=False, **dict(SMALL, batch_size=4))
    # Settings that do not change the weights may differ on resume.
    res = finetune(colours, tmp_path / "cut", tiny_clip, progress=False, **dict(SMALL, checkpoint_every=0, workers=0))
    assert res.status == "resumed"


def test_a_fine_tune_folder_has_the_results_layout(colours, tiny_clip, tmp_path, one_thread):
    res = finetune(colours, tmp_path / "m", tiny_clip, progress=False, **dict(SMALL, epochs=1))
    m = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert m["info"]["run"]["command"] == "finetune" and m["info"]["run"]["config"]["lr"] == 1e-3
    assert m["info"]["data"]["n_images"] == res.n_train == len(colours) and m["n_steps"] == res.steps == 2
    assert m["identity"] == res.log["identity"] and m["epochs"] == res.log["epochs"]
    report = (tmp_path / "m" / "report.txt").read_text()
    assert f"on {len(colours)} images" in report and "2 steps, 1 epochs" in report


# -- the one "is this emotion data" -----------------------------------------------------------------
def test_emotion_data_is_decided_once(tmp_path):
    assert is_emotion_data("fi") and is_emotion_data("twitter1") and not is_emotion_data("cifar100")
    assert is_emotion_data("folder", ["Joy", "anger ", "sadness"]) and not is_emotion_data("folder", ["cat", "joy"])
    assert not is_emotion_data("folder", [])
    assert default_template_sets("folder", ["joy", "fear"]) == EMOTION_DEFAULTS
    assert default_template_sets("folder") == default_template_sets("cifar100", ["cat", "joy"]) == OBJECT_DEFAULTS
    # The fine-tune's defaults follow the same decision, for a plain folder of emotion classes too.
    emotions = open_source(make_colours(tmp_path / "e", {"joy": (200, 200, 0), "fear": (0, 0, 0)}, n=2, broken=False))
    objects = open_source(make_colours(tmp_path / "o", {"cat": (200, 200, 0), "dog": (0, 0, 0)}, n=2, broken=False))
    assert (default_epochs(emotions), default_caption_templates(emotions)) == (3, "bp-emotion")
    assert (default_epochs(objects), default_caption_templates(objects)) == (1, "bp-photo")


def test_finetune_options_are_the_configs_fields():
    # finetune(**options) takes exactly FinetuneConfig's fields besides its own keywords.
    with pytest.raises(TypeError, match=r"unknown fine-tune option\(s\) \['epoch'\]"):
        finetune("nowhere", "out", "model", epoch=3)
    assert {f.name for f in dataclasses.fields(FinetuneConfig)} >= {"epochs", "lr", "templates", "workers"}
