"""Every family through every engine (issue 10 on top of the scale-out): one worker per device
loads the family's own classes and recipe, NaFlex batches (patches, mask, grid) travel to the
workers and back, and ``--features pre-projection`` comes through the engines' blocks and the
shard merges, each store equal to the single-process one.
(The Ray engine's run of the same is in tests/test_scale_ray.py, beside its session's Ray.)"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from clip_heads.cli import main
from clip_heads.encode import encode
from clip_heads.verify import verify_store
from clip_heads.ray_engine import pack_arrays, unpack_arrays
from clip_heads.store import open_store
from clip_heads.writer import merge_stores
from scalekit import assert_same, content, jpeg_folder


def image_features(path) -> dict:
    """What a store holds beyond scalekit.content: the pre-projection rows and the projection."""
    with open_store(path) as s:
        return {"pre": s.pre_embeddings() if s.has_pre_embeds else None, "projection": s.projection(),
                "family": s.family}


def assert_same_features(a: dict, b: dict, atol: float) -> None:
    assert a["family"] == b["family"]
    assert (a["pre"] is None) == (b["pre"] is None)
    if a["pre"] is not None:
        np.testing.assert_allclose(a["pre"], b["pre"], rtol=0, atol=atol)
    if a["projection"] is None:
        assert b["projection"] is None
    else:
        np.testing.assert_array_equal(a["projection"], b["projection"])


@pytest.mark.parametrize("kind, features", [("siglip", "projected"), ("siglip2", "projected,pre-projection")])
def test_a_family_encoded_by_two_cpu_workers_equals_the_single_process_store(kind, features, tiny_families, tmp_path):
    # SigLIP: its square resize and max_length prompts in spawned workers; SigLIP 2 NaFlex: its
    # processor's dict batches through the workers' queues, with the pooled output beside them.
    model = tiny_families[kind]
    root = jpeg_folder(tmp_path / "imgs", n_per_class=3)
    (root / "joy" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    common = [str(root), "--model", model, "--workers", "0", "--batch-size", "2", "--dtype", "float32",
              "-t", "bp-emotion", "--features", features]
    assert CliRunner().invoke(main, ["-q", "encode", *common, "--out", str(tmp_path / "one.h5")]).exit_code == 0
    res = CliRunner().invoke(main, ["-q", "encode", *common, "--out", str(tmp_path / "two.h5"), "--devices", "cpu,cpu"])
    assert res.exit_code == 0 and res.output.startswith("encoded"), res.output
    a, b = content(tmp_path / "one.h5"), content(tmp_path / "two.h5")
    assert_same(a, b, atol=1e-5)  # rows, order, skips with reasons, prompt sets, provenance (family, rule)
    assert len(a["keys"]) == 9 and a["skipped"][0][0] == "joy/broken.jpg"
    fa, fb = image_features(tmp_path / "one.h5"), image_features(tmp_path / "two.h5")
    assert_same_features(fa, fb, atol=1e-5)
    assert fa["family"] == kind and (fa["pre"] is not None) == ("pre-projection" in features)
    assert a["attrs"]["features"] == features


def test_pre_projection_shards_merge_over_the_shard_files_and_by_copy_into_the_single_store(tiny_families, tmp_path):
    root = jpeg_folder(tmp_path / "imgs", n_per_class=3)
    kw = dict(model=tiny_families["clip"], workers=0, progress=False, batch_size=2, dtype="float32",
              templates=["bp-emotion"], features="projected,pre-projection")
    whole = encode(str(root), tmp_path / "whole.h5", **kw).path
    shards = [encode(str(root), tmp_path / f"s{i}.h5", shard=(i, 2), **kw).path for i in range(2)]
    virtual = merge_stores(tmp_path / "virtual.h5", shards)
    copied = merge_stores(tmp_path / "copied.h5", shards, copy=True)
    ref, ref_features = content(whole), image_features(whole)
    assert ref_features["pre"].shape == (9, 32) and ref_features["projection"].shape == (16, 32)
    for merged in (virtual, copied):
        assert_same(content(merged), ref, atol=1e-6, attrs_except=("merged_from", "virtual_sources", "virtual_shards"))
        assert_same_features(image_features(merged), ref_features, atol=1e-6)
        rep = verify_store(merged)
        assert rep.ok and rep.rows == 9, rep.text
    import h5py

    with h5py.File(virtual, "r") as f:  # the pooled rows stay in the shards as well
        assert f["images/pre_embeds"].is_virtual
        assert {vs.file_name for vs in f["images/pre_embeds"].virtual_sources()} == {"s0.h5", "s1.h5"}


def test_ray_packs_a_naflex_batch_and_a_pixel_tensor_with_their_own_dtypes():
    batch = {"pixel_values": torch.randn(2, 64, 48), "pixel_attention_mask": torch.tensor([[1] * 60 + [0] * 4] * 2, dtype=torch.int32),
             "spatial_shapes": torch.tensor([[8, 8], [6, 10]], dtype=torch.int64)}
    layout, raw = pack_arrays(batch)
    back = unpack_arrays(layout, raw)
    assert list(back) == list(batch)
    for k, v in batch.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    x = torch.randn(3, 3, 5, 4)
    layout, raw = pack_arrays(x)
    assert torch.equal(unpack_arrays(layout, raw), x)


def test_pre_projection_rows_are_checked_where_they_lie_whatever_the_extras_link_says(tiny_families, tmp_path):
    # What the virtual merge once wrote: /images/extras/pre_embeds a dataset of its own with every
    # row, /images/pre_embeds (the one the reader reads) left empty. It must not open as a store.
    import shutil

    import h5py

    root = jpeg_folder(tmp_path / "imgs", n_per_class=2)
    good = encode(str(root), tmp_path / "s.h5", model=tiny_families["clip"], workers=0, progress=False,
                  templates=["bp-emotion"], features="projected,pre-projection").path
    bad = tmp_path / "bad.h5"
    shutil.copy(good, bad)
    with h5py.File(bad, "r+") as f:
        rows = f["images/pre_embeds"][:]
        del f["images/extras/pre_embeds"]
        f["images/extras"].create_dataset("pre_embeds", data=rows)
        f["images/pre_embeds"].resize(0, axis=0)
    with pytest.raises(ValueError, match="pre_embeds"):
        open_store(bad)
    assert not verify_store(bad).ok and verify_store(good).ok
