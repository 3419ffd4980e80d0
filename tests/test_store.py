import json
import os
import signal
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest

from clip_heads.store import PromptSet, StoreError, l2_normalize, open_store
from clip_heads.writer import add_prompt_sets, write_store
from clip_heads.journal import StoreWriter


def _prompts(classes, dim, templates=("a photo of a {}.", "a {}"), name="default", seed=0):
    rng = np.random.default_rng(seed)
    texts, tid, cid = [], [], []
    for t, tpl in enumerate(templates):
        for c, cls in enumerate(classes):
            texts.append(tpl.format(cls)), tid.append(t), cid.append(c)
    return PromptSet(name, list(classes), list(templates), texts, rng.normal(size=(len(texts), dim)).astype(np.float32), np.array(tid), np.array(cid))


def test_round_trip_from_arrays(tmp_path):
    rng = np.random.default_rng(0)
    X = l2_normalize(rng.normal(size=(50, 8)))
    y = rng.integers(0, 3, 50)
    dist = rng.dirichlet(np.ones(4), 50).astype(np.float32)
    ps = _prompts(["cat", "dog", "eel"], 8)
    path = write_store(tmp_path / "s.h5", X, y, ["cat", "dog", "eel"], keys=[f"k{i}" for i in range(50)],
                       model_id="m", extras={"dist": dist, "split": np.array(["train"] * 25 + ["test"] * 25)},
                       extras_columns={"dist": list("abcd")}, prompt_sets=[ps])
    with open_store(path) as s:
        X2, y2, classes = s.arrays()
        np.testing.assert_allclose(X2, X, atol=0)  # float32 by default for write_store
        np.testing.assert_array_equal(y2, y)
        assert classes == ["cat", "dog", "eel"]
        assert s.keys[:2] == ["k0", "k1"] and s.normalized and s.dim == 8 and s.complete
        np.testing.assert_array_equal(s.extra("dist"), dist)
        assert list(s.extra("split"))[24:26] == ["train", "test"]
        assert s.extra_columns("dist") == list("abcd")
        assert s.prompt_sets() == ["default"]
        got = s.prompt_set("default")
        assert got.texts == ps.texts and got.templates == ps.templates
        np.testing.assert_allclose(got.embeds, ps.embeds)
        # An ensemble is the renormalised mean of normalised prompt vectors; one template is a slice.
        one = got.class_vectors([1])
        np.testing.assert_allclose(one, l2_normalize(ps.embeds[3:]), atol=1e-6)
        ens = got.class_vectors()
        np.testing.assert_allclose(ens[0], l2_normalize(l2_normalize(ps.embeds[0]) + l2_normalize(ps.embeds[3])), atol=1e-6)
        summ = s.summary()
        assert summ["classes"] == {c: int((y == i).sum()) for i, c in enumerate(["cat", "dog", "eel"])}
        assert summ["versions"]["clip_heads"] and summ["prompt_sets"]["default"]["prompts"] == 6
        json.dumps(summ)  # json-able


