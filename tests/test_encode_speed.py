"""Encode throughput without a wrong number (issue 12): the CPU precision chosen from the CPU's
own flags and its vectors' distance to fp32, the reduced JPEG decodes against the model's own
processor, uint8 crops normalised on the device equal to the CPU path, and what a store records.

The model is a tiny random CLIP at the real 224 px recipe (patch 32: 49 tokens), so reduced
decoding is exercised at the sizes a real run uses.
"""
from __future__ import annotations

import functools
import importlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clip_heads.backbones import precision as prec
from clip_heads.backbones.model import Backbone
from clip_heads.backbones.preprocess import stack_batch
from clip_heads.datasets import open_source
from clip_heads.images import BadImage, open_rgb, reduced_decoding
from clip_heads.loading import DECODE_STEPS, DEFAULT_DECODE, decoded_pixels, resolve_decode
from conftest import SHARED_DATASETS, requires_shared, write_tiny_tokenizer

EMOTION6 = SHARED_DATASETS / "emotion6"


def build_clip224(out: Path, seed: int = 0) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    tok_dir = write_tiny_tokenizer(out / "_tok_src")
    tok = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"))
    torch.manual_seed(seed)
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    config = CLIPConfig(text_config=dict(vocab_size=len(tok), max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **common),
                        vision_config=dict(image_size=224, patch_size=32, **common), projection_dim=32)
    CLIPModel(config).eval().save_pretrained(out)
    tok.save_pretrained(out)
    CLIPImageProcessor().save_pretrained(out)  # OpenAI's recipe: shortest edge 224, centre crop 224, bicubic
    return out


@pytest.fixture(scope="module")
def clip224(tmp_path_factory) -> str:
    return str(build_clip224(tmp_path_factory.mktemp("clip224")))


@pytest.fixture(scope="module")
def e6_paths() -> list[str]:
    src = open_source(str(EMOTION6))
    return [src.path(int(i)) for i in np.random.default_rng(0).choice(len(src), 24, replace=False)]


@pytest.fixture(scope="module")
def large_jpegs(tmp_path_factory, e6_paths) -> list[str]:
    """Emotion6 photos upscaled to camera size (short side 1536) and saved as JPEGs, one of them
    greyscale and one with an EXIF rotation, so the reduced decodes cut 1/2..1/8 of real content."""
    root = tmp_path_factory.mktemp("large")
    out = []
    for i, p in enumerate(e6_paths[:8]):
        im = Image.open(p).convert("RGB")
        s = 1536 / min(im.size)
        im = im.resize((round(im.width * s), round(im.height * s)), Image.LANCZOS)
        q = root / f"l{i}.jpg"
        if i == 1:
            im.convert("L").save(q, quality=90)
        elif i == 2:
            exif = Image.Exif()
            exif[0x0112] = 6  # rotated 90 degrees
            im.save(q, quality=90, exif=exif)
        else:
            im.save(q, quality=90)
        out.append(str(q))
    return out


