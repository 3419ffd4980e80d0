"""Provenance that always holds: a model loaded by hub id from the cache, or from a directory,
is identified by its revision and a hash of the weight files loaded, and every check (resume,
up to date, add prompts, fine-tune resume) refuses a model that is not the recorded one.

A fake Hugging Face cache (``models--org--tiny/{blobs,snapshots/<rev>,refs/main}``) holds two
revisions of a tiny CLIP with different weights; ``refs/main`` is switched between runs.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from clip_heads.backbone import Backbone, check_identity, load_clip, model_identity, weights_hash
from clip_heads.cli import main
from clip_heads.encode import encode
from clip_heads.prompts import add_prompts
from clip_heads.store import open_store
from clip_heads.writer import write_store
from clip_heads.journal import StoreWriter
from conftest import build_tiny_clip

REPO = "org/tiny"
REV_A, REV_B = "a" * 40, "b" * 40


def sha256(*files: Path) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(Path(f).read_bytes())
    return "sha256:" + h.hexdigest()


def add_revision(cache: Path, repo: str, model_dir: Path, rev: str) -> Path:
    """Lay ``model_dir`` out as the hub cache does: content-named blobs, a snapshot of symlinks."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / rev
    snap.mkdir(parents=True)
    (root / "blobs").mkdir(exist_ok=True)
    for p in Path(model_dir).iterdir():
        if p.is_file():
            blob = root / "blobs" / hashlib.sha256(p.read_bytes()).hexdigest()
            if not blob.exists():
                shutil.copyfile(p, blob)
            os.symlink(os.path.relpath(blob, snap), snap / p.name)
    return snap


def point_main(cache: Path, repo: str, rev: str) -> None:
    refs = cache / ("models--" + repo.replace("/", "--")) / "refs"
    refs.mkdir(exist_ok=True)
    (refs / "main").write_text(rev)


@pytest.fixture(scope="module")
def fake_hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    models = {rev: build_tiny_clip(root / f"model-{rev[0]}", seed=seed) for rev, seed in ((REV_A, 0), (REV_B, 1))}
    cache = root / "cache"
    for rev, d in models.items():
        add_revision(cache, REPO, d, rev)
    return {"cache": cache, "models": models}


@pytest.fixture
def hub(fake_hub, monkeypatch):
    """The fake cache as HF_HUB_CACHE, refs/main at revision A; ``hub["point"](rev)`` moves it."""
    import huggingface_hub.constants

    cache = fake_hub["cache"]
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    point_main(cache, REPO, REV_A)
    return dict(fake_hub, point=lambda rev: point_main(cache, REPO, rev))