def test_refuses_non_store_and_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.h5"):
        open_store(tmp_path / "nope.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = 1
    with pytest.raises(StoreError, match="not a clip-heads store"):
        open_store(tmp_path / "other.h5")
    (tmp_path / "junk.h5").write_text("hello")
    with pytest.raises(StoreError, match="not a readable HDF5"):
        open_store(tmp_path / "junk.h5")


def test_refuses_newer_schema(tmp_path):
    p = write_store(tmp_path / "s.h5", np.eye(3), [0, 1, 2])
    with h5py.File(p, "a") as f:
        f.attrs["schema_version"] = 99
    with pytest.raises(StoreError, match="schema 99"):
        open_store(p)


def test_write_store_validates(tmp_path):
    with pytest.raises(ValueError, match="2-D"):
        write_store(tmp_path / "a.h5", np.zeros(3))
    with pytest.raises(ValueError, match="out of range"):
        write_store(tmp_path / "a.h5", np.zeros((2, 3)), [0, 5], ["a", "b"])
    with pytest.raises(ValueError, match="unique"):
        write_store(tmp_path / "a.h5", np.zeros((2, 3)), [0, 1], ["a", "b"], keys=["x", "x"])
    write_store(tmp_path / "a.h5", np.zeros((2, 3)), [0, 1], ["a", "b"])
    with pytest.raises(FileExistsError):
        write_store(tmp_path / "a.h5", np.zeros((2, 3)), [0, 1], ["a", "b"])


def test_add_prompt_sets_keeps_images_and_refuses_duplicates(tmp_path):
    X = l2_normalize(np.random.default_rng(1).normal(size=(10, 4)))
    p = write_store(tmp_path / "s.h5", X, np.arange(10) % 2, ["a", "b"])
    add_prompt_sets(p, [_prompts(["a", "b"], 4, name="t1")])
    add_prompt_sets(p, [_prompts(["x", "y", "z"], 4, templates=("{}",), name="other-labels")])
    with open_store(p) as s:
        assert s.prompt_sets() == ["other-labels", "t1"]
        assert s.prompt_set("other-labels").classes == ["x", "y", "z"]
        np.testing.assert_array_equal(s.embeddings(), X)
    with pytest.raises(StoreError, match="already exists"):
        add_prompt_sets(p, [_prompts(["a", "b"], 4, name="t1")])
    with pytest.raises(StoreError, match="dim 4"):
        add_prompt_sets(p, [_prompts(["a", "b"], 5, name="t2")])
    with open_store(p) as s:
        assert s.prompt_sets() == ["other-labels", "t1"]  # the failed add left the store as it was


def _writer(tmp_path):
    return StoreWriter.create(tmp_path / "s.h5", dim=4, classes=["a", "b"], dtype="float32",
                              extras={"v": ((), np.float32, None)}, attrs={"model_id": "m", "normalized": True})


def test_incomplete_store_is_refused_unless_asked(tmp_path):
    w = _writer(tmp_path)
    w.append(np.ones((3, 4)), ["0", "1", "2"], [0, 1, 0], {"v": np.arange(3.0)})
    w.commit(3)
    part = StoreWriter.partial_path(tmp_path / "s.h5")
    with pytest.raises(FileNotFoundError, match="unfinished encode"):
        open_store(tmp_path / "s.h5")
    with pytest.raises(StoreError, match="incomplete"):
        open_store(part)
    with open_store(part, allow_incomplete=True) as s:
        assert len(s) == 3 and s.keys == ["0", "1", "2"]
    w.skip("3", "zero-byte file")
    w.commit(4)
    w.finish([_prompts(["a", "b"], 4)], default_prompts="default")
    assert not part.exists()
    with open_store(tmp_path / "s.h5") as s:
        assert s.complete and s.skipped() == [("3", "zero-byte file")] and s.prompt_set().name == "default"


WRITER = textwrap.dedent("""
    import sys, numpy as np
    from clip_heads.journal import StoreWriter
    w = StoreWriter.create(sys.argv[1], dim=4, classes=["a"], dtype="float32", extras={}, attrs={"model_id": "m", "normalized": False})
    i = 0
    while True:
        w.append(np.full((8, 4), i, np.float32), [f"{i}-{j}" for j in range(8)], [0] * 8)
        w.commit((i + 1) * 8)
        if i == 5:
            print("ready", flush=True)
        i += 1
""")


def test_sigkilled_writer_resumes_from_committed_prefix(tmp_path):
    path = tmp_path / "s.h5"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    w = StoreWriter.resume(path)
    items, rows, _ = w.progress
    assert items == rows and rows % 8 == 0 and rows >= 48
    w.append(np.full((8, 4), -1, np.float32), [f"tail-{j}" for j in range(8)], [0] * 8)
    w.commit(items + 8)
    w.finish()
    with open_store(path) as s:
        X = s.embeddings()
        assert len(s) == rows + 8
        for i in range(rows // 8):  # every committed batch is intact and in order
            assert (X[i * 8:(i + 1) * 8] == i).all()
            assert s.keys[i * 8] == f"{i}-0"
        assert (X[rows:] == -1).all()