# -- precision -------------------------------------------------------------------------------
def _flags(monkeypatch, flags, capability="AVX512"):
    monkeypatch.setattr(prec, "_cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)


def test_auto_precision_is_read_from_the_cpu_flags(monkeypatch, tiny_clip):
    _flags(monkeypatch, {"avx2", "fma"}, "AVX2")
    assert prec.resolve_precision("cpu", "auto") == "fp32"
    assert Backbone(tiny_clip, device="cpu").precision_used == "fp32"
    _flags(monkeypatch, {"avx512f", "avx512_bf16"}, "AVX512")
    assert prec.resolve_precision("cpu", "auto") == "bf16-autocast"
    _flags(monkeypatch, {"amx_bf16", "amx_tile"}, "AVX512")
    assert prec.cpu_bf16_unit() == "amx_bf16"
    # A flag torch's kernels cannot use (built without AVX-512 dispatch) is no unit.
    _flags(monkeypatch, {"avx512_bf16"}, "AVX2")
    assert prec.resolve_precision("cpu", "auto") == "fp32"
    assert prec.resolve_precision("cpu", "fp32") == "fp32"  # --precision fp32 keeps exactness everywhere
    assert prec.resolve_precision("cuda", "auto") == "fp16-autocast"
    assert prec.resolve_precision("cpu", "int8") == "int8-dynamic"
    with pytest.raises(ValueError, match="runs on the CPU only"):
        prec.resolve_precision("cuda", "int8")
    with pytest.raises(ValueError, match=r"unknown precision 'fp8'; valid: auto, fp32, fp16, bf16, bf16-weights, int8"):
        prec.resolve_precision("cpu", "fp8")
    assert prec.same_precision("fp16", "fp16-autocast") and not prec.same_precision("fp32", "bf16-autocast")


@requires_shared
def test_cpu_precisions_stay_within_cosine_0999_of_fp32_on_real_jpegs(monkeypatch, clip224, e6_paths):
    _flags(monkeypatch, {"amx_bf16"})
    ref = Backbone(clip224, device="cpu", precision="fp32")
    x = stack_batch([ref.preprocess(open_rgb(p)) for p in e6_paths])
    want = ref.encode_pixels(x)
    auto = Backbone(clip224, device="cpu", precision="auto")
    assert auto.precision_used == "bf16-autocast"  # what a CPU with bf16 units gets by default
    for bb in (auto, Backbone(clip224, device="cpu", precision="int8")):
        got = bb.encode_pixels(x)
        assert got.dtype == torch.float32
        cos = torch.nn.functional.cosine_similarity(got, want)
        assert float(cos.min()) >= 0.999, (bb.precision_used, float(cos.min()))
        assert not torch.equal(got, want)  # it did compute differently
    # int8 quantises the image tower only: the projection (what pre-projection features map through) is exact.
    int8 = Backbone(clip224, device="cpu", precision="int8")
    assert torch.equal(int8.model.visual_projection.weight, ref.model.visual_projection.weight)
    assert torch.equal(int8.encode_texts(["a photo"]), ref.encode_texts(["a photo"]))


def test_frozen_only_precisions_refuse_a_trainable_model(tiny_clip):
    with pytest.raises(ValueError, match="frozen encode"):
        Backbone(tiny_clip, device="cpu", precision="int8", trainable=True)


# -- decode ----------------------------------------------------------------------------------
def _embed(bb, paths, decode, uint8):
    # decoded_pixels: what DecodedBatches runs for each image of a source (the JPEG reduction, its margin, the resize).
    x = stack_batch([decoded_pixels(functools.partial(open_rgb, p), bb.preprocess, decode, uint8) for p in paths])
    return x, bb.encode_pixels(x)


def _check_within_bound(bb, decode, e6_paths, large_jpegs) -> None:
    """``decode``'s embeddings at cosine >= 0.9999 against the model's own processor on the full
    decode, on Emotion6 and camera-sized JPEGs; its pixels within 2/255 of the reference's."""
    for paths in (e6_paths, large_jpegs):
        ref = torch.from_numpy(bb.processor(images=[open_rgb(p) for p in paths], return_tensors="np")["pixel_values"])
        want = bb.encode_pixels(ref)
        x, got = _embed(bb, paths, decode, uint8=True)
        assert x.dtype == torch.uint8
        cos = torch.nn.functional.cosine_similarity(got, want)
        assert float(cos.min()) >= 0.9999, (decode, float(cos.min()))
        std = torch.tensor(bb.preprocess.image_std)[:, None, None] * 255
        assert float(((bb.preprocess.normalize(x) - ref) * std).abs().max()) <= 2.0 + 1e-3, decode  # max pixel diff


@requires_shared
@pytest.mark.parametrize("decode", ["draft", "simplejpeg", "draft-torch", "simplejpeg-torch"])
def test_reduced_decodes_keep_cosine_09999_against_the_processor(clip224, e6_paths, large_jpegs, decode):
    if DECODE_STEPS[decode][0] == "simplejpeg":
        pytest.importorskip("simplejpeg")
    bb = Backbone(clip224, device="cpu", precision="fp32")
    _check_within_bound(bb, decode, e6_paths, large_jpegs)
    exact = stack_batch([bb.preprocess.pixels(open_rgb(p)) for p in e6_paths])
    got = _embed(bb, e6_paths, decode, uint8=True)[0]
    if DECODE_STEPS[decode][1] == "pil":
        # Emotion6's ~341x256 photos are too small to reduce: the same pixels as the full decode.
        assert torch.equal(got, exact)
    else:  # torch's resize: the same filter, its own rounding (not identical, else this tests nothing)
        assert not torch.equal(got, exact) and int((got.int() - exact.int()).abs().max()) <= 2
    # Large ones are decoded reduced, and not identical (else this test would test nothing).
    full = stack_batch([bb.preprocess.pixels(open_rgb(p)) for p in large_jpegs])
    assert not torch.equal(_embed(bb, large_jpegs, decode, uint8=True)[0], full)


@requires_shared
@pytest.mark.parametrize("has_simplejpeg", [True, False])
def test_the_path_auto_picks_keeps_the_bound(clip224, e6_paths, large_jpegs, monkeypatch, has_simplejpeg):
    """Whatever --decode auto resolves to (with and without the fast-decode extra) is held to the
    bound: changing DEFAULT_DECODE to a path that breaks it fails here."""
    import clip_heads.loading as loading

    if has_simplejpeg:
        pytest.importorskip("simplejpeg")
    monkeypatch.setattr(loading, "simplejpeg_available", lambda: has_simplejpeg)
    bb = Backbone(clip224, device="cpu", precision="fp32")
    auto = resolve_decode("auto", bb.preprocess)
    assert auto != "exact" and (has_simplejpeg or DECODE_STEPS[auto][0] != "simplejpeg")
    _check_within_bound(bb, auto, e6_paths, large_jpegs)


@pytest.mark.parametrize("recipe", [
    dict(),  # CLIP's: shortest edge 224, centre crop 224, bicubic
    dict(resample=2),  # bilinear
    dict(shortest_edge=32, crop_height=40, crop_width=24),  # a crop taller than the resize: padded
    dict(shortest_edge=48, crop_height=48, crop_width=48, resize_height=48, resize_width=48, do_center_crop=False),
])
def test_torch_resize_is_pils_filter_within_2_of_255(recipe):
    from clip_heads.backbones.preprocess import Preprocess

    p = Preprocess(**recipe)
    rng = np.random.default_rng(0)
    for h, w in ((256, 341), (500, 300), (20, 30), (224, 224), (1000, 999)):
        base = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)  # smooth content with edges
        img = Image.fromarray(base).resize((w, h), Image.NEAREST)
        ref, got = p.pixels(img), p.pixels(img, "torch")
        assert got.shape == ref.shape == (3, p.out_height, p.out_width) and got.dtype == np.uint8
        diff = np.abs(got.astype(int) - ref.astype(int))
        assert diff.max() <= 2 and diff.mean() < 0.05, (recipe, (h, w), diff.max(), diff.mean())
        assert np.array_equal(p(img, "torch"), p.normalize(torch.from_numpy(got)[None])[0].numpy())
    # A filter torch has no antialiased uint8 kernel for resizes with PIL: the same pixels.
    lanczos = Preprocess(resample=1)
    assert np.array_equal(lanczos.pixels(img, "torch"), lanczos.pixels(img))
    with pytest.raises(ValueError, match=r"unknown resizer 'cv2'; valid: pil, torch"):
        p.pixels(img, "cv2")