def colours(root: Path, n: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for name, rgb in (("red", (220, 30, 30)), ("blue", (30, 40, 220))):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            arr = np.clip(np.array(rgb)[None, None] + rng.normal(0, 20, (30, 30, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / name / f"{i}.png")
    return root


ENC = dict(workers=0, progress=False, templates=["bp-photo"], batch_size=2)


# -- what is recorded --------------------------------------------------------------------------
def test_hub_id_records_its_revision_and_the_hash_of_the_weights_loaded(hub, tmp_path):
    imgs = colours(tmp_path / "imgs")
    encode(str(imgs), tmp_path / "a.h5", model=REPO, **ENC)
    hub["point"](REV_B)
    encode(str(imgs), tmp_path / "b.h5", model=REPO, **ENC)
    want = {rev: sha256(d / "model.safetensors") for rev, d in hub["models"].items()}
    with open_store(tmp_path / "a.h5") as a, open_store(tmp_path / "b.h5") as b:
        assert (a.attrs["model_revision"], a.model_hash) == (REV_A, want[REV_A])
        assert (b.attrs["model_revision"], b.model_hash) == (REV_B, want[REV_B])
        # A head trained on one store must not pass for the other: their identities differ.
        assert a.backbone()["model_hash"] != b.backbone()["model_hash"] and all(want.values())
        Xa, Xb = a.embeddings(), b.embeddings()
    # The vectors are those of the revision recorded, not of another one.
    ref = Backbone(str(hub["models"][REV_B]), device="cpu")
    with open_store(tmp_path / "b.h5") as b:
        x = ref.encode_images([Image.open(imgs / k).convert("RGB") for k in b.keys]).numpy()
    np.testing.assert_allclose(Xb, x / np.linalg.norm(x, axis=1, keepdims=True), atol=2e-3)
    assert not np.allclose(Xa, Xb, atol=1e-2)


def test_a_local_directory_is_hashed_over_its_shards(tmp_path):
    from transformers import CLIPModel

    single = build_tiny_clip(tmp_path / "single")
    sharded = tmp_path / "sharded"
    shutil.copytree(single, sharded)
    (sharded / "model.safetensors").unlink()
    CLIPModel.from_pretrained(single).save_pretrained(sharded, max_shard_size="100KB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 1 and (sharded / "model.safetensors.index.json").is_file()
    ident = model_identity(sharded)
    assert ident == {"model_id": str(sharded), "model_revision": "local", "model_hash": sha256(*shards)}
    assert model_identity(single)["model_hash"] == sha256(single / "model.safetensors")
    loaded = load_clip(sharded)
    assert loaded.identity == ident and loaded.model.config.projection_dim == 16


def test_write_store_declares_the_model_it_was_given(tmp_path):
    write_store(tmp_path / "s.h5", np.eye(3), [0, 1, 2], model_id="org/mine")
    write_store(tmp_path / "t.h5", np.eye(3), [0, 1, 2], model_id="org/mine", model_hash="sha256:abc")
    with open_store(tmp_path / "s.h5") as s, open_store(tmp_path / "t.h5") as t:
        assert (s.model_hash, t.model_hash) == ("declared:org/mine", "sha256:abc")


# -- what is refused -----------------------------------------------------------------------------
def test_encode_interrupted_under_one_revision_is_not_resumed_under_another(hub, tmp_path, monkeypatch):
    imgs = colours(tmp_path / "imgs")
    out = tmp_path / "s.h5"
    calls = {"n": 0}
    real = Backbone.encode_pixels

    def interrupted(self, pixels):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, pixels)

    monkeypatch.setattr(Backbone, "encode_pixels", interrupted)
    with pytest.raises(KeyboardInterrupt):
        encode(str(imgs), out, model=REPO, **ENC)
    monkeypatch.setattr(Backbone, "encode_pixels", real)
    part = StoreWriter.partial_path(out)
    assert part.exists() and not out.exists()
    before = part.read_bytes()

    hub["point"](REV_B)
    with pytest.raises(ValueError, match=f"model_revision='{REV_A}'.*model_revision='{REV_B}'"):
        encode(str(imgs), out, model=REPO, **ENC)
    assert part.read_bytes() == before and not out.exists()  # nothing written is lost

    hub["point"](REV_A)
    assert encode(str(imgs), out, model=REPO, **ENC).status == "resumed"
    with open_store(out) as s:
        assert len(s) == 8 and s.attrs["model_revision"] == REV_A


def test_complete_store_is_not_up_to_date_under_another_revision(hub, tmp_path):
    imgs = colours(tmp_path / "imgs")
    out = tmp_path / "s.h5"
    encode(str(imgs), out, model=REPO, **ENC)
    assert encode(str(imgs), out, model=REPO, **ENC).status == "up-to-date"
    before = out.stat().st_mtime_ns
    hub["point"](REV_B)
    res = CliRunner().invoke(main, ["encode", str(imgs), "--out", str(out), "--model", REPO, "-w", "0", "-t", "bp-photo"])
    assert res.exit_code == 1 and "model_hash" in res.output and "--overwrite" in res.output, res.output
    assert "up to date" not in res.output and "Traceback" not in res.output
    assert out.stat().st_mtime_ns == before


def test_prompts_from_another_revision_are_refused(hub, tmp_path):
    imgs = colours(tmp_path / "imgs")
    out = tmp_path / "s.h5"
    encode(str(imgs), out, model=REPO, **ENC)
    hub["point"](REV_B)
    with pytest.raises(ValueError, match="re-encode the store"):
        add_prompts(str(out), ["clip-e"], progress=False)
    with open_store(out) as s:
        assert s.prompt_sets() == ["bp-photo"]
    hub["point"](REV_A)
    assert add_prompts(str(out), ["clip-e"], progress=False) == ["clip-e"]


def test_local_model_whose_weights_changed_is_refused(tmp_path):
    model = build_tiny_clip(tmp_path / "model", seed=0)
    other = build_tiny_clip(tmp_path / "other", seed=1)
    imgs = colours(tmp_path / "imgs")
    out = tmp_path / "s.h5"
    encode(str(imgs), out, model=str(model), **ENC)
    (model / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())  # same id, new weights
    with pytest.raises(ValueError, match="model_hash"):
        encode(str(imgs), out, model=str(model), **ENC)
    with pytest.raises(ValueError, match="re-encode"):
        add_prompts(str(out), ["clip-e"], progress=False)


def test_a_store_without_a_model_hash_cannot_be_resumed_or_extended(tiny_clip, tmp_path):
    imgs = colours(tmp_path / "imgs")
    out = tmp_path / "s.h5"
    encode(str(imgs), out, model=tiny_clip, **ENC)
    with h5py.File(out, "a") as f:  # as an older clip-heads wrote a store from a hub id
        f.attrs["model_hash"] = ""
    for run in (lambda: encode(str(imgs), out, model=tiny_clip, **ENC),
                lambda: add_prompts(str(out), ["clip-e"], progress=False)):
        with pytest.raises(ValueError, match="records no model_hash"):
            run()


def test_check_identity_compares_id_hash_and_revision():
    cur = {"model_id": "org/m", "model_revision": "r1", "model_hash": "sha256:11"}
    check_identity(dict(cur), cur, "x", "fix it")
    check_identity({"model_id": "org/m", "model_hash": "sha256:11"}, cur, "x", "fix it")  # no revision recorded
    for rec, needle in (({**cur, "model_id": "org/n"}, "model_id='org/n'"),
                        ({**cur, "model_hash": "sha256:22"}, "model_hash='sha256:22'"),
                        ({**cur, "model_revision": "r0"}, "model_revision='r0'"),
                        ({**cur, "model_hash": ""}, "records no model_hash"),
                        ({**cur, "model_hash": "declared:org/m"}, "declared")):
        with pytest.raises(ValueError, match=needle):
            check_identity(rec, cur, "store s.h5", "fix it")
    check_identity({**cur, "model_hash": "declared:org/m"}, cur, "x", "fix it", accept_declared=True)


def test_hub_id_not_in_the_cache_offline_is_one_clear_line(hub, tmp_path):
    res = CliRunner().invoke(main, ["encode", str(colours(tmp_path / "imgs", 1)), "--out", str(tmp_path / "s.h5"),
                                    "--model", "org/absent"])
    assert res.exit_code == 1 and "HF_HUB_OFFLINE" in res.output and "not in the local cache" in res.output
    assert "--model PATH" in res.output and "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1


# -- what is loaded --------------------------------------------------------------------------------
def test_pickle_only_model_folder_is_refused_in_one_line(tiny_clip, tmp_path):
    import torch
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_clip, pickled)
    torch.save(load_file(str(pickled / "model.safetensors")), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    imgs = colours(tmp_path / "imgs", 1)
    for argv in (["encode", str(imgs), "--out", str(tmp_path / "s.h5"), "--model", str(pickled)],
                 ["wise-ft", tiny_clip, str(pickled), "--out", str(tmp_path / "w")]):
        res = CliRunner().invoke(main, argv)
        assert res.exit_code == 1 and "pickle" in res.output and "pytorch_model.bin" in res.output, res.output
        assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "s.h5").exists() and not (tmp_path / "w").exists()
    with pytest.raises(ValueError, match="safetensors"):
        weights_hash(pickled)


def test_a_model_that_is_not_a_whole_clip_is_refused(tiny_clip, tmp_path):
    from transformers import CLIPModel, CLIPVisionModelWithProjection

    vision = tmp_path / "vision"
    CLIPVisionModelWithProjection(CLIPModel.from_pretrained(tiny_clip).config.vision_config).save_pretrained(vision)
    shutil.copy(Path(tiny_clip) / "preprocessor_config.json", vision)
    with pytest.raises(ValueError, match="clip_vision_model.*both its image and text towers"):
        load_clip(vision)


def test_a_reachable_hub_pins_the_revision_it_answers(hub, monkeypatch, caplog):
    # The online path, without a network: the hub's answer is stubbed, the files come from the cache.
    import huggingface_hub

    import clip_heads.identity as identity

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE")
    monkeypatch.setattr(identity, "_hub_down", {})
    monkeypatch.setattr(identity, "_said", set())
    asked, fetched = [], []
    snapshots = hub["cache"] / "models--org--tiny" / "snapshots"

    class Info:
        sha = REV_B

    def model_info(self, repo_id, timeout=None, **kw):
        asked.append((repo_id, timeout))
        return Info()

    def snapshot_download(repo_id, revision=None, allow_patterns=None, **kw):
        fetched.append((repo_id, revision, tuple(allow_patterns)))
        return str(snapshots / revision)

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    ident = model_identity(REPO)  # refs/main says A, the hub says B: the hub's answer is what is loaded
    assert ident["model_revision"] == REV_B
    assert ident["model_hash"] == sha256(hub["models"][REV_B] / "model.safetensors")
    assert asked == [(REPO, identity.HUB_PROBE_TIMEOUT)] and fetched == [(REPO, REV_B, identity.HUB_FILES)]

    from huggingface_hub.errors import RepositoryNotFoundError

    http = pytest.importorskip("httpx2")  # huggingface_hub's HTTP client, whose responses its errors carry

    def refused(self, repo_id, timeout=None, **kw):
        raise RepositoryNotFoundError("404", response=http.Response(404, request=http.Request("GET", "http://x")))

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", refused)
    caplog.set_level(logging.INFO, logger="clip_heads.identity")
    assert model_identity(REPO)["model_revision"] == REV_A  # the cached copy, and one line saying why
    assert any("answered 404" in r.getMessage() and "cached copy" in r.getMessage() for r in caplog.records)
