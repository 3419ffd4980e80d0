import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

from clip_heads.backbone import Backbone, Preprocess
from clip_heads.cli import main
from clip_heads.encode import encode
from clip_heads.store import StoreError, open_store
from clip_heads.journal import StoreWriter, journal_progress
from conftest import SHARED_DATASETS, requires_shared


def make_folder(root: Path, n_per_class=6, classes=("cat", "dog", "eel"), seed=0, sizes=((40, 30), (31, 47), (64, 64))):
    """A small image folder with varied sizes, modes and formats."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            w, h = sizes[i % len(sizes)]
            arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
            arr[..., c] = 255  # a class-coloured channel, so classes differ visibly
            img = Image.fromarray(arr)
            if i % 3 == 0:
                img.save(d / f"{i:03d}.jpg", quality=90)
            elif i % 3 == 1:
                img.save(d / f"{i:03d}.png")
            else:
                img.convert("L").save(d / f"{i:03d}.jpeg")
    return root


def reference_image_embeds(model_dir, images):
    model = CLIPModel.from_pretrained(model_dir).eval()
    proc = CLIPImageProcessor.from_pretrained(model_dir)
    with torch.inference_mode():
        pix = proc(images=images, return_tensors="pt")["pixel_values"]
        return model.get_image_features(pixel_values=pix).pooler_output.numpy()


def cosine(a, b):
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return (a * b).sum(-1)


# -- fidelity -------------------------------------------------------------------------------
@pytest.mark.parametrize("processor_kwargs", [{}, {"size": {"shortest_edge": 30}, "crop_size": {"height": 30, "width": 30}}])
def test_preprocess_matches_clip_image_processor_on_generated_images(tmp_path, processor_kwargs):
    proc = CLIPImageProcessor(**processor_kwargs)  # {} is the ViT-B/32 recipe: 224, bicubic, OpenAI mean/std
    ours = Preprocess.from_processor(proc)
    make_folder(tmp_path, n_per_class=3, sizes=((640, 480), (17, 300), (225, 224), (100, 100)))
    for p in sorted(tmp_path.rglob("*.*")):
        img = Image.open(p).convert("RGB")
        ref = proc(images=img, return_tensors="np")["pixel_values"][0]
        got = ours(img)
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() <= 1e-3, p


@requires_shared
def test_preprocess_matches_clip_image_processor_on_real_jpegs():
    from clip_heads.datasets import open_source

    proc = CLIPImageProcessor()
    ours = Preprocess.from_processor(proc)
    src = open_source(str(SHARED_DATASETS / "emotion6"))
    worst = 0.0
    for i in range(0, len(src), 99):  # 20 real JPEGs across all classes
        img = src.load(i)
        ref = proc(images=img, return_tensors="np")["pixel_values"][0]
        worst = max(worst, float(np.abs(ours(img) - ref).max()))
    assert worst <= 1e-3


def test_stored_embeddings_equal_reference_forward(tiny_clip, tmp_path):
    root = make_folder(tmp_path / "imgs")
    r = encode(str(root), tmp_path / "s.h5", model=tiny_clip, workers=0, progress=False, dtype="float32")
    assert r.n_images == 18 and r.n_skipped == 0
    with open_store(r.path) as s:
        X, y, classes = s.arrays()
        keys = s.keys
        ps = s.prompt_set("bp-photo")
    assert classes == ["cat", "dog", "eel"] and keys[0] == "cat/000.jpg"
    imgs = [Image.open(root / k).convert("RGB") for k in keys]
    ref = reference_image_embeds(tiny_clip, imgs)
    assert cosine(X, ref).min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1.0, atol=1e-5)
    # The prompt side equals the reference text tower too.
    tok = AutoTokenizer.from_pretrained(tiny_clip)
    model = CLIPModel.from_pretrained(tiny_clip).eval()
    with torch.inference_mode():
        t = model.get_text_features(**tok(ps.texts, padding=True, return_tensors="pt")).pooler_output.numpy()
    assert ps.texts == ["a photo of a cat", "a photo of a dog", "a photo of a eel"]
    assert cosine(ps.embeds, t).min() >= 0.9999


def test_float16_store_keeps_fidelity(tiny_clip, tmp_path):
    root = make_folder(tmp_path / "imgs", n_per_class=2)
    encode(str(root), tmp_path / "s.h5", model=tiny_clip, workers=1, progress=False)
    with open_store(tmp_path / "s.h5") as s:
        assert s.attrs["dtype"] == "float16"
        X, keys = s.embeddings(), s.keys
    ref = reference_image_embeds(tiny_clip, [Image.open(root / k).convert("RGB") for k in keys])
    assert cosine(X, ref).min() >= 0.9999


# -- bad images ------------------------------------------------------------------------------
def test_bad_images_are_skipped_and_recorded(tiny_clip, tmp_path, monkeypatch):
    root = make_folder(tmp_path / "imgs", n_per_class=2)
    bad = root / "cat"
    (bad / "zero.jpg").write_bytes(b"")
    (bad / "text.jpg").write_text("this is not an image")
    good = (root / "cat" / "000.jpg").read_bytes()
    (bad / "truncated.jpg").write_bytes(good[: len(good) // 2])
    Image.new("RGB", (300, 300)).save(bad / "bomb.png")
    # A decompression bomb relative to a lowered limit (the real limit is ~89 Mpx).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300 * 300 // 3)
    r = encode(str(root), tmp_path / "s.h5", model=tiny_clip, workers=0, progress=False)
    with open_store(r.path) as s:
        skipped = dict(s.skipped())
        keys = s.keys
    assert set(skipped) == {"cat/zero.jpg", "cat/text.jpg", "cat/truncated.jpg", "cat/bomb.png"}
    assert r.n_skipped == 4 and r.n_images == 6 and len(keys) == 6
    assert "bomb" in skipped["cat/bomb.png"].lower()
    assert all(reason for reason in skipped.values())
    assert not set(skipped) & set(keys)


# -- resume ------------------------------------------------------------------------------------
def _store_content(path):
    with open_store(path) as s:
        return s.keys, s.embeddings(), s.labels, s.skipped(), {n: s.prompt_set(n).embeds for n in s.prompt_sets()}


def test_sigkilled_cli_encode_resumes_to_the_same_store(tiny_clip, tmp_path):
    root = make_folder(tmp_path / "imgs", n_per_class=60, sizes=((48, 40),))
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff")  # a skip recorded before the kill
    args = [str(root), "--model", tiny_clip, "--batch-size", "2", "--workers", "0", "--dtype", "float32"]
    ref = tmp_path / "ref.h5"
    assert CliRunner().invoke(main, ["-q", "encode", *args, "--out", str(ref)]).exit_code == 0

    out = tmp_path / "killed.h5"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "clip_heads.cli", "-q", "encode", *args, "--out", str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    part = StoreWriter.partial_path(out)
    deadline = time.time() + 120
    done = 0
    while time.time() < deadline and proc.poll() is None:
        if part.exists():
            try:  # the journal reads up to its last whole record while it is being written
                done = journal_progress(out)["items"]
            except (OSError, StoreError):
                done = 0
            if done >= 40:
                break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 40 <= done < 181 and part.exists() and not out.exists(), "the kill must land mid-run"

    res = CliRunner().invoke(main, ["encode", *args, "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "resumed" in res.output
    k1, x1, y1, s1, p1 = _store_content(ref)
    k2, x2, y2, s2, p2 = _store_content(out)
    assert k1 == k2 and len(k1) == 180
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    assert s1 == s2 == [("dog/broken.jpg", s1[0][1])]
    assert p1.keys() == p2.keys() and all(np.array_equal(p1[k], p2[k]) for k in p1)


def test_rerun_of_complete_store_is_noop_and_mismatch_refused(tiny_clip, tmp_path):
    root = make_folder(tmp_path / "imgs", n_per_class=2)
    out = tmp_path / "s.h5"
    encode(str(root), out, model=tiny_clip, workers=0, progress=False)
    before = out.stat().st_mtime_ns
    r = encode(str(root), out, model=tiny_clip, workers=0, progress=False)
    assert r.status == "up-to-date" and out.stat().st_mtime_ns == before

    other = tmp_path / "other-model"
    from conftest import build_tiny_clip

    build_tiny_clip(other, seed=1)
    res = CliRunner().invoke(main, ["encode", str(root), "--out", str(out), "--model", str(other)])
    assert res.exit_code == 1 and "model_id" in res.output and "--overwrite" in res.output
    assert out.stat().st_mtime_ns == before  # nothing already written is lost

    (root / "cat" / "new.png").write_bytes((root / "cat" / "001.png").read_bytes())
    res = CliRunner().invoke(main, ["encode", str(root), "--out", str(out), "--model", tiny_clip])
    assert res.exit_code == 1 and "source_fingerprint" in res.output

    r = encode(str(root), out, model=str(other), workers=0, progress=False, overwrite=True)
    assert r.status == "encoded" and r.n_images == 7
    with open_store(out) as s:
        assert s.model_id == str(other)


def test_limit_is_a_seeded_sample_in_source_order(tiny_clip, tmp_path):
    root = make_folder(tmp_path / "imgs", n_per_class=5)
    a = encode(str(root), tmp_path / "a.h5", model=tiny_clip, workers=0, progress=False, limit=7, seed=3)
    b = encode(str(root), tmp_path / "b.h5", model=tiny_clip, workers=0, progress=False, limit=7, seed=4)
    with open_store(a.path) as sa, open_store(b.path) as sb:
        ka, kb = sa.keys, sb.keys
    assert len(ka) == 7 and ka == sorted(ka, key=lambda k: (k.split("/")[0], k)) and ka != kb


def test_a_plain_folder_of_emotion_classes_gets_the_emotion_prompt_sets(tiny_clip, tmp_path):
    from clip_heads.prompts import EMOTION_DEFAULTS, OBJECT_DEFAULTS

    feelings = make_folder(tmp_path / "feelings", n_per_class=1, classes=("Anger", "fear", "joy"))
    things = make_folder(tmp_path / "things", n_per_class=1)
    with open_store(encode(str(feelings), tmp_path / "f.h5", model=tiny_clip, workers=0, progress=False).path) as s:
        assert s.attrs["source"]["format"] == "folder" and s.prompt_sets() == sorted(EMOTION_DEFAULTS)
    with open_store(encode(str(things), tmp_path / "t.h5", model=tiny_clip, workers=0, progress=False).path) as s:
        assert s.prompt_sets() == sorted(OBJECT_DEFAULTS)


# -- prompts added later ---------------------------------------------------------------------
def test_prompts_added_later_with_the_store_model(tiny_clip, tmp_path):
    root = make_folder(tmp_path / "imgs", n_per_class=2)
    out = tmp_path / "s.h5"
    encode(str(root), out, model=tiny_clip, workers=0, progress=False)
    with open_store(out) as s:
        X_before = s.embeddings()
    tpl = tmp_path / "mine.txt"
    tpl.write_text("# my templates\na picture of {}\n{} in the wild\n")
    res = CliRunner().invoke(main, ["prompts", str(out), "--templates", str(tpl)])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["prompts", str(out), "-t", "bp-emotion", "--classes", "fi", "--name", "fi-emotions"])
    assert res.exit_code == 0, res.output
    with open_store(out) as s:
        np.testing.assert_array_equal(s.embeddings(), X_before)
        mine = s.prompt_set("mine")
        fi = s.prompt_set("fi-emotions")
    assert mine.texts[:3] == ["a picture of cat", "a picture of dog", "a picture of eel"] and mine.class_vectors().shape == (3, 16)
    assert len(fi.classes) == 8 and fi.texts[0] == "an image that evokes the emotion of amusement"
    b = Backbone(tiny_clip, device="cpu")
    assert cosine(mine.embeds, b.encode_texts(mine.texts).numpy()).min() >= 0.9999
    res = CliRunner().invoke(main, ["prompts", str(out), "--templates", str(tpl)])
    assert res.exit_code == 1 and "already exist" in res.output


def test_synonyms_expand_classes(tiny_clip, tmp_path):
    root = make_folder(tmp_path / "imgs", n_per_class=1)
    out = tmp_path / "s.h5"
    encode(str(root), out, model=tiny_clip, workers=0, progress=False, templates=["bp-photo"])
    syn = tmp_path / "syn.json"
    syn.write_text('{"cat": ["cat", "kitten"], "eel": ["eel"]}')
    res = CliRunner().invoke(main, ["prompts", str(out), "-t", "bp-photo", "--synonyms", str(syn), "--name", "syn"])
    assert res.exit_code == 0, res.output
    with open_store(out) as s:
        ps = s.prompt_set("syn")
    assert ps.texts == ["a photo of a cat", "a photo of a kitten", "a photo of a dog", "a photo of a eel"]
    assert list(ps.class_id) == [0, 0, 1, 2]


# -- CLI errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, code, needle",
    [
        (["encode", "/no/such/dir", "--out", "X"], 1, "/no/such/dir"),
        (["encode", "IMGS", "--out", "X", "--format", "tfrecord"], 2, "tfrecord"),
        (["encode", "IMGS", "--out", "X", "--model", "/no/model/here"], 1, "--model PATH"),
        (["encode", "IMGS", "--out", "X", "--templates", "BADTPL"], 1, "exactly one '{}'"),
        (["encode", "IMGS", "--out", "X", "--device", "cuda:7"], 1, "cuda:7"),
        (["encode", "IMGS", "--out", "X", "--batch-size", "0"], 2, "batch-size"),
        (["info", "/no/store.h5"], 1, "/no/store.h5"),  # a missing file is failed work (issue 9)
        (["info", "NOTSTORE"], 1, "not a readable HDF5"),
    ],
)
def test_cli_errors_are_one_line(tiny_clip, tmp_path, argv, code, needle):
    root = make_folder(tmp_path / "imgs", n_per_class=1)
    (tmp_path / "bad.txt").write_text("no placeholder here\n")
    (tmp_path / "junk.h5").write_text("junk")
    subst = {"IMGS": str(root), "X": str(tmp_path / "o.h5"), "BADTPL": str(tmp_path / "bad.txt"), "NOTSTORE": str(tmp_path / "junk.h5")}
    argv = [subst.get(a, a) for a in argv]
    if argv[0] == "encode" and "--model" not in argv:
        argv += ["--model", tiny_clip]
    res = CliRunner().invoke(main, argv)
    assert res.exit_code == code, res.output
    assert needle in res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "o.h5").exists()


# -- sharding past one GPU ------------------------------------------------------------------------
def test_shards_merge_into_the_unsharded_store(tiny_clip, tmp_path):
    root = make_folder(tmp_path / "imgs", n_per_class=5)
    (root / "eel" / "bad.jpg").write_bytes(b"")
    common = [str(root), "--model", tiny_clip, "--workers", "0", "--dtype", "float32", "--batch-size", "4"]
    runner = CliRunner()
    assert runner.invoke(main, ["-q", "encode", *common, "--out", str(tmp_path / "full.h5")]).exit_code == 0
    for i in range(3):
        res = runner.invoke(main, ["-q", "encode", *common, "--shard", f"{i}/3", "--out", str(tmp_path / f"s{i}.h5")])
        assert res.exit_code == 0, res.output
    shards = [str(tmp_path / f"s{i}.h5") for i in (2, 0, 1)]  # any order on the command line
    res = runner.invoke(main, ["merge", str(tmp_path / "merged.h5"), *shards[:2]])
    assert res.exit_code == 1 and "shard indices [0, 2] of 3" in res.output
    res = runner.invoke(main, ["merge", str(tmp_path / "merged.h5"), *shards])
    assert res.exit_code == 0, res.output
    k1, x1, y1, s1, p1 = _store_content(tmp_path / "full.h5")
    k2, x2, y2, s2, p2 = _store_content(tmp_path / "merged.h5")
    assert k1 == k2 and len(k1) == 15 and s1 == s2
    np.testing.assert_allclose(x1, x2, atol=1e-6)
    np.testing.assert_array_equal(y1, y2)
    assert p1.keys() == p2.keys()
    res = runner.invoke(main, ["encode", *common, "--shard", "3/3", "--out", str(tmp_path / "x.h5")])
    assert res.exit_code == 1 and "3/3" in res.output


class _InterpolationMode:
    """Stands in for torchvision's InterpolationMode: an enum member whose value is a name."""

    def __init__(self, value):
        self.value = value


@pytest.mark.parametrize(
    "value, code",
    [(3, 3), (Image.Resampling.BICUBIC, 3), ("bilinear", 2), (_InterpolationMode("bicubic"), 3), (_InterpolationMode("nearest"), 0)],
)
def test_resample_from_either_processor_backend(value, code):
    from clip_heads.backbones.preprocess import resample_code as _resample_code

    assert _resample_code(value) == code


def test_unknown_resample_is_refused():
    from clip_heads.backbones.preprocess import resample_code as _resample_code

    with pytest.raises(ValueError, match="spline36"):
        _resample_code("spline36")
