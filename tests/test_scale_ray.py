"""The Ray Data engine on a local 2-CPU Ray: the store of a single-process encode, and a resume
that does not redo finished blocks. Skipped when Ray is not installed (the ``test`` extra has it)."""
from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from clip_heads.cli import main
from clip_heads.journal import StoreWriter, journal_progress
from scalekit import assert_same, content, jpeg_folder

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'clip-heads[ray]')")
pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'ray[data]')")


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray for the session, as a laptop user starts it: two CPUs, no dashboard."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_encode_killed_then_resumed_equals_the_single_process_store(local_ray, tiny_clip, tmp_path, monkeypatch):
    root = jpeg_folder(tmp_path / "imgs", n_per_class=5)
    (root / "joy" / "broken.jpg").write_bytes(b"\xff\xd8\xff broken")  # skipped, with its reason, by every engine
    common = [str(root), "--model", tiny_clip, "--batch-size", "3", "--dtype", "float32", "-t", "bp-emotion", "-t", "clip-e"]
    ref = tmp_path / "one.h5"
    assert CliRunner().invoke(main, ["-q", "encode", *common, "--workers", "0", "--out", str(ref)]).exit_code == 0

    # Ctrl-C after two committed blocks (16 items: 6 blocks of 3)
    out = tmp_path / "ray.h5"
    commit, calls = StoreWriter.commit, []

    def interrupted(self, items):
        calls.append(items)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return commit(self, items)

    monkeypatch.setattr(StoreWriter, "commit", interrupted)
    res = CliRunner().invoke(main, ["-q", "encode", *common, "--engine", "ray", "--out", str(out)])
    assert res.exit_code == 130, res.output
    monkeypatch.undo()
    assert journal_progress(out)["items"] == 6 and not out.exists()

    res = CliRunner().invoke(main, ["-q", "encode", *common, "--engine", "ray", "--decode-cpus", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert res.output.startswith("resumed") and "4 batches encoded by this run" in res.output  # 6 - 2 finished
    a, b = content(ref), content(out)
    assert_same(a, b, atol=1e-3)  # keys, order, labels, skipped with reasons, prompt sets, provenance
    assert len(a["keys"]) == 15 and a["skipped"] == [("joy/broken.jpg", a["skipped"][0][1])]


def test_ray_carries_naflex_batches_and_pre_projection_features_into_the_single_process_store(
        local_ray, tiny_families, tmp_path):
    # SigLIP 2 NaFlex: each block's patches, mask and grid cross Ray's stages as raw arrays, and the
    # embedding actors send the pooled output back beside the embeddings (issue 10 on any engine).
    from clip_heads.store import open_store

    root = jpeg_folder(tmp_path / "imgs", n_per_class=3)
    common = [str(root), "--model", tiny_families["siglip2"], "--batch-size", "4", "--dtype", "float32",
              "-t", "bp-emotion", "--features", "projected,pre-projection"]
    ref, out = tmp_path / "one.h5", tmp_path / "ray.h5"
    assert CliRunner().invoke(main, ["-q", "encode", *common, "--workers", "0", "--out", str(ref)]).exit_code == 0
    res = CliRunner().invoke(main, ["-q", "encode", *common, "--engine", "ray", "--decode-cpus", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert_same(content(ref), content(out), atol=1e-5)
    with open_store(ref) as a, open_store(out) as b:
        assert a.family == b.family == "siglip2" and b.pre_embeddings().shape == (9, a.pre_embeddings().shape[1])
        np.testing.assert_allclose(b.pre_embeddings(), a.pre_embeddings(), rtol=0, atol=1e-5)


def test_ray_writes_the_single_process_views_of_a_naflex_family(local_ray, tiny_families, tmp_path):
    # encode --views K on Ray: each block's views (SigLIP 2: crops its own processor sizes, as
    # patches, mask and grid) cross the stages beside the plain pixels, and come back as the
    # local engine computes them, with their pooled outputs.
    from clip_heads.store import open_store

    root = jpeg_folder(tmp_path / "imgs", n_per_class=3)
    (root / "joy" / "broken.jpg").write_bytes(b"\xff\xd8\xff broken")
    common = [str(root), "--model", tiny_families["siglip2"], "--batch-size", "4", "--dtype", "float32",
              "-t", "bp-emotion", "--features", "projected,pre-projection", "--views", "2", "--views-seed", "5"]
    ref, out = tmp_path / "one.h5", tmp_path / "ray.h5"
    assert CliRunner().invoke(main, ["-q", "encode", *common, "--workers", "0", "--out", str(ref)]).exit_code == 0
    res = CliRunner().invoke(main, ["-q", "encode", *common, "--engine", "ray", "--decode-cpus", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert_same(content(ref), content(out), atol=1e-5)  # the views' recipe attribute included
    with open_store(ref) as a, open_store(out) as b:
        assert a.views().shape == (9, 2, a.dim) and b.views_recipe["seed"] == 5
        np.testing.assert_allclose(b.views(), a.views(), rtol=0, atol=1e-5)
        np.testing.assert_allclose(b.views(pre_projection=True), a.views(pre_projection=True), rtol=0, atol=1e-5)
        assert np.abs(a.views()[:, 0] - a.views()[:, 1]).max() > 1e-3  # two different views of each image
