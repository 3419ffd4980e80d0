"""Past one machine without Ray: Slurm/torchrun shards with done-markers, one worker per device,
merges over the shard files, webdataset and parquet sources, and predict's streaming pass."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from clip_heads.cli import main
from clip_heads.datasets import open_source
from clip_heads.encode import encode
from clip_heads.engines import plan_blocks
from clip_heads.images import BadImage, ImageLimits
from clip_heads.verify import verify_store
from clip_heads.sharding import auto_shard, find_shards, shard_path
from clip_heads.store import StoreError, open_store
from clip_heads.webdataset_source import expand_braces
from scalekit import assert_same, content, jpeg_folder

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1", **extra)
    return env


# -- plans and scheduler variables -----------------------------------------------------------------
def test_blocks_are_the_batches_of_an_uninterrupted_run():
    assert plan_blocks(10, 0, 4) == [(0, 4), (4, 8), (8, 10)]
    assert plan_blocks(10, 5, 4) == [(5, 8), (8, 10)]  # a resume inside a batch first finishes it
    assert plan_blocks(10, 10, 4) == [] and plan_blocks(0, 0, 3) == []


@pytest.mark.parametrize("env, want", [
    ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "64"}, (3, 64)),
    ({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_STEP": "2"}, (3, 4)),
    ({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "5"}, (5, 8)),
])
def test_auto_shard_reads_the_scheduler(env, want):
    assert auto_shard(env) == want


@pytest.mark.parametrize("env, needle", [
    ({}, "neither is set"),
    ({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "4"}, "shard 4 of 4"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x'"),
])
def test_auto_shard_refuses_what_it_cannot_use(env, needle):
    with pytest.raises(ValueError, match=needle):
        auto_shard(env)


def test_shard_auto_without_a_scheduler_is_a_usage_error(tiny_clip, tmp_path, monkeypatch):
    for k in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    root = jpeg_folder(tmp_path / "imgs", n_per_class=1)
    for extra, needle in ((["--shard", "auto"], "SLURM_ARRAY_TASK_ID"), (["--devices", "gpu:7"], "gpu:7"),
                          (["--address", "auto"], "--engine ray")):
        res = CliRunner().invoke(main, ["encode", str(root), "--out", str(tmp_path / "s.h5"), "--model", tiny_clip, *extra])
        assert res.exit_code == 2 and needle in res.output and "Traceback" not in res.output, res.output
    assert not list(tmp_path.glob("s*.h5*"))


def test_devices_are_named_one_kind_at_a_time():
    import torch

    from clip_heads.engines import parse_devices

    assert parse_devices("cpu, cpu") == ["cpu", "cpu"] and parse_devices(None) is None
    for text, needle in (("cpu,mps", "mps device"), ("", "names no device"), ("cuda", "index")):
        with pytest.raises(ValueError, match=needle):
            parse_devices(text)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device is visible"):
            parse_devices("all")
        with pytest.raises(ValueError, match="cuda:0 does not exist"):
            parse_devices("cpu,cuda:0")


# -- a Slurm array, its done-markers, and merges over the shard files --------------------------------------
def test_slurm_array_shards_merge_over_the_shard_files_into_one_encode(tiny_clip, tmp_path, monkeypatch):
    root = jpeg_folder(tmp_path / "imgs", n_per_class=4)
    (root / "joy" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    common = [str(root), "--model", tiny_clip, "--workers", "0", "--batch-size", "3", "-t", "bp-emotion"]
    full = tmp_path / "full.h5"
    assert CliRunner().invoke(main, ["-q", "encode", *common, "--out", str(full)]).exit_code == 0

    # Two tasks of one array (sbatch --array=0-1), the same command line: task 0 in a process of
    # its own, task 1 in this one, at the same time.
    out = tmp_path / "run" / "data.h5"
    cmd = [sys.executable, "-m", "clip_heads.cli", "-q", "encode", *common, "--out", str(out), "--shard", "auto"]
    task0 = subprocess.Popen(cmd, env=_env(SLURM_ARRAY_TASK_ID="0", SLURM_ARRAY_TASK_COUNT="2"),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    res = CliRunner().invoke(main, ["-q", "encode", *common, "--out", str(out), "--shard", "auto"])
    assert res.exit_code == 0, res.output
    assert task0.wait(timeout=300) == 0, task0.stdout.read()
    shards = [shard_path(out, i, 2) for i in range(2)]
    assert [p.name for p in shards] == ["data.shard-00000-of-00002.h5", "data.shard-00001-of-00002.h5"]
    assert all(p.is_file() and Path(f"{p}.done").is_file() for p in shards)

    # A rerun of the array: the finished shard lists nothing, loads nothing, writes nothing.
    enc = sys.modules["clip_heads.encode"]  # the package's `encode` attribute is the function

    def no_listing(*a, **k):
        raise AssertionError("a finished shard must not list its source")

    monkeypatch.setattr(enc, "open_source", no_listing)
    before = shards[1].stat().st_mtime_ns
    res = CliRunner().invoke(main, ["encode", *common, "--out", str(out), "--shard", "auto"])
    assert res.exit_code == 0 and res.output.startswith("up-to-date"), res.output
    assert shards[1].stat().st_mtime_ns == before
    monkeypatch.undo()

    # merge finds the array's shards from OUT and reads their rows in place
    res = CliRunner().invoke(main, ["merge", str(out)])
    assert res.exit_code == 0 and "nothing copied" in res.output, res.output
    copied = tmp_path / "run" / "copied.h5"
    assert CliRunner().invoke(main, ["merge", "--copy", str(copied), *map(str, shards[::-1])]).exit_code == 0
    with h5py.File(out, "r") as f:
        assert f["images/embeds"].is_virtual and f["images/keys"].is_virtual
        assert {vs.file_name for vs in f["images/embeds"].virtual_sources()} == {p.name for p in shards}
    assert out.stat().st_size < copied.stat().st_size - 2 * 16 * 16  # the vectors stayed in the shards
    v, c, f = content(out), content(copied), content(full)
    assert_same(v, c, attrs_except=("virtual_sources", "virtual_shards"))  # equal bit for bit, but where the rows lie
    # ...and one unsharded encode (batches are cut per shard: float rounding apart)
    assert_same(v, f, atol=1e-6, attrs_except=("merged_from", "virtual_sources", "virtual_shards"))
    assert v["skipped"] == [("joy/broken.jpg", v["skipped"][0][1])] and v["skipped"][0][1]
    rep = verify_store(out)
    assert rep.ok and rep.rows == len(v["keys"]), rep.text

    # The set moves as a folder: the shards are named relative to the merged store.
    moved = tmp_path / "elsewhere"
    shutil.move(str(tmp_path / "run"), moved)
    monkeypatch.chdir(tmp_path)
    assert_same(content(moved / "data.h5"), v, attrs_except=("merged_from",))
    assert verify_store(moved / "data.h5").ok

    # A shard gone: refused on open, by verify and by a new merge, each naming it.
    (moved / shards[1].name).unlink()
    with pytest.raises(StoreError, match=shards[1].name):
        open_store(moved / "data.h5")
    res = CliRunner().invoke(main, ["verify", str(moved / "data.h5")])
    assert res.exit_code == 1 and shards[1].name in res.output
    res = CliRunner().invoke(main, ["merge", "--overwrite", str(moved / "data.h5")])
    assert res.exit_code == 1 and shards[1].name in res.output and "Traceback" not in res.output
    assert sorted(p.name for p in moved.glob("*.h5")) == ["copied.h5", "data.h5", shards[0].name]


def test_a_shard_changed_after_the_merge_is_refused_and_damage_is_found_by_verify(tiny_clip, tmp_path):
    root = jpeg_folder(tmp_path / "imgs", n_per_class=3)
    kw = dict(model=tiny_clip, workers=0, progress=False, batch_size=4, templates=["bp-emotion"])
    shards = [encode(str(root), tmp_path / f"s{i}.h5", shard=(i, 2), **kw).path for i in range(2)]
    from clip_heads.writer import merge_stores

    merge_stores(tmp_path / "m.h5", shards)
    # damage one chunk of a shard's vectors: read through the merged store, it is an error, not zeros
    with h5py.File(shards[0], "r") as f:
        off = f["images/embeds"].id.get_chunk_info(0).byte_offset
    with open(shards[0], "r+b") as fh:
        fh.seek(off + 3)
        b = fh.read(1)
        fh.seek(off + 3)
        fh.write(bytes([b[0] ^ 0xFF]))
    rep = verify_store(tmp_path / "m.h5")
    assert not rep.ok and any(p.dataset == "s0.h5:/images/embeds" for p in rep.problems), rep.text
    with pytest.raises(StoreError, match="damaged"):
        with open_store(tmp_path / "m.h5") as s:
            s.embeddings()
    # a shard re-encoded after the merge is another file: refused, naming it
    encode(str(root), shards[1], shard=(1, 2), overwrite=True, **kw)
    with pytest.raises(StoreError, match="s1.h5 .*not the ones merged|not the ones merged.*s1.h5"):
        open_store(tmp_path / "m.h5")


def test_find_shards_names_the_missing_ones(tmp_path):
    out = tmp_path / "d.h5"
    for i in (0, 2):
        shard_path(out, i, 4).write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="2 of the 4 .*d.shard-00001-of-00004.h5, d.shard-00003-of-00004.h5"):
        find_shards(out)


# -- one worker per device ---------------------------------------------------------------------------
def test_two_cpu_workers_write_the_single_process_store(tiny_clip, tmp_path):
    root = jpeg_folder(tmp_path / "imgs", n_per_class=4)
    (root / "sadness" / "empty.jpg").write_bytes(b"")
    common = [str(root), "--model", tiny_clip, "--workers", "0", "--batch-size", "2", "--dtype", "float32", "-t", "bp-emotion"]
    assert CliRunner().invoke(main, ["-q", "encode", *common, "--out", str(tmp_path / "one.h5")]).exit_code == 0
    res = CliRunner().invoke(main, ["-q", "encode", *common, "--out", str(tmp_path / "two.h5"), "--devices", "cpu,cpu"])
    assert res.exit_code == 0 and res.output.startswith("encoded"), res.output
    a, b = content(tmp_path / "one.h5"), content(tmp_path / "two.h5")
    assert_same(a, b, atol=1e-5)
    assert len(a["keys"]) == 12 and a["skipped"][0][0] == "sadness/empty.jpg"


# -- sources at scale --------------------------------------------------------------------------------
def _tar(path: Path, members) -> Path:
    with tarfile.open(path, "w") as t:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))
    return path


def test_brace_patterns_expand_like_webdataset():
    assert expand_braces("d/{000..002}.tar") == ["d/000.tar", "d/001.tar", "d/002.tar"]
    assert expand_braces("{a,b}-{8..10}") == ["a-8", "a-9", "a-10", "b-8", "b-9", "b-10"]
    with pytest.raises(ValueError, match="more than 1000"):
        expand_braces("{0..999}{0..9}", limit=1000)


def test_webdataset_and_parquet_encode_to_the_folder_vectors(tiny_clip, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    root = jpeg_folder(tmp_path / "imgs", n_per_class=4)
    folder = open_source(str(root))
    files = [(k, (root / k).read_bytes(), int(y)) for k, y in zip(folder.keys, folder.labels, strict=True)]
    wds = tmp_path / "wds"
    wds.mkdir()
    for s in range(3):  # labels as .cls integers in two shards, as .json in the third
        part = files[s * 4:(s + 1) * 4]
        members = []
        for k, data, y in part:
            stem = k.rsplit(".", 1)[0]
            members += [(f"{stem}.jpg", data),
                        (f"{stem}.json", json.dumps({"label": y}).encode()) if s == 2 else (f"{stem}.cls", str(y).encode())]
        _tar(wds / f"shard-{s:03d}.tar", members)
    pq.write_table(pa.Table.from_pylist([{"img": {"bytes": d, "path": None}, "label": folder.classes[y], "id": k}
                                         for k, d, y in files]), tmp_path / "rows.parquet", row_group_size=5)
    (tmp_path / "paths").mkdir()
    shutil.copytree(root, tmp_path / "paths" / "imgs")
    pq.write_table(pa.Table.from_pylist([{"path": f"imgs/{k}", "label": folder.classes[y]} for k, _, y in files]),
                   tmp_path / "paths" / "list.parquet")

    kw = dict(model=tiny_clip, workers=0, progress=False, batch_size=5, templates=["bp-emotion"], dtype="float32")
    ref = content(encode(str(root), tmp_path / "folder.h5", **kw).path)
    runs = {
        "webdataset": (str(wds / "shard-{000..002}.tar"), {"classes": ",".join(folder.classes)}, lambda k: k + ".jpg"),
        "parquet-bytes": (str(tmp_path / "rows.parquet"), {"key_column": "id"}, lambda k: k),
        "parquet-paths": (str(tmp_path / "paths" / "list.parquet"), {}, lambda k: folder.keys[int(k)]),
    }
    for name, (src, opts, to_folder_key) in runs.items():
        got = content(encode(src, tmp_path / f"{name}.h5", source_options=opts, **kw).path)
        assert [to_folder_key(k) for k in got["keys"]] == ref["keys"], name
        assert got["classes"] == ref["classes"] and np.array_equal(got["labels"], ref["labels"]), name
        np.testing.assert_array_equal(got["embeds"], ref["embeds"], err_msg=name)
        assert got["attrs"]["source"]["format"] == name.split("-")[0]


def test_hostile_webdataset_members_are_refused_not_followed(tmp_path):
    jpeg = (jpeg_folder(tmp_path / "imgs", n_per_class=1) / "joy" / "000.jpg").read_bytes()
    t = tmp_path / "a.tar"
    with tarfile.open(t, "w") as tf:
        for name, data in (("ok.jpg", jpeg), ("big.jpg", jpeg), ("ok.cls", b"1"), ("orphan.cls", b"0")):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
        link = tarfile.TarInfo("link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    src = open_source(str(t), format="webdataset", limits=ImageLimits(max_file_bytes=len(jpeg)))
    assert src.keys == ["ok", "big", "orphan", "link"] and src.classes == ["0", "1"]
    assert src.load(0).mode == "RGB" and src.labels.tolist() == [1, -1, 0, -1]
    src.limits = ImageLimits(max_file_bytes=len(jpeg) - 1)
    reasons = {}
    for i, k in enumerate(src.keys):
        try:
            src.load(i)
        except BadImage as e:
            reasons[k] = str(e)
    assert "file too large" in reasons["big"] and "no image member" in reasons["orphan"]
    assert "not a regular file" in reasons["link"]
    # a shard cut short after it was opened: the read comes up short, and the image is skipped with the reason
    (tmp_path / "cut.tar").write_bytes(t.read_bytes())
    src = open_source(str(tmp_path / "cut.tar"), format="webdataset")
    os.truncate(tmp_path / "cut.tar", 512 + len(jpeg) // 2)
    with pytest.raises(BadImage, match="truncated member"):
        src.load(0)
    # refused when opened, each in one line naming the shard: truncated, compressed, duplicate keys, ...
    import gzip

    (tmp_path / "z.tar").write_bytes(gzip.compress(t.read_bytes()))
    _tar(tmp_path / "dup.tar", [("ok.jpg", jpeg)])
    big_label = _tar(tmp_path / "lbl.tar", [("x.jpg", jpeg), ("x.json", b" " * 70000 + b"{}")])
    for spec, needle in ((tmp_path / "cut.tar", "cut.tar' is not a readable tar"), (tmp_path / "z.tar", "compressed"), (tmp_path / "{a,dup}.tar", "in both"),
                         (tmp_path / "{a,missing}.tar", "missing.tar"), (big_label, "label member")):
        with pytest.raises((ValueError, FileNotFoundError), match=needle):
            open_source(str(spec), format="webdataset")


def test_a_parquet_path_column_stays_inside_its_folder(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    jpeg = jpeg_folder(tmp_path / "imgs", n_per_class=1) / "joy" / "000.jpg"
    (tmp_path / "table").mkdir()
    shutil.copyfile(jpeg, tmp_path / "table" / "in.jpg")
    pq.write_table(pa.Table.from_pylist([{"path": p} for p in ("in.jpg", "../imgs/joy/000.jpg", str(jpeg), None)]),
                   tmp_path / "table" / "t.parquet")
    src = open_source(str(tmp_path / "table" / "t.parquet"))
    assert src.image_column == "path" and src.classes == [] and src.labels.tolist() == [-1] * 4
    assert src.load(0).mode == "RGB"
    for i in (1, 2):
        with pytest.raises(BadImage, match="outside the source root"):
            src.load(i)
    with pytest.raises(BadImage, match="empty cell|no image"):
        src.load(3)
    assert open_source(str(tmp_path / "table" / "t.parquet"), allow_outside_root=True).load(1).mode == "RGB"


# -- predict -------------------------------------------------------------------------------------
def _head(store, out, model_hash=None):
    from clip_heads.heads import get_head

    with open_store(store) as s:
        X, y, classes = s.arrays()
        m = s.backbone()
    head = get_head("linear")(random_state=0).fit(X, np.asarray(classes)[y])
    head.set_backbone(m["model_id"], model_hash or m["model_hash"], m["dim"])
    head.save_pretrained(out)
    return head, X


def test_predict_streams_the_heads_probabilities_and_top_k(tiny_clip, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    root = jpeg_folder(tmp_path / "imgs", n_per_class=4)
    (root / "anger" / "zz.jpg").write_text("not an image")
    store = encode(str(root), tmp_path / "s.h5", model=tiny_clip, workers=0, progress=False, batch_size=4,
                   templates=["bp-emotion"]).path
    head, X = _head(store, tmp_path / "head")
    with open_store(store) as s:
        keys, skipped = s.keys, dict(s.skipped())
    res = CliRunner().invoke(main, ["-q", "predict", str(tmp_path / "head"), str(root), "--out", str(tmp_path / "p.parquet"),
                                    "--top-k", "2", "--batch-size", "5", "--workers", "0"])
    assert res.exit_code == 0, res.output
    t = pq.read_table(tmp_path / "p.parquet")
    meta = json.loads(t.schema.metadata[b"clip_heads"])
    rows = t.to_pylist()
    assert [r["key"] for r in rows] == sorted(keys + list(skipped), key=lambda k: (k.split("/")[0], k))
    good = [r for r in rows if r["skipped"] is None]
    assert [r["key"] for r in good] == keys and meta["classes"] == list(head.classes_)
    P = np.array([[r[f"p_{c}"] for c in head.classes_] for r in good])
    np.testing.assert_allclose(P, head.predict_proba(X), rtol=0, atol=1e-6)  # the store's own vectors, scored
    assert [r["prediction"] for r in good] == list(head.predict(X))
    bad = [r for r in rows if r["skipped"] is not None]
    assert [(r["key"], r["skipped"], r["prediction"]) for r in bad] == [("anger/zz.jpg", skipped["anger/zz.jpg"], None)]
    top = json.loads((tmp_path / "p.top2.json").read_text())
    for j, c in enumerate(head.classes_):
        order = sorted(range(len(keys)), key=lambda i: (-P[i, j], i))[:2]
        assert [e["key"] for e in top[c]] == [keys[i] for i in order]

    # a head trained on other weights is refused before anything is written
    _head(store, tmp_path / "other", model_hash="sha256:" + "0" * 64)
    res = CliRunner().invoke(main, ["predict", str(tmp_path / "other"), str(root), "--out", str(tmp_path / "q.parquet")])
    assert res.exit_code == 1 and "model_hash" in res.output and not (tmp_path / "q.parquet").exists()


_RSS_SCRIPT = """
import resource, sys
from clip_heads.predict import predict
r = predict(sys.argv[1], sys.argv[2], sys.argv[3], batch_size=64, workers=0, progress=False)
print(r.n_rows, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def test_predict_memory_stays_flat_from_1k_to_5k_images(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    from PIL import Image

    from conftest import build_tiny_clip

    clip8 = str(build_tiny_clip(tmp_path / "clip8", image_size=8))  # 17 tokens an image: the pass itself is quick
    rng = np.random.default_rng(0)
    rows = []
    for i in range(5000):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buf, format="PNG")
        rows.append({"image": buf.getvalue(), "key": f"img{i:05d}"})
    for n in (1000, 5000):
        pq.write_table(pa.Table.from_pylist(rows[:n]), tmp_path / f"rows{n}.parquet", row_group_size=500)
    root = jpeg_folder(tmp_path / "imgs", n_per_class=3)
    store = encode(str(root), tmp_path / "s.h5", model=clip8, workers=0, progress=False, templates=["bp-emotion"]).path
    _head(store, tmp_path / "head")
    procs = [subprocess.Popen([sys.executable, "-c", _RSS_SCRIPT, str(tmp_path / "head"), str(tmp_path / f"rows{n}.parquet"),
                               str(tmp_path / f"p{n}.parquet")], env=_env(OMP_NUM_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for n in (1000, 5000)]
    got = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        got.append([int(v) for v in out.split()])
    (n1, rss1), (n5, rss5) = got
    assert (n1, n5) == (1000, 5000) and pq.read_metadata(tmp_path / "p5000.parquet").num_rows == 5000
    # 4,000 more images (54 MB of preprocessed pixels, were they kept) cost no more than noise
    assert abs(rss5 - rss1) < 16, (rss1, rss5)
