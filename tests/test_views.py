"""encode --views K: augmented views in the store (issue 11), checked against the recipe computed
by hand, through kills, resumes, shards, merges and a second engine, and read by the heads as
the store writes them."""
from __future__ import annotations

import json
import os
import signal
import tracemalloc

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from clip_heads.augment import recipe, view_boxes
from clip_heads.encode import encode
from clip_heads.engines import decode_block
from clip_heads.journal import StoreWriter, journal_progress
from clip_heads.store import StoreError, l2_normalize, open_store
from clip_heads.verify import verify_store
from clip_heads.writer import merge_stores, write_store
from faultkit import assert_same_store, invoke, one_line_error, run_forked
from scalekit import jpeg_folder

K = 3
KW = dict(workers=0, progress=False, batch_size=4, dtype="float32", templates=["bp-emotion"], precision="fp32",
          decode="exact")


@pytest.fixture(scope="module")
def vs(tiny_clip, tmp_path_factory):
    """A 13-item folder (one unreadable) encoded with 3 views and the pre-projection features."""
    root = tmp_path_factory.mktemp("views")
    src = jpeg_folder(root / "imgs", n_per_class=4)
    (src / "joy" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    store = encode(str(src), root / "v.h5", model=tiny_clip, views=K, features="projected,pre-projection", **KW).path
    return {"src": src, "store": store, "root": root}


def _by_hand(model_dir, image: Image.Image, key: str, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The recipe written out: the box and flip of each view from (seed, key, j), the crop resized to
    the model's 30x30 input (bicubic), CLIP's normalisation, the vision tower and its projection."""
    from transformers import CLIPModel

    cfg = json.loads((open(os.path.join(model_dir, "preprocessor_config.json"))).read())
    mean, std = np.asarray(cfg["image_mean"], np.float32), np.asarray(cfg["image_std"], np.float32)
    xs = []
    for box, flipped in view_boxes(image.width, image.height, key, k, seed):
        v = image.resize((30, 30), Image.Resampling.BICUBIC, box=box)
        if flipped:
            v = v.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        xs.append(((np.asarray(v, np.float32) / 255 - mean) / std).transpose(2, 0, 1))
    model = CLIPModel.from_pretrained(model_dir).eval()
    with torch.no_grad():
        pooled = model.vision_model(pixel_values=torch.from_numpy(np.stack(xs))).pooler_output
        emb = model.visual_projection(pooled)
    return emb.numpy(), pooled.numpy()


def test_each_view_is_the_recipe_recomputed_by_hand(vs, tiny_clip):
    with open_store(vs["store"]) as s:
        keys, X, V, PV = s.keys, s.embeddings(), s.views(), s.views(pre_projection=True)
        assert s.views_recipe == recipe(K, 0) and s.n_views == K
        assert [sk for sk, _ in s.skipped()] == ["joy/broken.jpg"]
    assert V.shape == (12, K, 16) and PV.shape == (12, K, 32) and len(keys) == 12  # the skipped image has no row
    for i in (0, 5, 11):
        emb, pooled = _by_hand(tiny_clip, Image.open(vs["src"] / keys[i]).convert("RGB"), keys[i], K, 0)
        np.testing.assert_allclose(V[i], l2_normalize(emb), rtol=0, atol=2e-5)  # normalised like the embeds
        np.testing.assert_allclose(PV[i], pooled, rtol=0, atol=2e-4)  # the pooled output, as it came
    # Views are other pictures of the image: near it, not equal to it nor to each other.
    cos_plain = np.einsum("nkd,nd->nk", V, X)
    assert 0.5 < cos_plain.min() and cos_plain.max() < 1 - 1e-5  # (a tiny random model maps every picture close)
    assert min(1 - V[i, a] @ V[i, b] for i in range(12) for a in range(K) for b in range(a)) > 1e-5
    rep = verify_store(vs["store"])
    assert rep.ok and rep.rows == 12, rep.text
    code, out = invoke(["info", str(vs["store"])])
    assert code == 0 and "views      3 per image (+ pre-projection): random-resized crop, scale [0.5, 1.0]" in out
    assert "seed 0, recipe version 1" in out


def test_view_pixels_depend_on_the_image_alone_not_its_block(vs):
    from clip_heads.backbones.preprocess import Preprocess
    from clip_heads.datasets import open_source

    src = open_source(str(vs["src"]))
    p = Preprocess(shortest_edge=30, crop_height=30, crop_width=30)
    whole = decode_block(src, np.arange(8), p, views=K, views_seed=0)
    part = decode_block(src, np.arange(5, 8), p, views=K, views_seed=0)  # another block, another shard, a resume
    assert whole["view_pixels"].shape == (8 * K, 3, 30, 30)
    np.testing.assert_array_equal(whole["view_pixels"][5 * K:], part["view_pixels"])
    other = decode_block(src, np.arange(5, 8), p, views=K, views_seed=1)
    assert not np.array_equal(other["view_pixels"], part["view_pixels"])
    u8 = decode_block(src, np.arange(5, 8), p, uint8=True, views=K, views_seed=0)  # shipped as uint8, same crops
    np.testing.assert_allclose(p.normalize(u8["view_pixels"]).numpy(), part["view_pixels"].numpy(), atol=1e-6)


def _views_args(vs, tiny_clip, *extra):
    return [str(vs["src"]), "--model", tiny_clip, "-b", "4", "-w", "0", "--dtype", "float32", "-t", "bp-emotion",
            "--precision", "fp32", "--decode", "exact", "--views", str(K), *extra]


def test_sigkilled_views_encode_resumes_to_the_uninterrupted_store_and_refuses_other_views(vs, tiny_clip, tmp_path):
    args = _views_args(vs, tiny_clip)
    ref, out = tmp_path / "ref.h5", tmp_path / "s.h5"
    assert run_forked(lambda: invoke(["-q", "encode", *args, "--out", str(ref)])[0])[:3] == ("exit", 0, {"ok": True, "value": 0})

    def killed():
        commit, calls = StoreWriter.commit, []

        def dying(self, items):
            calls.append(items)
            if len(calls) == 3:  # two blocks (8 items) are in the journal
                os.kill(os.getpid(), signal.SIGKILL)
            return commit(self, items)

        StoreWriter.commit = dying
        return invoke(["-q", "encode", *args, "--out", str(out)])

    assert run_forked(killed)[:2] == ("signal", signal.SIGKILL)
    assert journal_progress(out)["items"] == 8 and not out.exists()

    # Another K, another seed: refused in one line (exit 2), the journal untouched.
    part = StoreWriter.partial_path(out)
    before = part.read_bytes()
    for extra in (["--views", "2"], ["--views-seed", "1"], ["--views", "0"]):
        code, output = invoke(["encode", *args, *extra, "--out", str(out)])
        assert code == 2, output
        one_line_error(output, "was encoded with --views 3 --views-seed 0 (recipe version 1)")
        assert part.read_bytes() == before and not out.exists()

    how, code, res = run_forked(lambda: invoke(["-q", "encode", *args, "--out", str(out)]))
    assert (how, code) == ("exit", 0) and res["value"][0] == 0 and res["value"][1].startswith("resumed"), res
    assert "2 batches encoded by this run" in res["value"][1]  # 13 items: 4 blocks, 2 were committed
    assert_same_store(ref, out)  # every column, the views included, bit for bit
    with open_store(out) as s:
        assert s.extra_names() == ["views"] and s.views().shape == (12, K, 16)

    # A complete store is not reused for another recipe either.
    mtime = out.stat().st_mtime_ns
    code, output = invoke(["encode", *args, "--views", "4", "--out", str(out)])
    assert code == 2 and out.stat().st_mtime_ns == mtime
    one_line_error(output, "this run has --views 4 --views-seed 0")


def _views(path, pre=False):
    with open_store(path) as s:
        return s.keys, s.views(pre_projection=pre)


def test_shards_merges_and_two_workers_write_the_single_process_views(vs, tiny_clip, tmp_path):
    kw = dict(KW, model=tiny_clip, views=K, features="projected,pre-projection")
    shards = [encode(str(vs["src"]), tmp_path / f"s{i}.h5", shard=(i, 2), **kw).path for i in range(2)]
    virtual = merge_stores(tmp_path / "virtual.h5", shards)
    copied = merge_stores(tmp_path / "copied.h5", shards, copy=True)
    keys, ref = _views(vs["store"])
    _, ref_pre = _views(vs["store"], pre=True)
    for merged in (virtual, copied):
        k, v = _views(merged)
        assert k == keys
        np.testing.assert_allclose(v, ref, rtol=0, atol=1e-6)  # the same crops; a forward's batch differs per shard
        np.testing.assert_allclose(_views(merged, pre=True)[1], ref_pre, rtol=0, atol=1e-5)
        with open_store(merged) as s:
            assert s.views_recipe == recipe(K, 0)
        rep = verify_store(merged)
        assert rep.ok and rep.rows == 12, rep.text
    with h5py.File(virtual, "r") as f:  # the views stay in the shards
        assert f["images/views"].is_virtual and f["images/pre_views"].is_virtual

    # A finished shard is not "done" for another recipe: the rerun is refused, not skipped.
    from clip_heads.encode import ViewsMismatchError

    mtime = shards[0].stat().st_mtime_ns
    with pytest.raises(ViewsMismatchError, match="this run has --views 2"):
        encode(str(vs["src"]), shards[0], shard=(0, 2), **dict(kw, views=2))
    assert shards[0].stat().st_mtime_ns == mtime

    # A shard drawn with another seed is another recipe: the merge refuses it, naming both.
    other = encode(str(vs["src"]), tmp_path / "o1.h5", shard=(1, 2), **dict(kw, views_seed=7)).path
    with pytest.raises(StoreError, match="views="):
        merge_stores(tmp_path / "bad.h5", [shards[0], other])
    assert not (tmp_path / "bad.h5").exists()

    two = encode(str(vs["src"]), tmp_path / "two.h5", devices="cpu,cpu", **kw).path
    k, v = _views(two)
    assert k == keys
    np.testing.assert_allclose(v, ref, rtol=0, atol=1e-5)
    np.testing.assert_allclose(_views(two, pre=True)[1], ref_pre, rtol=0, atol=1e-4)


def test_views_stream_a_block_at_a_time(vs, tiny_clip, tmp_path, monkeypatch):
    # The encode hands the journal one block of views at a time...
    seen, append = [], StoreWriter.append

    def spy(self, embeds, keys, labels, extras=None):
        seen.append(np.asarray(extras["views"]).shape)
        return append(self, embeds, keys, labels, extras)

    monkeypatch.setattr(StoreWriter, "append", spy)
    encode(str(vs["src"]), tmp_path / "a.h5", model=tiny_clip, views=8, **dict(KW, batch_size=3))
    monkeypatch.undo()
    assert seen and all(s[0] <= 3 and s[1:] == (8, 16) for s in seen) and sum(s[0] for s in seen) == 12

    # ...and the store is built from the journal within a bounded buffer, whatever N * K * D is.
    import clip_heads.journal as journal_mod

    n, k, d = 512, 32, 256  # 16 MiB of views
    w = StoreWriter.create(tmp_path / "big.h5", dim=d, classes=["a"], dtype="float32",
                           extras={"views": ((k, d), np.dtype("float32"), None)}, attrs={"model_id": "x"})
    rng = np.random.default_rng(0)
    for a in range(0, n, 64):
        V = rng.standard_normal((64, k, d)).astype(np.float32)
        w.append(V[:, 0], [str(i) for i in range(a, a + 64)], np.zeros(64, np.int64), {"views": V})
        w.commit(a + 64)
    monkeypatch.setattr(journal_mod, "_BUFFER_BYTES", 1 << 20)
    j = journal_mod._scan(w.part)
    tracemalloc.start()
    with h5py.File(tmp_path / "built.h5", "w") as f:
        journal_mod._fill(f, w.part, j, complete=True)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    w.close()
    record = 64 * k * d * 4  # one committed block of views, 2 MiB
    assert peak < 2.5 * record < n * k * d * 4 / 3, peak  # a block read and written, never the (N, K, D) array
    with h5py.File(tmp_path / "built.h5", "r") as f:
        np.testing.assert_array_equal(f["images/views"][-64:], V)
        assert f["images/views"].chunks == (8, k, d)  # 256 vectors a chunk, as /images/embeds


# -- the heads read them as the store writes them -------------------------------------------------
def test_train_head_linear_with_use_views_trains_on_every_view(vs, tmp_path, monkeypatch):
    import clip_heads.heads.linear as linear_mod
    from clip_heads.heads.base import Head
    from clip_heads.heads.linear import LinearHead

    sizes, real = [], linear_mod.fit_logistic
    monkeypatch.setattr(linear_mod, "fit_logistic", lambda X, *a, **k: (sizes.append(X.shape[0]), real(X, *a, **k))[1])
    code, out = invoke(["-q", "train-head", "linear", str(vs["store"]), "--out", str(tmp_path / "h"),
                        "--param", "use_views=true", "--param", "C=1.0", "--no-plots"])
    assert code == 0, out
    assert sizes == [12 * (K + 1)]  # every image and its 3 views, each with the image's label
    head = Head.from_pretrained(tmp_path / "h")
    with open_store(vs["store"]) as s:
        X, y, classes = s.arrays()
        V = s.views()
    names = np.asarray(classes)[y]
    ref = LinearHead(C=1.0, use_views=True).fit(X, names, views=V)
    np.testing.assert_allclose(head.coef_, ref.coef_, rtol=0, atol=1e-6)
    plain = LinearHead(C=1.0).fit(X, names)
    assert np.abs(head.coef_ - plain.coef_).max() > 1e-3  # the views changed the fit
    # CV trains each fold on its training images' views, scores plain vectors
    sizes.clear()
    code, out = invoke(["-q", "train-head", "linear", str(vs["store"]), "--out", str(tmp_path / "cv"), "--cv", "3",
                        "--param", "use_views=true", "--param", "C=1.0", "--no-plots"])
    assert code == 0, out
    assert sizes == [8 * (K + 1)] * 3 + [12 * (K + 1)]  # 3 folds of 8 training images, then the final fit


def test_train_head_use_views_on_a_store_without_views_is_one_line(tmp_path):
    X = l2_normalize(np.random.default_rng(0).standard_normal((12, 8)))
    store = write_store(tmp_path / "plain.h5", X, np.arange(12) % 3, ["a", "b", "c"])
    code, out = invoke(["train-head", "linear", str(store), "--out", str(tmp_path / "h"), "--param", "use_views=true"])
    assert code == 2, out
    one_line_error(out, "encode the store with --views K")


def test_tip_adapter_keys_are_the_mean_of_each_images_views_from_the_store(vs):
    from clip_heads.fewshot import load_few_shot_data
    from clip_heads.heads.tip_adapter import TipAdapterHead

    d = load_few_shot_data(vs["store"], views=True)
    with open_store(vs["store"]) as s:
        V = s.views()
    np.testing.assert_array_equal(d.views, V)
    names = np.asarray(d.classes)[d.y]
    prompts = {c: v for c, v in zip(d.classes, d.prompts.class_vectors(), strict=True)}
    head = TipAdapterHead(prompt_embeds=prompts, alpha=1.0, beta=5.5, use_views=True).fit(d.X, names, views=d.views)
    by_hand = V / np.linalg.norm(V, axis=-1, keepdims=True)
    by_hand = by_hand.mean(1)
    by_hand /= np.linalg.norm(by_hand, axis=-1, keepdims=True)
    np.testing.assert_allclose(head.keys_.numpy(), by_hand, rtol=0, atol=1e-6)


def test_prolip_trains_on_the_pre_projection_views_and_stays_put_at_infinite_lambda(vs, tmp_path):
    from clip_heads.fewshot import load_few_shot_data, run_few_shot
    from clip_heads.heads.prolip import ProLIPHead

    d = load_few_shot_data(vs["store"], pre_projection=True, pre_views=True)
    assert d.pre_views.shape == (12, K, 32)
    names = np.asarray(d.classes)[d.y]
    prompts = {c: v for c, v in zip(d.classes, d.prompts.class_vectors(), strict=True)}
    still = ProLIPHead(prompt_embeds=prompts, projection=d.projection, reg=float("inf"), use_views=True)
    np.testing.assert_array_equal(still.fit(d.pre, names, views=d.pre_views).projection_, d.projection)
    moved = ProLIPHead(prompt_embeds=prompts, projection=d.projection, use_views=True, epochs=5)
    moved.fit(d.pre, names, views=d.pre_views)
    plain = ProLIPHead(prompt_embeds=prompts, projection=d.projection, epochs=5).fit(d.pre, names)
    assert np.abs(moved.projection_ - d.projection).max() > 1e-6
    assert np.abs(moved.projection_ - plain.projection_).max() > 1e-7  # the views were trained on
    assert moved.reg_ == plain.reg_ == pytest.approx(1 / 4)  # lambda = 1/N counts images, not views

    # The few-shot grid no longer refuses prolip's views: it trains on the pre-projection views.
    run_few_shot(vs["store"], tmp_path / "fs", heads=["prolip"], shots=[2], seeds=[1],
                 params={"prolip": {"use_views": True, "epochs": 3}}, plots=False)
    rows = (tmp_path / "fs" / "few_shot.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith("prolip,2,1,")
    accuracy = float(rows[1].split(",")[3])
    assert 0.0 <= accuracy <= 1.0


def test_verify_checks_every_view_of_every_row(tmp_path):
    rng = np.random.default_rng(0)
    X = l2_normalize(rng.standard_normal((20, 8)))
    V = l2_normalize(rng.standard_normal((20, 4, 8)))
    V[13, 2] *= 1.5  # one view of row 13 is not unit length in a normalised store
    store = write_store(tmp_path / "w.h5", X, np.arange(20) % 2, ["a", "b"], extras={"views": V}, normalized=True)
    with h5py.File(store, "r") as f:  # written where encode writes them, the extra column a link
        assert f["images/views"].shape == (20, 4, 8) and f.get("images/extras/views", getlink=True).path == "/images/views"
    rep = verify_store(store)
    assert not rep.ok and len(rep.problems) == 1, rep.text
    assert rep.problems[0].dataset == "/images/views" and "first at row 13" in rep.problems[0].message, rep.text
    V[13, 2] /= 1.5
    V[7, 0, 3] = np.nan
    store = write_store(tmp_path / "n.h5", X, np.arange(20) % 2, ["a", "b"], extras={"views": V}, normalized=True)
    rep = verify_store(store)
    assert [p.dataset for p in rep.problems] == ["/images/views"] and "first at row 7" in rep.problems[0].message
    # A views column whose rows do not line up with the store's is refused on open.
    with h5py.File(store, "a") as f:
        f["images/views"].resize(19, axis=0)
    with pytest.raises(StoreError, match="views has 19 rows but the store records 20"):
        open_store(store)


def test_a_block_with_no_readable_image_has_no_views_and_the_encode_goes_on(vs, tiny_clip, tmp_path):
    # batch_size 1: the broken image is a block of its own, nothing in it to embed (a crash once).
    kw = dict(KW, batch_size=1)
    store = encode(str(vs["src"]), tmp_path / "b1.h5", model=tiny_clip, views=K, features="projected,pre-projection",
                   **kw).path
    with open_store(store) as one, open_store(vs["store"]) as four:
        assert one.keys == four.keys and [k for k, _ in one.skipped()] == ["joy/broken.jpg"]
        np.testing.assert_allclose(one.views(), four.views(), rtol=0, atol=1e-5)
        np.testing.assert_allclose(one.views(pre_projection=True), four.views(pre_projection=True), rtol=0, atol=1e-4)


def test_merge_refuses_shards_decoded_by_different_paths(vs, tiny_clip, tmp_path):
    kw = dict(KW, model=tiny_clip)
    exact = encode(str(vs["src"]), tmp_path / "s0.h5", shard=(0, 2), **kw).path
    draft = encode(str(vs["src"]), tmp_path / "s1.h5", shard=(1, 2), **dict(kw, decode="draft")).path
    with pytest.raises(StoreError, match="decode='draft' but .*s0.h5 has 'exact'"):
        merge_stores(tmp_path / "m.h5", [exact, draft])
    assert not (tmp_path / "m.h5").exists()
    same = encode(str(vs["src"]), tmp_path / "e1.h5", shard=(1, 2), **kw).path
    with open_store(merge_stores(tmp_path / "ok.h5", [exact, same])) as s:
        assert s.attrs["decode"] == "exact" and len(s) == 12