def test_reduced_decode_keeps_orientation_and_size(tmp_path):
    rng = np.random.default_rng(0)
    a = (rng.random((1200, 1800, 3)) * 40 + np.linspace(0, 200, 1800)[None, :, None]).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(a).save(tmp_path / "r.jpg", quality=90, exif=exif)
    full = open_rgb(tmp_path / "r.jpg")
    assert full.size == (1200, 1800)  # rotated
    for decode in ("draft", "simplejpeg"):
        with reduced_decoding(decode, 448):
            small = open_rgb(tmp_path / "r.jpg")
        assert small.size == (600, 900), decode  # 1/2 keeps both sides >= 448; 1/4 would not
        ref = np.asarray(full.resize(small.size, Image.BOX), dtype=float)
        assert np.abs(np.asarray(small, dtype=float) - ref).mean() < 3, decode  # the same picture, same way up
    with reduced_decoding("draft", 448):  # not a JPEG: decoded in full
        Image.fromarray(a).save(tmp_path / "r.png")
        assert open_rgb(tmp_path / "r.png").size == (1800, 1200)


@pytest.mark.parametrize("decode", ["draft", "simplejpeg"])
def test_reduced_decode_refuses_a_truncated_jpeg_as_the_full_one_does(tmp_path, decode):
    buf = io.BytesIO()
    Image.fromarray(np.full((1000, 1000, 3), 128, np.uint8)).save(buf, format="JPEG")
    (tmp_path / "t.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(BadImage, match="truncated JPEG"):
        open_rgb(tmp_path / "t.jpg")
    with reduced_decoding(decode, 224), pytest.raises(BadImage, match="truncated JPEG"):
        open_rgb(tmp_path / "t.jpg")


def test_uint8_crops_normalised_on_the_device_equal_the_float_path(tiny_clip, tmp_path):
    bb = Backbone(tiny_clip, device="cpu", precision="fp32")
    rng = np.random.default_rng(1)
    imgs = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((50, 70), (40, 31), (30, 30))]
    want = stack_batch([bb.preprocess(im) for im in imgs])
    crops = stack_batch([bb.preprocess.pixels(im) for im in imgs])
    assert crops.dtype == torch.uint8 and crops.shape == want.shape
    assert torch.equal(bb.preprocess.normalize(crops), want)  # bit for bit
    assert torch.equal(bb.encode_pixels(crops), bb.encode_pixels(want))


