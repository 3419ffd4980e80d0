"""Dataset sources, on tiny files written by the tests (and real data when present); decoding is in test_images.py."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import tarfile

import numpy as np
import pytest
from PIL import Image

from clip_heads import datasets as ds
from clip_heads.datasets import list_formats, open_source
from clip_heads.images import BadImage
from clip_heads.source import Source
from conftest import SHARED_DATASETS, requires_shared


def _img(path, color=(10, 20, 30), size=(8, 6), fmt=None, **save):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, fmt, **save)
    return path


def _rand(path, seed, size=(7, 5)):
    """A random lossless image; returns its pixels for equality checks."""
    a = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)
    return a


# --------------------------------------------------------------------------- folder

@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "pets"
    pix = {"b_dog/x.png": _rand(root / "b_dog/x.png", 1), "b_dog/sub/deep/y.bmp": None,
           "a_cat/B.PNG": _rand(root / "a_cat/B.PNG", 2), "a_cat/a.png": _rand(root / "a_cat/a.png", 3)}
    _img(root / "b_dog/sub/deep/y.bmp", (1, 2, 3), fmt="BMP")
    _img(root / "a_cat/c.JPG")
    (root / "a_cat/.hidden.png").write_bytes(b"junk")
    (root / "a_cat/notes.txt").write_text("ignored")
    _img(root / ".git/skip.png")
    _img(root / "b_dog/.cache/skip.png")
    _img(root / "loose.png")  # not in a class folder
    return root, pix


def test_folder_source(folder):
    root, pix = folder
    src = open_source(root)
    assert src.format == "folder" and src.root == str(root) and len(src) == 5
    assert src.classes == ["a_cat", "b_dog"]
    assert src.keys == ["a_cat/B.PNG", "a_cat/a.png", "a_cat/c.JPG", "b_dog/sub/deep/y.bmp", "b_dog/x.png"]
    assert src.labels.dtype == np.int64 and src.labels.tolist() == [0, 0, 0, 1, 1]
    for i, key in enumerate(src.keys):
        if pix.get(key) is not None:
            assert np.array_equal(np.asarray(src.load(i)), pix[key])
    assert src.load(3).getpixel((0, 0)) == (1, 2, 3)
    key, im, label = src[4]
    assert key == "b_dog/x.png" and label == 1 and im.mode == "RGB"
    assert [k for k, _, _ in src] == src.keys
    d = src.describe()
    assert json.loads(json.dumps(d)) == d and d["n"] == 5 and d["format"] == "folder"


def test_source_is_picklable(folder):
    src = open_source(folder[0])
    clone = pickle.loads(pickle.dumps(src))
    assert clone.keys == src.keys and np.array_equal(np.asarray(clone.load(1)), folder[1]["a_cat/a.png"])


def test_fingerprint_tracks_listing_not_pixels(folder, monkeypatch):
    root, _ = folder
    fp = open_source(root).fingerprint()
    assert fp == open_source(root).fingerprint() and len(fp) == 64
    monkeypatch.setattr(Image, "open", lambda *a, **k: pytest.fail("fingerprint decoded an image"))
    assert open_source(root).fingerprint() == fp
    monkeypatch.undo()
    _img(root / "a_cat/d.png")
    added = open_source(root).fingerprint()
    os.rename(root / "a_cat/d.png", root / "b_dog/d.png")
    moved = open_source(root).fingerprint()
    (root / "b_dog/d.png").unlink()
    assert len({fp, added, moved}) == 3 and open_source(root).fingerprint() == fp
    with open(root / "a_cat/a.png", "ab") as f:
        f.write(b"\0")  # same listing, different file
    assert open_source(root).fingerprint() != fp


def test_source_load_reports_bad_image(folder):
    root, _ = folder
    (root / "a_cat/a.png").write_bytes(b"")
    with pytest.raises(BadImage, match="zero-byte file"):
        open_source(root).load(1)


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        open_source(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class folders"):
        open_source(tmp_path / "empty")
    _img(tmp_path / "d/full/a.png")
    (tmp_path / "d/hollow").mkdir()
    (tmp_path / "d/hollow/readme.txt").write_text("x")
    with pytest.raises(ValueError, match="'hollow'.*no images"):
        open_source(tmp_path / "d")
    with pytest.raises(ValueError, match=r"'tfrecord'.*folder, csv, emotion6, fi, webemo, cifar100, emoset, "
                                         r"artphoto, abstract, twitter1, emotionroi, hf, parquet, webdataset, auto"):
        open_source(tmp_path / "d", format="tfrecord")
    with pytest.raises(ValueError, match=r"'folder' does not take option\(s\) \['level'\]; valid: none"):
        open_source(tmp_path / "d", level=7)
    assert list_formats() == ["folder", "csv", "emotion6", "fi", "webemo", "cifar100", "emoset", "artphoto",
                              "abstract", "twitter1", "emotionroi", "hf", "parquet", "webdataset", "auto"]
    assert set(ds.SOURCES) == set(list_formats()) - {"auto"}


# --------------------------------------------------------------------------- csv / tsv

def test_csv_manifest(tmp_path):
    a = _rand(tmp_path / "imgs/a.png", 5)
    _img(tmp_path / "imgs/b.png")
    _img(tmp_path / "other/c.png")
    (tmp_path / "m.csv").write_text("path,label,split\nimgs/b.png,zebra,train\nimgs\\a.png,ant,test\n\n"
                                    "other/c.png,zebra,val\n")
    src = open_source(tmp_path / "m.csv")
    assert src.format == "csv" and src.root == str(tmp_path / "m.csv")
    assert src.classes == ["ant", "zebra"]
    assert src.keys == ["imgs/a.png", "imgs/b.png", "other/c.png"] and src.labels.tolist() == [0, 1, 1]
    assert src.extras["split"].tolist() == ["test", "train", "val"]
    assert np.array_equal(np.asarray(src.load(0)), a)

    (tmp_path / "m.tsv").write_text(f"path\tlabel\nother/c.png\tq\n{tmp_path / 'imgs/b.png'}\tq\n")
    tsv = open_source(tmp_path / "m.tsv")
    assert tsv.format == "csv" and tsv.classes == ["q"] and tsv.extras == {}
    assert tsv.keys == sorted(["other/c.png", f"{tmp_path}/imgs/b.png"]) and tsv.load(1).size == (8, 6)


@pytest.mark.parametrize("body, message", [
    ("path,label\nimgs/a.png,x\nimgs/gone.png,y\n", r"row 2 \(line 3\): file 'imgs/gone.png' not found"),
    ("path,label\nimgs/a.png,\n", r"row 1 \(line 2\): missing label"),
    ("path,label\n,x\n", r"row 1 \(line 2\): missing path"),
    ("file,class\nimgs/a.png,x\n", r"header must name columns path,label\[,split\]; got \['file', 'class'\]"),
    ("path,label\nimgs/a.png,x\nimgs/a.png,y\n", r"row 2 .*'imgs/a.png' already listed in row 1"),
    ("path,label\n", r"contains no images"),
])
def test_csv_errors(tmp_path, body, message):
    _img(tmp_path / "imgs/a.png")
    (tmp_path / "m.csv").write_text(body)
    with pytest.raises(ValueError, match=message):
        open_source(tmp_path / "m.csv")


# --------------------------------------------------------------------------- emotion6

E6_ROWS = {
    "disgust/1.jpg": [2.5, 3.8, 0.133333, 0.7, 0, 0.0666667, 0.1, 0, 0],
    "joy/1.jpg": [8, 4.5, 0, 0, 0, 0.666667, 0, 0.266667, 0.0666667],
}


def _emotion6(root, rows=E6_ROWS, extra_rows=()):
    for c in ds.EMOTION6_CLASSES:
        _img(root / "images" / c / "1.jpg")
    head = "[image_filename]\t[valence]\t[arousal]\t" + "\t".join(
        f"[prob. {c}]" for c in ds.EMOTION6_DISTRIBUTION)
    lines = [head] + [f"{k}\t" + "\t".join(str(v) for v in rows.get(k, [5, 5] + [0] * 6 + [1]))
                      for k in [f"{c}/1.jpg" for c in ds.EMOTION6_CLASSES] + list(extra_rows)]
    (root / "ground_truth.txt").write_text("\n".join(lines) + "\n")
    return root


def test_emotion6_synthetic(tmp_path):
    src = open_source(_emotion6(tmp_path / "e6"))
    assert src.format == "emotion6" and src.classes == ds.EMOTION6_CLASSES
    assert src.keys == [f"{c}/1.jpg" for c in ds.EMOTION6_CLASSES] and src.labels.tolist() == list(range(6))
    assert src.extras_meta == {"emotion_distribution": ds.EMOTION6_DISTRIBUTION}
    dist = src.extras["emotion_distribution"]
    assert dist.shape == (6, 7) and dist.dtype == np.float32
    np.testing.assert_allclose(dist[1], E6_ROWS["disgust/1.jpg"][2:], atol=1e-6)
    assert src.extras["valence"][3] == 8 and src.extras["arousal"][1] == pytest.approx(3.8)
    assert src.load(2).size == (8, 6)


def test_emotion6_mismatches(tmp_path):
    root = _emotion6(tmp_path / "a", extra_rows=["fear/2.jpg"])
    with pytest.raises(ValueError, match="not under images/, e.g. 'fear/2.jpg'"):
        open_source(root)
    root = _emotion6(tmp_path / "b")
    _img(root / "images/joy/9.jpg")
    with pytest.raises(ValueError, match="no row in .*'joy/9.jpg'"):
        open_source(root)
    (root / "ground_truth.txt").write_text("[image_filename]\njoy/1.jpg\t1\t2\n")
    with pytest.raises(ValueError, match="line 2: expected a file name and 9 numbers"):
        open_source(root, format="emotion6")


@requires_shared
def test_emotion6_real():
    src = open_source(SHARED_DATASETS / "emotion6")
    assert src.format == "emotion6" and len(src) == 1980
    assert np.bincount(src.labels).tolist() == [330] * 6
    dist = src.extras["emotion_distribution"]
    np.testing.assert_allclose(dist.sum(1), 1.0, atol=2e-3)
    i = src.keys.index("disgust/1.jpg")
    assert src.labels[i] == 1 and src.extras["valence"][i] == pytest.approx(2.5)
    assert src.extras["arousal"][i] == pytest.approx(3.8)
    np.testing.assert_allclose(dist[i], [0.133333, 0.7, 0, 0.0666667, 0.1, 0, 0], atol=1e-6)
    assert src.load(i).mode == "RGB"


@requires_shared
def test_cifar100_partial_real_is_a_folder():
    src = open_source(SHARED_DATASETS / "cifar100-partial" / "test")
    assert src.format == "folder" and len(src.classes) == 100 and len(src) == 916
    assert src.classes[0] == "apple" and src.load(0).size == (32, 32)


# --------------------------------------------------------------------------- fi / webemo

def test_fi(tmp_path):
    for i, c in enumerate(ds.FI_CLASSES):
        _img(tmp_path / "fi" / (c.title() if i % 2 else c) / f"{c}_{i}.jpg")
    src = open_source(tmp_path / "fi", format="fi")
    assert src.classes == ds.FI_CLASSES and src.labels.tolist() == list(range(8))
    assert src.keys[1] == "Anger/anger_1.jpg"
    assert open_source(tmp_path / "fi").format == "folder"  # never silently promoted
    _img(tmp_path / "fi/joy/1.jpg")
    with pytest.raises(ValueError, match=r"unexpected class folder\(s\) \['joy'\].*valid: amusement"):
        open_source(tmp_path / "fi", format="fi")
    shutil.rmtree(tmp_path / "fi/joy")
    _img(tmp_path / "fi/anger/2.jpg")
    with pytest.raises(ValueError, match=r"folders 'Anger' and 'anger' .* are both class 'anger'"):
        open_source(tmp_path / "fi", format="fi")
    shutil.rmtree(tmp_path / "fi/anger")
    shutil.rmtree(tmp_path / "fi/awe")
    with pytest.raises(ValueError, match=r"missing class folder\(s\) \['awe'\]"):
        open_source(tmp_path / "fi", format="fi")


def _webemo_fines():
    return [(p, m, f) for p, mids in ds.WEBEMO_HIERARCHY.items() for m, fs in mids.items() for f in fs]


def test_webemo_hierarchy_is_2_7_25():
    fines = _webemo_fines()
    assert len(fines) == 25 and len({f for _, _, f in fines}) == 25
    assert len({m for _, m, _ in fines}) == 7 and {p for p, _, _ in fines} == {"positive", "negative"}


@pytest.mark.parametrize("nested", [False, True])
def test_webemo_levels(tmp_path, nested):
    root = tmp_path / "web"
    for p, m, f in _webemo_fines():
        folder = {"cheerfulness": "cheerfullness", "irritability": "Irritabilty"}.get(f, f)  # release spellings
        _img(root / (f"{p}/{m}/{folder}" if nested else folder) / f"{f}.jpg")
    s25 = open_source(root, format="webemo", level=25)
    assert len(s25.classes) == 25 and s25.classes[:2] == ["affection", "cheerfulness"]
    assert s25.labels.tolist() == list(range(25)) and s25.describe()["options"] == {"level": 25}
    s7 = open_source(root, format="webemo")  # default level 7
    assert s7.classes == ["anger", "confusion", "fear", "joy", "love", "sadness", "surprise"]
    assert np.bincount(s7.labels).tolist() == [5, 1, 2, 7, 3, 6, 1]
    assert s7.labels[s7.keys.index(next(k for k in s7.keys if k.endswith("/lust.jpg")))] == 4
    s2 = open_source(root, format="webemo", level="2")
    assert s2.classes == ["negative", "positive"] and np.bincount(s2.labels).tolist() == [14, 11]
    assert s2.fingerprint() != s7.fingerprint()
    with pytest.raises(ValueError, match=r"level must be one of 2, 7, 25; got 6"):
        open_source(root, format="webemo", level=6)


def test_webemo_unknown_folder(tmp_path):
    _img(tmp_path / "web/bliss/1.jpg")
    with pytest.raises(ValueError, match=r"unexpected class folder\(s\) \['bliss'\]"):
        open_source(tmp_path / "web", format="webemo")


# --------------------------------------------------------------------------- cifar100

FINE = [f"fine{i}" for i in range(4)]
COARSE = ["vehicles", "animals"]


def _cifar_files(folder, n_train=3, n_test=2, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    truth = {}
    for split, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = [int(x) for x in rng.integers(0, 4, n)]
        d = {b"filenames": [f"img{i}.png".encode() for i in range(n)], b"batch_label": split.encode(),
             b"fine_labels": fine, b"coarse_labels": [f % 2 for f in fine], b"data": data}
        blob = pickle.dumps(d, protocol=2)
        if split == "train":  # the official files name numpy 1.x's module; numpy 2 moved it
            blob = blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        (folder / split).write_bytes(blob)
        truth[split] = (data.reshape(n, 3, 32, 32).transpose(0, 2, 3, 1), fine)
    meta = {b"fine_label_names": [s.encode() for s in FINE], b"coarse_label_names": [s.encode() for s in COARSE]}
    with open(folder / "meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return truth


def _tar(folder, out):
    with tarfile.open(out, "w:gz") as t:
        for m in ("meta", "test", "train"):
            t.add(folder / m, arcname=f"cifar-100-python/{m}")
    return out


def test_cifar100_folder_and_tarball(tmp_path):
    truth = _cifar_files(tmp_path / "cifar-100-python")
    tgz = _tar(tmp_path / "cifar-100-python", tmp_path / "cifar-100-python.tar.gz")
    for path in (tmp_path / "cifar-100-python", tgz, tmp_path):
        src = open_source(path)
        assert src.format == "cifar100" and src.classes == FINE
        assert src.keys == ["test/00000", "test/00001"] and src.labels.tolist() == truth["test"][1]
        assert np.array_equal(np.asarray(src.load(1)), truth["test"][0][1])
    every = open_source(tgz, split="all", label_level="coarse")
    assert every.classes == COARSE and len(every) == 5
    assert every.keys[2:4] == ["train/00002", "test/00000"]
    assert every.labels.tolist() == [f % 2 for f in truth["train"][1] + truth["test"][1]]
    assert every.extras["split"].tolist() == ["train"] * 3 + ["test"] * 2
    assert every.describe()["options"] == {"split": "all", "label_level": "coarse"}
    assert np.array_equal(np.asarray(every.load(4)), truth["test"][0][1])
    train = pickle.loads(pickle.dumps(open_source(tgz, format="cifar100", split="train")))
    assert np.array_equal(np.asarray(train.load(0)), truth["train"][0][0])
    assert train.fingerprint() == open_source(tmp_path / "cifar-100-python", split="train").fingerprint()
    assert train.fingerprint() != open_source(tgz).fingerprint()


@pytest.mark.parametrize("options, message", [
    ({"label_level": "medium"}, r"label_level must be one of fine, coarse; got 'medium'"),
    ({"split": "val"}, r"split must be one of test, train, all; got 'val'"),
])
def test_cifar100_bad_options(tmp_path, options, message):
    _cifar_files(tmp_path / "c")
    with pytest.raises(ValueError, match=message):
        open_source(tmp_path / "c", **options)


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


def test_cifar100_refuses_malicious_pickle(tmp_path):
    _cifar_files(tmp_path / "c")
    pwned = tmp_path / "pwned"
    with open(tmp_path / "c/test", "wb") as f:
        pickle.dump({b"data": _Evil(pwned)}, f, protocol=2)
    with pytest.raises(ValueError, match=r"refusing to load CIFAR-100 'test'.*(posix|os|nt)\.system"):
        open_source(tmp_path / "c")
    _tar(tmp_path / "c", tmp_path / "evil.tar.gz")
    with pytest.raises(ValueError, match=r"\.system, which a CIFAR-100 file never needs"):
        open_source(tmp_path / "evil.tar.gz")
    assert not pwned.exists()
    with open(tmp_path / "c/test", "wb") as f:
        pickle.dump({b"data": np.array([eval], dtype=object)}, f, protocol=2)
    with pytest.raises(ValueError, match="refusing"):
        open_source(tmp_path / "c")


def test_cifar100_archive_problems(tmp_path):
    _cifar_files(tmp_path / "c")
    with tarfile.open(tmp_path / "part.tar.gz", "w:gz") as t:
        t.add(tmp_path / "c/meta", arcname="cifar-100-python/meta")
    with pytest.raises(ValueError, match=r"lacks member\(s\) \['cifar-100-python/test'\]"):
        open_source(tmp_path / "part.tar.gz")
    (tmp_path / "junk.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(ValueError, match="cannot read cifar100 archive"):
        open_source(tmp_path / "junk.tar.gz")


def test_auto_detection(tmp_path, folder):
    _cifar_files(tmp_path / "cf")
    _img(tmp_path / "i/a.png")
    (tmp_path / "m.csv").write_text("path,label\ni/a.png,x\n")
    (tmp_path / "m.tsv").write_text("path\tlabel\ni/a.png\tx\n")
    (tmp_path / "notes.txt").write_text("x")
    expect = {tmp_path / "cf": "cifar100", _tar(tmp_path / "cf", tmp_path / "c.tar.gz"): "cifar100",
              _emotion6(tmp_path / "e6"): "emotion6", tmp_path / "m.csv": "csv", tmp_path / "m.tsv": "csv",
              folder[0]: "folder"}
    assert {p: open_source(p).format for p in expect} == expect
    assert isinstance(open_source(folder[0]), Source)
    with pytest.raises(ValueError, match=r"cannot detect .*'.*notes.txt'"):
        open_source(tmp_path / "notes.txt")


def test_each_format_declares_its_kind_and_the_emotion_formats_follow():
    from clip_heads.kinds import EMOTION_FORMATS, is_emotion_data

    emotion = {"emotion6", "fi", "webemo", "emoset", "artphoto", "abstract", "twitter1", "emotionroi"}
    assert {n for n, cls in ds.SOURCES.items() if cls.kind == "emotions"} == emotion == set(EMOTION_FORMATS)
    # Formats whose labels can be anything leave it to the class names.
    assert {n: ds.SOURCES[n].kind for n in ("folder", "csv", "cifar100", "hf", "parquet", "webdataset")} == dict.fromkeys(
        ("folder", "csv", "cifar100", "hf", "parquet", "webdataset"))
    assert all(is_emotion_data(n, ["cat", "dog"]) for n in emotion)
    assert not any(is_emotion_data(n, ["cat", "dog"]) for n in set(ds.SOURCES) - emotion)
