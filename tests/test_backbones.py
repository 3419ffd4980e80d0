"""Every backbone family held to its own reference (issue 10): stored image and prompt vectors
equal transformers' own forward passes on real JPEGs, preprocessing equals each family's image
processor, SigLIP scores with sigmoid and its own bias, fine-tunes train with the family's
loss, WiSE-FT stays inside a family, and what does not fit is refused in one line.

Tiny random models of each family (tests/conftest.py ``tiny_families``) are saved with
save_pretrained and loaded by path, with tokenizers of each family's own class built tiny.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from clip_heads.backbones.families import FAMILIES, detect_family, family_of_folder
from clip_heads.backbones.model import load_backbone
from clip_heads.backbones.preprocess import Preprocess, ProcessorPreprocess, image_recipe, stack_batch
from clip_heads.cli import main
from clip_heads.encode import encode
from clip_heads.store import open_store
from clip_heads.zeroshot import ScoringRule
from conftest import FAMILY_KINDS, SHARED_DATASETS, requires_shared

EMOTION6 = SHARED_DATASETS / "emotion6"
FAMILY_OF_KIND = {"clip": "clip", "siglip": "siglip", "siglip2": "siglip2", "siglip2-fixres": "siglip2",
                  "metaclip_2": "metaclip_2", "altclip": "altclip", "chinese_clip": "chinese_clip"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models gain nothing from two threads, and on a shared machine their spin-waits cost.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def cosine(a, b):
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return (a * b).sum(-1)


def reference_model(path):
    """The model as transformers loads it by itself (AutoModel picks the class from config.json)."""
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path), AutoImageProcessor.from_pretrained(path)


def colours(root: Path, n: int = 3, names=("red", "green", "blue")) -> str:
    rng = np.random.default_rng(0)
    rgb = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
    for name in names:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            arr = np.clip(np.array(rgb[name])[None, None] + rng.normal(0, 20, (30 + 7 * i, 40, 3)), 0, 255)
            Image.fromarray(arr.astype(np.uint8)).save(root / name / f"{i}.jpg", quality=95)
    return str(root)


# -- the registry -------------------------------------------------------------------------------
def test_family_detection_reads_model_type_and_siglip2_fixres_by_its_gemma_tokenizer():
    assert detect_family({"model_type": "clip"}).name == "clip"
    assert detect_family({"model_type": "siglip"}, "SiglipTokenizer").name == "siglip"
    assert detect_family({"model_type": "siglip"}, "GemmaTokenizerFast").name == "siglip2"
    assert detect_family({"model_type": "siglip2"}, "Siglip2Tokenizer").name == "siglip2"
    for mt, fam in (("metaclip_2", "metaclip_2"), ("altclip", "altclip"), ("chinese_clip", "chinese_clip")):
        assert detect_family({"model_type": mt}).name == fam
    assert {s.scoring for s in FAMILIES.values()} == {"softmax", "sigmoid"}
    assert [n for n, s in FAMILIES.items() if s.text_padding == "max_length"] == ["siglip", "siglip2"]


def test_unknown_model_type_is_refused_in_one_line_listing_the_families(tiny_clip, tmp_path):
    other = tmp_path / "bert"
    shutil.copytree(tiny_clip, other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(dict(cfg, model_type="bert")))
    with pytest.raises(ValueError) as e:
        load_backbone(other)
    msg = str(e.value)
    assert "'bert'" in msg and "\n" not in msg
    for spec in FAMILIES.values():
        assert spec.title in msg
    res = CliRunner().invoke(main, ["encode", colours(tmp_path / "imgs", 1), "--out", str(tmp_path / "s.h5"),
                                    "--model", str(other)])
    assert res.exit_code != 0 and "'bert'" in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "s.h5").exists()


# -- preprocessing ------------------------------------------------------------------------------
def _processors():
    from transformers import (ChineseCLIPImageProcessor, CLIPImageProcessor, Siglip2ImageProcessor,
                              SiglipImageProcessor)

    return {  # each family's processor at its published size
        "clip": CLIPImageProcessor(),
        "siglip": SiglipImageProcessor(),  # 224 x 224, bicubic, no crop, mean = std = 0.5
        "siglip2-fixres": SiglipImageProcessor(size={"height": 256, "width": 256}, resample=2),
        "chinese_clip": ChineseCLIPImageProcessor(size={"height": 224, "width": 224}, do_center_crop=False),
        "siglip2": Siglip2ImageProcessor(),  # NaFlex, 256 patches of 16
    }


@requires_shared
@pytest.mark.parametrize("kind", ["clip", "siglip", "siglip2-fixres", "chinese_clip", "siglip2"])
def test_preprocessing_equals_the_familys_processor_on_real_jpegs(kind):
    from clip_heads.datasets import open_source

    proc = _processors()[kind]
    recipe = image_recipe(proc)
    assert isinstance(recipe, ProcessorPreprocess if kind == "siglip2" else Preprocess)
    src = open_source(str(EMOTION6))
    imgs = [src.load(i) for i in range(0, len(src), 199)]  # 10 real JPEGs across the classes
    ref = proc(images=imgs, return_tensors="np")
    got = stack_batch([recipe(im) for im in imgs])  # as the DataLoader workers batch them
    got = got if isinstance(got, dict) else {"pixel_values": got}
    assert set(got) == set(ref)
    for k in ref:
        assert got[k].shape == ref[k].shape, k
        assert np.abs(got[k].numpy().astype(np.float64) - ref[k]).max() <= 1e-3, k
    if kind in ("siglip", "siglip2-fixres", "chinese_clip"):
        # A resize of the whole image to a square, not CLIP's shortest edge + centre crop.
        clip_way = Preprocess(shortest_edge=recipe.out_height, crop_height=recipe.out_height,
                              crop_width=recipe.out_width, image_mean=recipe.image_mean, image_std=recipe.image_std)
        assert np.abs(clip_way(imgs[0]) - ref["pixel_values"][0]).max() > 0.1


# -- each family against its own reference ------------------------------------------------------
@requires_shared
@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_stored_vectors_equal_the_familys_reference_forward_on_real_jpegs(kind, tiny_families, tmp_path):
    path = tiny_families[kind]
    spec = FAMILIES[FAMILY_OF_KIND[kind]]
    assert family_of_folder(path).name == spec.name
    capitals = tmp_path / "Capitals.txt"  # SigLIP 2 reads lower-cased text: a template with capitals shows it
    capitals.write_text("A Photo That Evokes {}\nAn image that evokes the emotion of {}\n")
    # NaFlex batches (patches, mask, patch grid) cross a worker process: the processor pickles.
    # decode="exact": the family's own reference decode (the tiny models' 30 px target would let the
    # default reduced decode cut Emotion6 to 1/4; tests/test_encode_speed.py holds that path to its bound).
    r = encode(str(EMOTION6), tmp_path / "s.h5", model=path, limit=6, seed=1, workers=1 if kind == "siglip2" else 0,
               progress=False, dtype="float32", templates=[str(capitals), "clip-e"], decode="exact")
    assert r.n_images == 6
    with open_store(r.path) as s:
        X, keys, attrs = s.embeddings(), s.keys, s.attrs
        ps = s.prompt_set("Capitals")
    model, tok, proc = reference_model(path)
    imgs = [Image.open(EMOTION6 / "images" / k).convert("RGB") for k in keys]
    with torch.inference_mode():
        ref_img = model.get_image_features(**proc(images=imgs, return_tensors="pt")).pooler_output.numpy()
        padding = {"padding": "max_length", "max_length": 64, "truncation": True} if spec.text_padding == "max_length" \
            else {"padding": True}
        texts = [t.format(c) for t in ps.templates for c in ps.classes]
        texts = [t.lower() for t in texts] if spec.name == "siglip2" else texts  # SigLIP 2's canonicalisation
        ref_txt = model.get_text_features(**tok(texts, return_tensors="pt", **padding)).pooler_output.numpy()
    assert cosine(X, ref_img).min() >= 0.9999
    assert ps.texts == texts and ps.attrs["text_padding"] == spec.text_padding
    assert cosine(ps.embeds, ref_txt).min() >= 0.9999
    # The store records the family's rule, from the model's own parameters.
    assert attrs["schema_version"] == 2 and attrs["family"] == spec.name and attrs["scoring"] == spec.scoring
    assert attrs["logit_scale"] == pytest.approx(math.exp(model.logit_scale.item()), rel=1e-6)
    assert ("logit_bias" in attrs) == (spec.scoring == "sigmoid")
    assert attrs["text_padding"] == spec.text_padding and bool(attrs["text_lowercase"]) == spec.text_lowercase
    if spec.text_padding == "max_length":
        assert attrs["text_max_length"] == 64
        short = model.get_text_features(**tok(texts, return_tensors="pt", padding=True)).pooler_output.detach().numpy()
        assert cosine(ps.embeds, short).min() < 0.999  # the trap: padding to the longest prompt is another vector


# -- SigLIP: sigmoid scoring with the stored bias -----------------------------------------------
def test_siglip_store_scores_with_sigmoid_and_its_bias_as_the_model_does(tiny_families, tmp_path):
    from transformers import SiglipModel

    from clip_heads.evaluate import run_zero_shot

    path = tiny_families["siglip"]
    store = encode(colours(tmp_path / "imgs"), tmp_path / "s.h5", model=path, workers=0, progress=False,
                   dtype="float32", templates=["bp-photo"]).path  # one template: "a photo of a {}"
    with open_store(store) as s:
        X, attrs, ps, keys = s.embeddings(), s.attrs, s.prompt_set("bp-photo"), s.keys
    rule = ScoringRule.from_attrs(attrs)
    assert (rule.scoring, rule.logit_scale, rule.logit_bias) == ("sigmoid", pytest.approx(10.0), pytest.approx(-2.5))
    cos = X @ ps.class_vectors().T
    by_hand = 1 / (1 + np.exp(-(10.0 * cos - 2.5)))
    np.testing.assert_allclose(rule.scores(cos), by_hand, rtol=1e-5)
    # ... which is what SiglipModel's own forward gives for these images and captions.
    model = SiglipModel.from_pretrained(path).eval()
    bb = load_backbone(path)
    imgs = [Image.open(Path(tmp_path / "imgs") / k).convert("RGB") for k in keys]
    with torch.inference_mode():
        out = model(pixel_values=bb.image_batch(imgs), **bb.tokenize(ps.texts))
    np.testing.assert_allclose(by_hand, torch.sigmoid(out.logits_per_image).numpy(), atol=1e-4)
    metrics = run_zero_shot(store, out_dir=tmp_path / "zs").metrics
    assert metrics["scoring"]["scoring"] == "sigmoid" and metrics["scoring"]["logit_bias"] == pytest.approx(-2.5)


def test_a_planted_separable_siglip_store_is_classified_by_the_zero_shot_heads(tmp_path):
    from clip_heads.heads import get_head
    from clip_heads.store import PromptSet
    from clip_heads.writer import write_store

    rng = np.random.default_rng(0)
    n_classes, dim, n = 4, 32, 200
    V = rng.normal(size=(n_classes, dim))
    V /= np.linalg.norm(V, axis=1, keepdims=True)
    y = rng.integers(0, n_classes, n)
    X = V[y] + rng.normal(0, 0.12, (n, dim))
    ps = PromptSet("p", [f"c{i}" for i in range(n_classes)], ["a {}"], [f"a c{i}" for i in range(n_classes)],
                   V.astype(np.float32), np.zeros(n_classes, np.int64), np.arange(n_classes))
    write_store(tmp_path / "s.h5", X, y, [f"c{i}" for i in range(n_classes)], prompt_sets=[ps],
                model_id="google/siglip-base-patch16-224")
    with h5py.File(tmp_path / "s.h5", "r+") as f:  # SigLIP's rule, as an encode records it
        f.attrs.update(family="siglip", scoring="sigmoid", logit_scale=117.3, logit_bias=-12.9)
    with open_store(tmp_path / "s.h5") as s:
        Xs, ys, rule, V_store = s.embeddings(), s.labels, ScoringRule.from_attrs(s.attrs), s.prompt_set().class_vectors()
    bayes = float(((Xs / np.linalg.norm(Xs, axis=1, keepdims=True)) @ V_store.T).argmax(1).__eq__(ys).mean())
    assert rule.scoring == "sigmoid" and bayes > 0.95
    for name in ("zero-shot", "tip-adapter"):
        head = get_head(name)(prompt_embeds=V_store, logit_scale=rule.logit_scale)  # rows: the sorted labels
        acc = head.fit(Xs, ys).score(Xs, ys)
        assert acc > 0.9 and acc >= bayes - 0.02, name


# -- pre-projection features --------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_pre_projection_features_are_the_pooled_output_and_project_to_the_embeddings(kind, tiny_families, tmp_path):
    from clip_heads.verify import verify_store

    path = tiny_families[kind]
    imgs = colours(tmp_path / "imgs")
    # decode="exact": compared with the processor's own pixels at 1e-5 (auto resizes within 2/255 of them)
    r = encode(imgs, tmp_path / "s.h5", model=path, workers=0, progress=False, dtype="float32",
               templates=["bp-photo"], features="projected,pre-projection", decode="exact")
    with open_store(r.path) as s:
        X, pre, P, keys, attrs = s.embeddings(), s.pre_embeddings(), s.projection(), s.keys, s.attrs
        assert s.summary()["extras"] == [] and s.summary()["features"] == "projected,pre-projection"
    model, _, proc = reference_model(path)
    pix = proc(images=[Image.open(Path(imgs) / k).convert("RGB") for k in keys], return_tensors="pt")
    with torch.inference_mode():
        pooled = model.vision_model(**pix).pooler_output.numpy()
        ref = model.get_image_features(**pix).pooler_output.numpy()
    np.testing.assert_allclose(pre, pooled, atol=1e-5)
    assert attrs["features"] == "projected,pre-projection" and attrs["pre_dim"] == pre.shape[1]
    if kind == "clip":
        assert attrs["projection"] == "visual_projection" and P.shape == (X.shape[1], pre.shape[1])
        assert cosine(pre @ P.T, ref).min() >= 0.9999 and pre.shape[1] == 32 and X.shape[1] == 16
    else:  # SigLIP has no image projection: its attention-pooled output is the embedding
        assert attrs["projection"] == "none" and P is None and cosine(pre, ref).min() >= 0.9999
    assert cosine(X, ref).min() >= 0.9999
    with h5py.File(r.path, "r") as f:
        assert f["images/pre_embeds"].fletcher32 and isinstance(f["images/extras"].get("pre_embeds", getlink=True),
                                                                  h5py.SoftLink)
    assert verify_store(r.path).ok
    # The row invariant covers them: a store whose pre_embeds lose a row no longer opens.
    bad = tmp_path / "bad.h5"
    shutil.copy(r.path, bad)
    with h5py.File(bad, "r+") as f:
        f["images/pre_embeds"].resize(len(X) - 1, axis=0)
    with pytest.raises(ValueError, match="pre_embeds"):
        open_store(bad)
    # A finished store asked for other features is refused, naming them.
    with pytest.raises(ValueError, match="features"):
        encode(imgs, r.path, model=path, workers=0, progress=False, dtype="float32", templates=["bp-photo"])


def test_features_option_is_checked_before_anything_loads(tmp_path):
    res = CliRunner().invoke(main, ["encode", colours(tmp_path / "imgs", 1), "--out", str(tmp_path / "s.h5"),
                                    "--model", str(tmp_path / "nowhere"), "--features", "projected,logits"])
    assert res.exit_code == 2 and "logits" in res.output and "pre-projection" in res.output


def test_a_schema_1_store_still_opens_and_reads_as_clip(tmp_path):
    from clip_heads.writer import write_store

    rng = np.random.default_rng(0)
    write_store(tmp_path / "s.h5", rng.normal(size=(6, 8)), np.arange(6) % 2, ["a", "b"], model_id="m")
    with h5py.File(tmp_path / "s.h5", "r+") as f:
        f.attrs["schema_version"] = 1
        for k in ("family", "scoring", "logit_scale", "logit_bias"):
            f.attrs.pop(k, None)
    with open_store(tmp_path / "s.h5") as s:
        assert s.family == "clip" and ScoringRule.from_attrs(s.attrs) == ScoringRule("softmax", 100.0, 0.0)
        assert not s.has_pre_embeds and s.projection() is None


# -- heads across families ----------------------------------------------------------------------
def test_a_head_trained_on_one_familys_store_is_refused_on_anothers(tiny_families, tmp_path):
    from clip_heads.evaluate import evaluate_head, train_head

    imgs = colours(tmp_path / "imgs")
    stores = {k: encode(imgs, tmp_path / f"{k}.h5", model=tiny_families[k], workers=0, progress=False,
                        templates=["bp-photo"]).path for k in ("siglip", "siglip2-fixres")}  # both 32-d
    train_head("linear", stores["siglip"], tmp_path / "head", seed=0)
    with pytest.raises(ValueError) as e:
        evaluate_head(tmp_path / "head", stores["siglip2-fixres"], tmp_path / "eval")
    assert tiny_families["siglip"] in str(e.value) and "\n" not in str(e.value)
    res = CliRunner().invoke(main, ["evaluate", str(tmp_path / "head"), str(stores["siglip2-fixres"]),
                                    "--out", str(tmp_path / "eval2")])
    assert res.exit_code != 0 and "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1


def test_a_processor_whose_images_would_not_batch_is_refused_in_one_line():
    from transformers import ChineseCLIPImageProcessor

    # Shortest edge to 224 with no crop (an older Chinese-CLIP config): every image its own size.
    with pytest.raises(ValueError, match="without a centre crop") as e:
        image_recipe(ChineseCLIPImageProcessor(size={"shortest_edge": 224}, do_center_crop=False))
    assert "\n" not in str(e.value)


def test_hub_downloads_fetch_every_familys_tokenizer_and_transformers_weights_only():
    from fnmatch import fnmatch

    from clip_heads.identity import HUB_FILES

    wanted = ["config.json", "preprocessor_config.json", "tokenizer_config.json", "tokenizer.json", "vocab.json",
              "merges.txt", "vocab.txt", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model",
              "model.safetensors", "model-00001-of-00002.safetensors", "model.safetensors.index.json"]
    unwanted = ["open_clip_model.safetensors", "open_clip_pytorch_model.bin", "pytorch_model.bin", "flax_model.msgpack"]
    fetched = lambda name: any(fnmatch(name, p) for p in HUB_FILES)  # noqa: E731 (snapshot_download's allow_patterns)
    assert [n for n in wanted if not fetched(n)] == [] and [n for n in unwanted if fetched(n)] == []


def test_info_names_the_family_and_its_rule(tiny_families, tmp_path):
    store = encode(colours(tmp_path / "imgs", 1), tmp_path / "s.h5", model=tiny_families["siglip2"], workers=0,
                   progress=False, templates=["bp-photo"]).path
    res = CliRunner().invoke(main, ["info", str(store)])
    assert res.exit_code == 0 and "family     siglip2, scoring sigmoid at logit_scale 10" in res.output
    assert "logit_bias -2.5" in res.output and "schema 2" in res.output


def test_an_interrupted_pre_projection_encode_resumes_to_the_same_store(tiny_families, tmp_path, monkeypatch):
    from clip_heads.backbones.model import Backbone

    imgs = colours(tmp_path / "imgs", n=4)
    kw = dict(model=tiny_families["clip"], workers=0, progress=False, batch_size=4, templates=["bp-photo"],
              features="projected,pre-projection")
    whole = encode(imgs, tmp_path / "whole.h5", **kw).path
    calls, real = {"n": 0}, Backbone.image_features

    def interrupted(self, pixels, pre_projection=False):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, pixels, pre_projection)

    monkeypatch.setattr(Backbone, "image_features", interrupted)
    with pytest.raises(KeyboardInterrupt):
        encode(imgs, tmp_path / "cut.h5", **kw)
    monkeypatch.setattr(Backbone, "image_features", real)
    assert encode(imgs, tmp_path / "cut.h5", **kw).status == "resumed"
    with open_store(whole) as a, open_store(tmp_path / "cut.h5") as b:
        assert a.keys == b.keys and np.array_equal(a.embeddings(), b.embeddings())
        assert np.array_equal(a.pre_embeddings(), b.pre_embeddings()) and np.array_equal(a.projection(), b.projection())