def test_decode_resolution(tiny_clip, monkeypatch):
    import clip_heads.loading as loading
    from clip_heads.catalog import DECODE_PATHS

    assert set(DECODE_PATHS) == {"auto", *DECODE_STEPS}  # every name the CLI offers is a path, and back
    bb = Backbone(tiny_clip, device="cpu")
    assert resolve_decode("exact", bb.preprocess) == "exact"
    monkeypatch.setattr(loading, "simplejpeg_available", lambda: True)
    assert resolve_decode("auto", bb.preprocess) == DEFAULT_DECODE == "draft-torch"
    monkeypatch.setattr(loading, "DEFAULT_DECODE", "simplejpeg-torch")
    assert resolve_decode("auto", bb.preprocess) == "simplejpeg-torch"
    monkeypatch.setattr(loading, "simplejpeg_available", lambda: False)
    assert resolve_decode("auto", bb.preprocess) == "draft-torch"  # without the fast-decode extra
    for path, twin in (("simplejpeg", "draft"), ("simplejpeg-torch", "draft-torch")):
        with pytest.raises(ValueError, match=rf"--decode {path} needs the simplejpeg package.*--decode {twin}\b"):
            resolve_decode(path, bb.preprocess)
    with pytest.raises(ValueError, match=r"unknown --decode 'turbo'; valid: auto, exact, draft, simplejpeg, "
                                         r"draft-torch, simplejpeg-torch"):
        resolve_decode("turbo", bb.preprocess)


# -- the commit thread ---------------------------------------------------------------------------
def test_commit_thread_commits_in_order_and_hands_back_the_writers_error():
    import threading

    from clip_heads.overlap import CommitThread

    done = []
    with CommitThread(done.append, depth=2) as ct:
        for i in range(50):
            ct.put(i)
    assert done == list(range(50))

    def failing(i):
        if i == 3:
            raise OSError(28, "No space left on device")
        done.append(i)

    done.clear()
    with pytest.raises(OSError, match="No space left"):
        with CommitThread(failing, depth=1) as ct:
            for i in range(50):
                ct.put(i)
    assert done == [0, 1, 2]  # nothing after the failed block is committed

    # Leaving by an exception: the commit in progress ends whole, the queued ones are dropped.
    started, release = threading.Event(), threading.Event()
    done.clear()

    def slow(i):
        started.set()
        release.wait(10)
        done.append(i)

    with pytest.raises(KeyboardInterrupt):
        with CommitThread(slow, depth=2) as ct:
            ct.put(0)
            started.wait(10)
            ct.put(1)
            ct.put(2)
            threading.Timer(0.3, release.set).start()
            raise KeyboardInterrupt
    assert done == [0]


def test_recorded_precision_names_resolve_to_themselves():
    for short, recorded in prec.PRECISION_NAMES.items():
        dev = "cpu" if short in ("fp32", "int8", "bf16-weights", "bf16") else "cuda"
        assert prec.resolve_precision(dev, recorded) == recorded == prec.resolve_precision(dev, short)
    assert prec.autocast_for("cpu", "bf16-autocast").fast_dtype == torch.bfloat16
    assert prec.autocast_for("cpu", "bf16").fast_dtype == torch.bfloat16
    assert not hasattr(prec.autocast_for("cpu", "fp32"), "fast_dtype")


# -- the store says how its vectors were computed; a resume must match -----------------------
@pytest.fixture(scope="module")
def e6small(tiny_clip, tmp_path_factory):
    """A 19-item Emotion6-shaped source (one unreadable), batch 2 (10 blocks), and the store an
    uninterrupted encode writes in a forked child (one torch thread, as the kill runs)."""
    from faultkit import invoke, make_emotion6, run_forked

    root = tmp_path_factory.mktemp("e6s")
    src = make_emotion6(root / "src", per_class=3)
    args = [str(src), "--model", tiny_clip, "-b", "2", "-w", "0", "--dtype", "float32", "-t", "bp-emotion"]
    ref = root / "ref.h5"
    assert run_forked(lambda: invoke(["-q", "encode", *args, "--out", str(ref)]))[:2] == ("exit", 0)
    return {"args": args, "ref": ref}



def _interrupt_after_two_commits(monkeypatch, encode_mod) -> None:
    """The encode stops (as on Ctrl-C) when it comes to commit its third block."""
    real, calls = encode_mod.commit_block, {"n": 0}

    def stop_after_two(*a, **k):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(encode_mod, "commit_block", stop_after_two)

def test_store_records_precision_and_decode_and_a_resume_must_match(e6small, tmp_path, monkeypatch):
    from faultkit import invoke, one_line_error

    encode_mod = importlib.import_module("clip_heads.encode")  # the package attribute is the function
    from clip_heads.journal import StoreWriter
    from clip_heads.store import open_store

    with open_store(e6small["ref"]) as s:
        assert (s.attrs["precision"], s.attrs["decode"]) == ("fp32", DEFAULT_DECODE)  # this CPU has no bf16 unit
    # A run stopped after its first batches leaves a journal recording both.
    out = tmp_path / "s.h5"
    _interrupt_after_two_commits(monkeypatch, encode_mod)
    _flags(monkeypatch, {"amx_bf16"})  # as on a CPU with bf16 units: auto is bf16 autocast
    code, _ = invoke(["-q", "encode", *e6small["args"], "--out", str(out)])
    monkeypatch.undo()
    assert code == 130
    attrs = StoreWriter.read_partial_attrs(out)
    assert (attrs["precision"], attrs["decode"]) == ("bf16-autocast", DEFAULT_DECODE)
    code, output = invoke(["-q", "encode", *e6small["args"], "--out", str(out), "--precision", "fp32"])
    assert code != 0
    one_line_error(output, "--precision bf16 (precision=bf16-autocast), but this run has --precision fp32")
    code, output = invoke(["-q", "encode", *e6small["args"], "--out", str(out), "--decode", "exact"])
    assert code != 0  # this CPU resolves auto to fp32 too, so either refusal is right; both name the flag
    one_line_error(output, "to resume")
    _flags(monkeypatch, {"amx_bf16"})
    code, output = invoke(["-q", "encode", *e6small["args"], "--out", str(out), "--decode", "exact"])
    one_line_error(output, f"--decode {DEFAULT_DECODE} (decode={DEFAULT_DECODE}), but this run has --decode exact")
    code, output = invoke(["-q", "encode", *e6small["args"], "--out", str(out)])
    assert code == 0 and "resumed" in output, output
    with open_store(out) as s:
        assert (s.attrs["precision"], s.attrs["decode"]) == ("bf16-autocast", DEFAULT_DECODE)
    monkeypatch.undo()
    # A complete store: an explicit other precision or decode is refused, auto is not.
    code, output = invoke(["-q", "encode", *e6small["args"], "--out", str(e6small["ref"]), "--decode", "exact"])
    one_line_error(output, f"decode={DEFAULT_DECODE!r}, but this run has decode='exact'")
    code, output = invoke(["-q", "encode", *e6small["args"], "--out", str(e6small["ref"]), "--precision", "fp32"])
    assert code == 0, output



def test_auto_resumes_a_journal_on_the_path_it_was_started_with(e6small, tmp_path, monkeypatch):
    """A journal begun under another meaning of auto (an older release's "draft") is resumed by a
    plain rerun on that path, to the store an uninterrupted --decode draft run writes."""
    from faultkit import assert_same_store, invoke

    encode_mod = importlib.import_module("clip_heads.encode")
    from clip_heads.store import open_store

    assert DEFAULT_DECODE != "draft"
    whole = tmp_path / "whole.h5"
    assert invoke(["-q", "encode", *e6small["args"], "--out", str(whole), "--decode", "draft"])[0] == 0
    out = tmp_path / "s.h5"
    _interrupt_after_two_commits(monkeypatch, encode_mod)
    assert invoke(["-q", "encode", *e6small["args"], "--out", str(out), "--decode", "draft"])[0] == 130
    monkeypatch.undo()
    code, output = invoke(["-q", "encode", *e6small["args"], "--out", str(out)])  # --decode auto
    assert code == 0 and "resumed" in output, output
    with open_store(out) as s:
        assert s.attrs["decode"] == "draft"
    assert_same_store(out, whole)

def test_sigkill_while_the_writer_thread_holds_uncommitted_blocks_resumes_to_the_same_store(e6small, tmp_path):
    """The forward runs ahead of the disk: the kill lands with one block being committed and two
    more embedded and queued; none of them is in the journal, and the rerun embeds them again."""
    import json
    import os
    import signal
    import time

    encode_mod = importlib.import_module("clip_heads.encode")  # the package attribute is the function
    from faultkit import assert_same_store, invoke, run_forked
    from clip_heads.journal import journal_progress

    out, seen = tmp_path / "k.h5", tmp_path / "seen.json"

    def run():
        threads = []

        class Watched(encode_mod.CommitThread):
            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                threads.append(self)

        real = encode_mod.commit_block
        calls = {"n": 0}

        def commit(*a, **k):
            calls["n"] += 1
            if calls["n"] == 4:  # three blocks committed; wait until two more are queued behind this one
                deadline = time.time() + 60
                while time.time() < deadline and not threads[0]._queue.full():
                    time.sleep(0.01)
                seen.write_text(json.dumps({"queued": threads[0]._queue.qsize()}))
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*a, **k)

        encode_mod.CommitThread, encode_mod.commit_block = Watched, commit
        return invoke(["-q", "encode", *e6small["args"], "--out", str(out)])

    how, sig, _ = run_forked(run)
    assert (how, sig) == ("signal", signal.SIGKILL)
    assert json.loads(seen.read_text())["queued"] == 2  # blocks 5 and 6 embedded, not committed
    assert journal_progress(out)["items"] == 6  # blocks 1-3 of 2 items; block 4 was being committed
    # The rerun forked too: the reference's prompts were embedded on one torch thread, as these will be.
    how, code, res = run_forked(lambda: invoke(["encode", *e6small["args"], "--out", str(out)]))
    assert (how, code) == ("exit", 0) and res["value"][0] == 0 and "resumed" in res["value"][1], res
    assert_same_store(e6small["ref"], out)
