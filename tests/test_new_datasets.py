"""EmoSet, ArtPhoto, Abstract, Twitter I, EmotionROI and Hugging Face datasets on disk, each on a
small fake of its official layout built here (real JPEG bytes from ../shared/datasets/emotion6
when present, generated images otherwise)."""
from __future__ import annotations

import io
import json
import os
import pickle
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from clip_heads.cli import main
from clip_heads.datasets import detect_format, open_source
from clip_heads.emotions import EKMAN_EMOTIONS, MIKELS_EMOTIONS
from clip_heads.encode import encode
from clip_heads.images import BadImage
from clip_heads.store import open_store
from conftest import SHARED_DATASETS


def jpegs(n: int) -> list[bytes]:
    """``n`` distinct JPEG files' bytes: real Emotion6 photographs when present, else generated."""
    real = sorted((SHARED_DATASETS / "emotion6" / "images").glob("*/*.jpg"))[:n]
    if len(real) == n:
        return [p.read_bytes() for p in real]
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (24 + i % 5, 32 + i % 7, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def write(path, data: bytes | str):
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_text if isinstance(data, str) else path.write_bytes)(data)
    return path


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


# --------------------------------------------------------------------------------------- EmoSet

def emoset(root, imgs):
    """Three splits; train.json in the README's 4-field form, val.json and test.json in the 3-field one."""
    plan = {"train": [("amusement", 1), ("fear", 2), ("amusement", 0)], "val": [("sadness", 3)],
            "test": [("awe", 4), ("fear", 5)]}
    anns = {0: {"emotion": "amusement", "brightness": 0.6, "colorfulness": 0.3, "scene": "beach",
                "object": ["tree", "person", "tree"], "facial_expression": "happy", "human_action": "smiling"},
            2: {"brightness": 0.1, "colorfulness": 1.0, "object": "spider"},
            4: {"scene": "mountain", "brightness": 1},
            5: {"emotion": "fear"}}
    for split, items in plan.items():
        entries = []
        for emo, k in items:
            image, ann = f"image/{emo}/{emo}_{k:05d}.jpg", f"annotation/{emo}/{emo}_{k:05d}.json"
            write(root / image, imgs[k])
            write(root / ann, json.dumps(anns.get(k, {})))
            entries.append([emo, f"{emo}_{k:05d}", image, ann] if split == "train" else [emo, image, ann])
        write(root / f"{split}.json", json.dumps(entries))
    write(root / "info.json", json.dumps({"emotion": {"label2idx": {"amusement": 0}}}))
    return root


def test_emoset(tmp_path):
    imgs = jpegs(6)
    root = emoset(tmp_path / "EmoSet-118K", imgs)
    src = open_source(root)
    assert src.format == "emoset" and src.classes == MIKELS_EMOTIONS
    assert src.keys == ["image/amusement/amusement_00000.jpg", "image/amusement/amusement_00001.jpg",
                        "image/awe/awe_00004.jpg", "image/fear/fear_00002.jpg", "image/fear/fear_00005.jpg",
                        "image/sadness/sadness_00003.jpg"]
    assert src.labels.tolist() == [0, 0, 2, 6, 6, 7]
    x = {k: v.tolist() for k, v in src.extras.items()}
    assert x == {"split": ["train", "train", "test", "train", "test", "val"],
                 "brightness": ["0.6", "", "1", "0.1", "", ""], "colorfulness": ["0.3", "", "", "1.0", "", ""],
                 "scene": ["beach", "", "mountain", "", "", ""], "facial_expression": ["happy", "", "", "", "", ""],
                 "human_action": ["smiling", "", "", "", "", ""], "object": ["person|tree", "", "", "spider", "", ""]}
    assert np.array_equal(np.asarray(src.load(3)), pixels(imgs[2]))
    val = open_source(root, split="val", attributes="false")
    assert val.keys == ["image/sadness/sadness_00003.jpg"] and set(val.extras) == {"split"}
    assert val.describe()["options"] == {"split": "val", "attributes": False}
    assert val.fingerprint() != open_source(root, split="val").fingerprint()
    os.remove(root / "test.json")
    assert len(open_source(root, format="emoset", split="train")) == 3  # only the list asked for is needed
    with pytest.raises(ValueError, match=r"lacks test\.json \(expected the EmoSet-118K layout") as e:
        open_source(root, format="emoset")
    one_line(e)


@pytest.mark.parametrize("entry, message", [
    (["fear", "image/fear/fear_00002.jpg"], r"'val\.json' entry 0: expected \[emotion, image_id, image_path, "
                                            r"annotation_path\] or \[emotion, image_path, annotation_path\]"),
    (["joy", "image/fear/fear_00002.jpg", "annotation/fear/fear_00002.json"], r"unknown emotion 'joy'; valid: amusement"),
    (["fear", "image/fear/gone.jpg", "annotation/fear/fear_00002.json"], r"file 'image/fear/gone\.jpg' not found"),
    (["fear", "image/fear/fear_00002.jpg", "annotation/fear/x.json"], r"'image/fear/fear_00002\.jpg' is already "
                                                                        r"listed in 'train\.json'"),
    (["sadness", "../outside.jpg", "annotation/x.json"], r"'\.\./outside\.jpg' resolves outside the source root"),
    (["amusement", "image/sadness/sadness_00003.jpg", "annotation/sadness/sadness_00003.json"], None),
])
def test_emoset_bad_entries(tmp_path, entry, message):
    root = emoset(tmp_path / "e", jpegs(6))
    write(tmp_path / "outside.jpg", jpegs(1)[0])
    write(root / "val.json", json.dumps([entry]))
    if message is None:  # the list says amusement, the annotation file's own "emotion" agrees with nothing
        write(root / "annotation/sadness/sadness_00003.json", json.dumps({"emotion": "sadness"}))
        message = r"the split list says 'amusement' but annotation '.*' says 'sadness'"
    with pytest.raises(ValueError, match=message) as e:
        open_source(root)
    one_line(e)


# ------------------------------------------------------------------------------ ArtPhoto, Abstract

def artphoto(root, imgs):
    names = ["amusement_0001.jpg", "anger_0002.jpg", "awe_0001.jpg", "contentment_0010.jpg", "disgust_0003.jpg",
             "excitement_0001.jpg", "fear_0001.jpg", "sad_0002.jpg", "sad_0001.jpg", "Amusement_0003.jpg"]
    for name, data in zip(names, imgs, strict=True):
        write(root / name, data)
    write(root / "ReadMe.rtf", "{\\rtf1 the release's readme}")
    return names


def test_artphoto(tmp_path):
    imgs = jpegs(10)
    names = artphoto(tmp_path / "testImages_artphoto", imgs)
    src = open_source(tmp_path / "testImages_artphoto")
    assert src.format == "artphoto" and src.classes == MIKELS_EMOTIONS
    assert src.keys == ["Amusement_0003.jpg", "amusement_0001.jpg", "anger_0002.jpg", "awe_0001.jpg",
                        "contentment_0010.jpg", "disgust_0003.jpg", "excitement_0001.jpg", "fear_0001.jpg",
                        "sad_0001.jpg", "sad_0002.jpg"]
    assert src.labels.tolist() == [0, 0, 1, 2, 3, 4, 5, 6, 7, 7] and src.extras == {}
    assert np.array_equal(np.asarray(src.load(9)), pixels(imgs[names.index("sad_0002.jpg")]))
    write(tmp_path / "testImages_artphoto/happy_0001.jpg", imgs[0])
    with pytest.raises(ValueError, match=r"'happy_0001\.jpg' .* is not named <emotion>_<n> with one of amusement") as e:
        open_source(tmp_path / "testImages_artphoto", format="artphoto")
    one_line(e)
    assert detect_format(str(tmp_path / "testImages_artphoto")) == "folder"  # no longer detected as ArtPhoto
    (tmp_path / "testImages_artphoto/happy_0001.jpg").unlink()
    (tmp_path / "testImages_artphoto/awe_0001.jpg").unlink()
    with pytest.raises(ValueError, match=r"has no images of \['awe'\]"):
        open_source(tmp_path / "testImages_artphoto", format="artphoto")


ABSTRACT_CSV = """'','Amusement','Anger','Awe','Content','Disgust','Excitement','Fear','Sad'
'abstract_0001.jpg',1,0,0,5,0,0,0,2
'abstract_0002.jpg',0,3,0,0,1,0,3,0
'abstract_0003.jpg',0,0,4,0,0,1,0,0
'abstract_0004.jpg',2,0,0,0,0,6,1,1
"""


def test_abstract(tmp_path):
    root = tmp_path / "testImages_abstract"
    imgs = jpegs(4)
    for i, data in enumerate(imgs, 1):
        write(root / f"abstract_{i:04d}.jpg", data)
    write(root / "ABSTRACT_groundTruth.csv", ABSTRACT_CSV)
    src = open_source(root)  # 0002 ties anger with fear: dropped by default
    assert src.format == "abstract" and src.classes == MIKELS_EMOTIONS
    assert src.keys == ["abstract_0003.jpg", "abstract_0001.jpg", "abstract_0004.jpg"]
    assert src.labels.tolist() == [2, 3, 5]
    assert src.extras_meta == {"votes": MIKELS_EMOTIONS, "emotion_distribution": MIKELS_EMOTIONS}
    assert src.extras["votes"].tolist() == [[0, 0, 4, 0, 0, 1, 0, 0], [1, 0, 0, 5, 0, 0, 0, 2], [2, 0, 0, 0, 0, 6, 1, 1]]
    np.testing.assert_allclose(src.extras["emotion_distribution"][1], np.array([1, 0, 0, 5, 0, 0, 0, 2]) / 8, atol=1e-7)
    assert np.array_equal(np.asarray(src.load(2)), pixels(imgs[3]))
    every = open_source(root, ties="first")
    assert every.keys == ["abstract_0002.jpg", "abstract_0003.jpg", "abstract_0001.jpg", "abstract_0004.jpg"]
    assert every.labels.tolist() == [1, 2, 3, 5] and every.extras["tied"].tolist() == [1, 0, 0, 0]
    assert every.fingerprint() != src.fingerprint()
    # Columns in another order, double quotes, the full Mikels names: the same table.
    cols = ["sadness", "fear", "excitement", "disgust", "contentment", "awe", "anger", "amusement"]
    lines = ['"file",' + ",".join(f'"{c}"' for c in cols)]
    lines += [f'"abstract_{i:04d}.jpg",' + ",".join(map(str, v[::-1])) for i, v in
              [(1, [1, 0, 0, 5, 0, 0, 0, 2]), (3, [0, 0, 4, 0, 0, 1, 0, 0]), (4, [2, 0, 0, 0, 0, 6, 1, 1])]]
    write(root / "ABSTRACT_groundTruth.csv", "\n".join(lines) + "\n")
    again = open_source(root)
    assert again.keys == src.keys and np.array_equal(again.extras["votes"], src.extras["votes"])


@pytest.mark.parametrize("body, message", [
    ("'','Amusement','Anger','Awe','Joy','Disgust','Excitement','Fear','Sad'\n", r"header must be a file-name column "
                                                                                r"and the 8 emotions"),
    (ABSTRACT_CSV.splitlines()[0] + "\n'abstract_0001.jpg',1,0,x,5,0,0,0,2\n", r"row 1 \(line 2\): expected a file "
                                                                                r"name and 8 vote counts"),
    (ABSTRACT_CSV.splitlines()[0] + "\n'abstract_0001.jpg',0,0,0,0,0,0,0,0\n", r"'abstract_0001\.jpg' has no votes"),
    (ABSTRACT_CSV.splitlines()[0] + "\n'abstract_0009.jpg',1,0,0,0,0,0,0,0\n", r"file 'abstract_0009\.jpg' not found"),
])
def test_abstract_errors(tmp_path, body, message):
    write(tmp_path / "abstract_0001.jpg", jpegs(1)[0])
    write(tmp_path / "ABSTRACT_groundTruth.csv", body)
    with pytest.raises(ValueError, match=message) as e:
        open_source(tmp_path, format="abstract")
    one_line(e)


# ------------------------------------------------------------------------------------- Twitter I

def twitter(root, imgs):
    names = [f"{i}.jpg" for i in (101, 7, 55, 3, 12, 9)]
    for name, data in zip(names, imgs, strict=True):
        write(root / "Agg_AMT_Candidates" / name, data)
    label = {"101.jpg": 1, "7.jpg": 0, "55.jpg": 1, "3.jpg": 0, "12.jpg": 1, "9.jpg": 1}
    lists = {"five_agree.txt": names[:2], "four_agree.txt": names[:4], "three_agree.txt": names}
    for f, members in lists.items():
        write(root / f, "".join(f"{n} {label[n]}\n" for n in reversed(members)))
    return label


def test_twitter1(tmp_path):
    imgs = jpegs(6)
    label = twitter(tmp_path / "Twitter_PCNN", imgs)
    src = open_source(tmp_path / "Twitter_PCNN")
    assert src.format == "twitter1" and src.classes == ["negative", "positive"]
    assert src.keys == ["3.jpg", "7.jpg", "101.jpg", "12.jpg", "55.jpg", "9.jpg"]
    assert src.labels.tolist() == [label[k] for k in src.keys] == [0, 0, 1, 1, 1, 1]
    assert src.extras["agreement"].tolist() == [4, 5, 5, 3, 4, 3]
    assert np.array_equal(np.asarray(src.load(2)), pixels(imgs[0]))
    five = open_source(tmp_path / "Twitter_PCNN", agreement="5")
    assert five.keys == ["7.jpg", "101.jpg"] and five.describe()["options"] == {"agreement": 5}
    os.remove(tmp_path / "Twitter_PCNN/three_agree.txt")
    assert len(open_source(tmp_path / "Twitter_PCNN", agreement=4)) == 4
    with pytest.raises(ValueError, match=r"lacks three_agree\.txt \(expected the Twitter I release: "
                                         r"Agg_AMT_Candidates/, five_agree\.txt, four_agree\.txt, three_agree\.txt\)") as e:
        open_source(tmp_path / "Twitter_PCNN", format="twitter1")
    one_line(e)
    with pytest.raises(ValueError, match=r"agreement must be one of 3, 4, 5; got 2"):
        open_source(tmp_path / "Twitter_PCNN", format="twitter1", agreement=2)


@pytest.mark.parametrize("four, message", [
    ("7.jpg 0\n101.jpg 0\n", r"'four_agree\.txt' line 2: '101\.jpg' is negative here but positive in 'five_agree\.txt'"),
    ("7.jpg 0\n", r"'four_agree\.txt' lacks 1 image\(s\) of the stronger agreement list\(s\), e\.g\. '101\.jpg'"),
    ("7.jpg 0\n101.jpg 1\n55.jpg positive\n", r"'four_agree\.txt' line 3: expected '<image name> <0\|1>'"),
    ("7.jpg 0\n101.jpg 1\ngone.jpg 1\n", r"'four_agree\.txt' line 3: file 'gone\.jpg' not found"),
])
def test_twitter1_inconsistent_lists(tmp_path, four, message):
    twitter(tmp_path, jpegs(6))
    write(tmp_path / "four_agree.txt", four)
    with pytest.raises(ValueError, match=message) as e:
        open_source(tmp_path, agreement=4)
    one_line(e)


# ------------------------------------------------------------------------------------ EmotionROI

def emotionroi(root, imgs, lists_at="training_testing_split"):
    keys = []
    for i, (emo, data) in enumerate(zip(EKMAN_EMOTIONS * 2, imgs, strict=True)):
        keys.append(f"{emo}/{i + 1}.jpg")
        write(root / "images" / keys[-1], data)
    write(root / "ground_truth" / "anger" / "1.jpg", imgs[0])  # stimuli maps: not read
    if lists_at is not None:
        folder = root / lists_at if lists_at else root
        write(folder / "training.txt", "\n".join(keys[:8]) + "\n")
        write(folder / "testing.txt", "\n".join(keys[8:]) + "\n")
    return keys


@pytest.mark.parametrize("lists_at", ["training_testing_split", ""])
def test_emotionroi(tmp_path, lists_at):
    imgs = jpegs(12)
    keys = emotionroi(tmp_path / "EmotionROI", imgs, lists_at)
    src = open_source(tmp_path / "EmotionROI", format="emotionroi")
    assert src.classes == EKMAN_EMOTIONS and src.keys == sorted(keys, key=lambda k: (k.split("/")[0], k))
    assert src.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    split = dict(zip(src.keys, src.extras["split"].tolist(), strict=True))
    assert split == {k: "train" if n < 8 else "test" for n, k in enumerate(keys)}
    assert np.array_equal(np.asarray(src.load(src.keys.index("joy/10.jpg"))), pixels(imgs[9]))
    if lists_at:
        assert open_source(tmp_path / "EmotionROI").format == "emotionroi"


def test_emotionroi_lists(tmp_path):
    keys = emotionroi(tmp_path / "r", jpegs(12), lists_at=None)
    assert "split" not in open_source(tmp_path / "r", format="emotionroi").extras  # no lists: no split
    write(tmp_path / "r/training_testing_split/training.txt", "\n".join(keys) + "\n")
    with pytest.raises(ValueError, match=r"has training\.txt in .* but not its pair: expected both training\.txt and "
                                         r"testing\.txt"):
        open_source(tmp_path / "r", format="emotionroi")
    write(tmp_path / "r/training_testing_split/testing.txt", "joy/4.jpg\n")
    with pytest.raises(ValueError, match=r"testing\.txt' line 1: 'joy/4\.jpg' is already listed in training\.txt"):
        open_source(tmp_path / "r", format="emotionroi")
    write(tmp_path / "r/training_testing_split/testing.txt", "joy/99.jpg\n")
    with pytest.raises(ValueError, match=r"'joy/99\.jpg' is not an image under images/<emotion>/"):
        open_source(tmp_path / "r", format="emotionroi")
    write(tmp_path / "r/training_testing_split/training.txt", "\n".join(keys[1:]) + "\n")
    write(tmp_path / "r/training_testing_split/testing.txt", "\n")
    with pytest.raises(ValueError, match=r"1 image\(s\) under images/ are in neither training\.txt nor testing\.txt, "
                                         r"e\.g\. 'anger/1\.jpg'") as e:
        open_source(tmp_path / "r", format="emotionroi")
    one_line(e)


# ------------------------------------------------------------------------------ Hugging Face hf

IMAGE_FEATURE = {"_type": "Image"}


def hf_table(pa, imgs, labels, extra=None):
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    cols = {"image": pa.array([{"bytes": b, "path": p} for b, p in imgs], type=image), "label": pa.array(labels)}
    cols.update(extra or {})
    return pa.table(cols)


def save_to_disk(pa, folder, table, features, shards=1, file_format=False):
    """What ``Dataset.save_to_disk`` writes: Arrow IPC stream shards, state.json, dataset_info.json."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    table = table.replace_schema_metadata(meta)
    names, bounds = [], np.linspace(0, table.num_rows, shards + 1).astype(int)
    for k in range(shards):
        name = f"data-{k:05d}-of-{shards:05d}.arrow"
        part = table.slice(bounds[k], bounds[k + 1] - bounds[k])
        with pa.OSFile(str(folder / name), "wb") as sink:
            writer = (pa.ipc.new_file if file_format else pa.ipc.new_stream)(sink, table.schema)
            for batch in part.to_batches(max_chunksize=2):
                writer.write_batch(batch)
            writer.close()
        names.append({"filename": name})
    write(folder / "state.json", json.dumps({"_data_files": names, "_fingerprint": "x", "_split": None}))
    write(folder / "dataset_info.json", json.dumps({"description": "", "features": features}))


def test_hf_save_to_disk(tmp_path):
    pa = pytest.importorskip("pyarrow")
    imgs = jpegs(5)
    feats = {"image": IMAGE_FEATURE, "label": {"names": ["dog", "cat", "eel"], "_type": "ClassLabel"},
             "caption": {"dtype": "string", "_type": "Value"}}
    table = hf_table(pa, [(b, f"{i}.jpg") for i, b in enumerate(imgs)], [2, 0, 1, 1, 0],
                     {"caption": pa.array(list("abcde"))})
    save_to_disk(pa, tmp_path / "ds", table, feats, shards=2)
    src = open_source(tmp_path / "ds")
    assert src.format == "hf" and src.classes == ["dog", "cat", "eel"]  # ClassLabel order kept
    assert src.keys == ["0", "1", "2", "3", "4"] and src.labels.tolist() == [2, 0, 1, 1, 0] and src.extras == {}
    assert src.describe()["options"] == {"layout": "save_to_disk", "image_column": "image", "label_column": "label",
                                         "split": None}
    clone = pickle.loads(pickle.dumps(src))
    for i in (4, 0, 3):  # across both shards and their record batches, in any order
        assert np.array_equal(np.asarray(clone.load(i)), pixels(imgs[i]))
    fp = src.fingerprint()
    assert open_source(tmp_path / "ds").fingerprint() == fp
    os.utime(tmp_path / "ds/data-00001-of-00002.arrow", ns=(1, 1))
    assert open_source(tmp_path / "ds").fingerprint() != fp
    # The IPC file format (what pyarrow writes by default) reads the same.
    save_to_disk(pa, tmp_path / "f", table, feats, shards=1, file_format=True)
    assert np.array_equal(np.asarray(open_source(tmp_path / "f").load(4)), pixels(imgs[4]))


def test_hf_dataset_dict_and_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    imgs = jpegs(6)
    feats = {"image": IMAGE_FEATURE, "label": {"names": ["neg", "pos"], "_type": "ClassLabel"}}
    save_to_disk(pa, tmp_path / "dd/train", hf_table(pa, [(b, None) for b in imgs[:4]], [1, 0, 0, 1]), feats)
    save_to_disk(pa, tmp_path / "dd/validation", hf_table(pa, [(b, None) for b in imgs[4:]], [0, 1]), feats)
    write(tmp_path / "dd/dataset_dict.json", json.dumps({"splits": ["train", "validation"]}))
    dd = open_source(tmp_path / "dd")
    assert dd.keys == ["train/0", "train/1", "train/2", "train/3", "val/0", "val/1"]
    assert dd.extras["split"].tolist() == ["train"] * 4 + ["val"] * 2 and dd.labels.tolist() == [1, 0, 0, 1, 0, 1]
    for name in ("validation", "val"):
        v = open_source(tmp_path / "dd", split=name)
        assert v.keys == ["val/0", "val/1"] and v.extras == {} and np.array_equal(np.asarray(v.load(1)), pixels(imgs[5]))
    with pytest.raises(ValueError, match=r"split 'test' is not in .*; it has train, validation"):
        open_source(tmp_path / "dd", split="test")

    # Parquet, the Hub's layout: data/<split>-*.parquet, string labels, row groups of 2 rows.
    for split, part, labels in (("train", slice(0, 4), ["joy", "fear", "joy", "awe"]), ("test", slice(4, 6), ["fear", "joy"])):
        t = pa.table({"img": pa.array([{"bytes": b, "path": None} for b in imgs[part]],
                                      type=pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                      "emotion": pa.array(labels), "n": pa.array(range(len(labels)))})
        (tmp_path / "pq/data").mkdir(parents=True, exist_ok=True)
        pq.write_table(t, tmp_path / f"pq/data/{split}-00000-of-00001.parquet", row_group_size=2)
    with pytest.raises(ValueError, match=r"cannot tell the label column .* \(columns: img, emotion, n\); name it "
                                         r"with label_column") as e:
        open_source(tmp_path / "pq")
    one_line(e)
    src = open_source(tmp_path / "pq", label_column="emotion")
    assert src.format == "hf" and src.classes == ["awe", "fear", "joy"]
    assert src.keys == ["train/0", "train/1", "train/2", "train/3", "test/0", "test/1"]
    assert src.labels.tolist() == [2, 1, 2, 0, 1, 2] and src.extras["split"].tolist() == ["train"] * 4 + ["test"] * 2
    reads = []
    real = pq.ParquetFile.read_row_group
    pq.ParquetFile.read_row_group = lambda self, i, *a, **k: reads.append(i) or real(self, i, *a, **k)
    try:
        got = [np.asarray(src.load(i)) for i in range(6)]
    finally:
        pq.ParquetFile.read_row_group = real
    assert all(np.array_equal(g, pixels(b)) for g, b in zip(got, imgs, strict=True))
    assert reads == [0, 1, 0]  # one read per row group of the image column, not per row
    assert open_source(tmp_path / "pq", label_column="emotion", split="test").keys == ["test/0", "test/1"]


def test_hf_rows_without_bytes_and_bad_columns(tmp_path):
    pa = pytest.importorskip("pyarrow")
    imgs = jpegs(3)
    write(tmp_path / "ds/files/a.jpg", imgs[1])
    write(tmp_path / "elsewhere.jpg", imgs[2])
    feats = {"image": IMAGE_FEATURE, "label": {"dtype": "int64", "_type": "Value"}}
    rows = [(imgs[0], None), (None, "files/a.jpg"), (None, str(tmp_path / "elsewhere.jpg")), (None, None)]
    save_to_disk(pa, tmp_path / "ds", hf_table(pa, rows, [7, 3, 7, 3]), feats)
    src = open_source(tmp_path / "ds")
    assert src.classes == ["3", "7"] and src.labels.tolist() == [1, 0, 1, 0]
    assert np.array_equal(np.asarray(src.load(1)), pixels(imgs[1]))  # a path relative to the dataset folder
    with pytest.raises(BadImage, match=r"^outside the source root \(resolves to .*elsewhere\.jpg\)$"):
        src.load(2)
    assert np.array_equal(np.asarray(open_source(tmp_path / "ds", allow_outside_root=True).load(2)), pixels(imgs[2]))
    with pytest.raises(BadImage, match=r"^no image \(neither bytes nor path\)$"):
        src.load(3)

    two = hf_table(pa, [(imgs[0], None)], [0], {"thumb": pa.array([imgs[0]], type=pa.binary())})
    save_to_disk(pa, tmp_path / "two", two, {"label": {"dtype": "int64", "_type": "Value"}})
    with pytest.raises(ValueError, match=r"more than one image column .*name it with image_column"):
        open_source(tmp_path / "two", format="hf")
    assert open_source(tmp_path / "two", image_column="thumb").load(0).size == Image.open(io.BytesIO(imgs[0])).size
    with pytest.raises(ValueError, match=r"no label column 'emotion' .*; columns: image, label, thumb"):
        open_source(tmp_path / "two", image_column="thumb", label_column="emotion")
    unlabelled = {"image": IMAGE_FEATURE, "label": {"names": ["a", "b"], "_type": "ClassLabel"}}
    save_to_disk(pa, tmp_path / "u", hf_table(pa, [(imgs[0], None)] * 3, [0, -1, 1]), unlabelled)
    with pytest.raises(ValueError, match=r"1 value\(s\) outside 0\.\.1 \(e\.g\. -1 at item 1; -1 means unlabelled\)"):
        open_source(tmp_path / "u")
    write(tmp_path / "nothing/readme.txt", "x")
    with pytest.raises(ValueError, match=r"is not a Hugging Face dataset on disk: expected dataset_dict\.json, or "
                                         r"state\.json \+ dataset_info\.json \+ \*\.arrow \(save_to_disk\), or \*\.parquet") as e:
        open_source(tmp_path / "nothing", format="hf")
    one_line(e)


def test_hf_refuses_special_files_without_blocking(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import threading

    import pyarrow.parquet as pq

    pq.write_table(hf_table(pa, [(jpegs(1)[0], None)], [0]), tmp_path / "a.parquet")
    os.mkfifo(tmp_path / "b.parquet")  # opening a FIFO for reading blocks until a writer comes
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("error", pytest.raises(ValueError, open_source, tmp_path)),
                         daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "opening a folder holding a FIFO named .parquet blocked"
    assert "hf parquet file 'b.parquet': 'b.parquet' is not a regular file (FIFO)" in str(out["error"].value)


def test_hf_reads_memory_mapped(tmp_path):
    """Opening and loading a row allocates nothing in Arrow's pool: the 8 MB of other columns stay on disk."""
    pa = pytest.importorskip("pyarrow")
    imgs = jpegs(40)
    blob = pa.array([os.urandom(200_000) for _ in imgs], type=pa.binary())
    save_to_disk(pa, tmp_path / "big", hf_table(pa, [(b, None) for b in imgs], list(range(40)), {"blob": blob}),
                 {"image": IMAGE_FEATURE, "label": {"dtype": "int64", "_type": "Value"}, "blob": {"dtype": "binary", "_type": "Value"}})
    del blob
    before = pa.total_allocated_bytes()
    src = open_source(tmp_path / "big", label_column="label")
    assert np.array_equal(np.asarray(src.load(37)), pixels(imgs[37]))
    assert pa.total_allocated_bytes() - before < 100_000


def test_hf_without_pyarrow(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name == "pyarrow" or name.startswith("pyarrow."):
            raise ImportError("No module named 'pyarrow'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    write(tmp_path / "state.json", "{}")
    with pytest.raises(ValueError, match=r"the hf format reads Arrow and parquet files with pyarrow, which is not "
                                         r"installed: pip install 'clip-heads\[hf\]'"):
        open_source(tmp_path, format="hf")


def test_hf_reads_what_the_datasets_library_writes(tmp_path):
    """Only where the ``datasets`` library is installed (it is not a dependency, even of the hf extra)."""
    pa = pytest.importorskip("pyarrow")
    hd = pytest.importorskip("datasets")

    imgs = jpegs(4)
    feats = hd.Features({"image": hd.Image(), "label": hd.ClassLabel(names=["x", "y"])})
    enc = feats.encode_batch({"image": [{"bytes": b, "path": None} for b in imgs], "label": [1, 0, 0, 1]})
    ds = hd.Dataset(pa.Table.from_pydict(enc, schema=feats.arrow_schema), info=hd.DatasetInfo(features=feats), fingerprint="f")
    hd.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    ds.to_parquet(str(tmp_path / "pq/train-00000-of-00001.parquet"))
    for path in (tmp_path / "dd", tmp_path / "pq"):
        src = open_source(path)
        assert src.classes == ["x", "y"] and src.labels.tolist()[:4] == [1, 0, 0, 1]
        assert np.array_equal(np.asarray(src.load(3)), pixels(imgs[3]))


# ----------------------------------------------------------------------- encode: same vectors as a folder

def folder_vectors(store) -> dict[str, np.ndarray]:
    with open_store(store) as s:
        return dict(zip(s.keys, s.embeddings(), strict=True))


def test_encode_hf_and_emoset_equal_plain_folder(tiny_clip, tmp_path):
    pa = pytest.importorskip("pyarrow")
    imgs = jpegs(6)
    plain = tmp_path / "plain"
    emoset(tmp_path / "emoset", imgs)
    for k, data in enumerate(imgs):
        write(plain / f"c{k % 2}" / f"{k}.jpg", data)
    feats = {"image": IMAGE_FEATURE, "label": {"names": ["c0", "c1"], "_type": "ClassLabel"}}
    save_to_disk(pa, tmp_path / "hf", hf_table(pa, [(b, None) for b in imgs], [k % 2 for k in range(6)]), feats, shards=2)
    # One image per forward pass, so that batch composition cannot change a vector's last bits.
    opts = dict(model=tiny_clip, templates=["bp-photo"], device="cpu", progress=False, dtype="float32", batch_size=1)
    ref = folder_vectors(encode(str(plain), tmp_path / "plain.h5", workers=0, **opts).path)
    hf = encode(str(tmp_path / "hf"), tmp_path / "hf.h5", workers=1, **opts)  # a worker process: the source pickles
    assert hf.n_images == 6 and hf.n_skipped == 0
    with open_store(hf.path) as s:
        assert s.keys == [str(k) for k in range(6)] and s.labels.tolist() == [0, 1, 0, 1, 0, 1]
        got = s.embeddings()
    assert np.array_equal(got, np.stack([ref[f"c{k % 2}/{k}.jpg"] for k in range(6)]))
    es = encode(str(tmp_path / "emoset"), tmp_path / "emoset.h5", workers=0, **opts)
    with open_store(es.path) as s:
        assert s.classes == MIKELS_EMOTIONS and s.extra("split").tolist() == ["train", "train", "test", "train", "test", "val"]
        assert s.extra("object").tolist()[0] == "person|tree"
        k = [int(key.rsplit("_", 1)[1][:5]) for key in s.keys]
        assert np.array_equal(s.embeddings(), np.stack([ref[f"c{i % 2}/{i}.jpg"] for i in k]))


def test_cli_source_options(tiny_clip, tmp_path):
    twitter(tmp_path / "tw", jpegs(6))
    runner = CliRunner()
    r = runner.invoke(main, ["-q", "encode", str(tmp_path / "tw"), "-o", str(tmp_path / "tw.h5"), "-m", tiny_clip,
                             "-O", "agreement=5", "--workers", "0", "--device", "cpu", "-t", "bp-photo"])
    assert r.exit_code == 0, r.output
    with open_store(tmp_path / "tw.h5") as s:
        assert s.keys == ["7.jpg", "101.jpg"] and s.extra("agreement").tolist() == [5, 5]
        assert s.attrs["source"]["format"] == "twitter1" and s.attrs["source"]["options"] == {"agreement": 5}
    r = runner.invoke(main, ["-q", "encode", str(tmp_path / "tw"), "-o", str(tmp_path / "x.h5"), "-O", "agreement"])
    assert r.exit_code == 2 and "KEY=VALUE" in r.output
    r = runner.invoke(main, ["-q", "encode", str(tmp_path / "tw"), "-o", str(tmp_path / "x.h5"), "-O", "level=5"])
    assert r.exit_code == 1 and "format 'twitter1' does not take option(s) ['level']; valid: agreement" in r.output
    shutil.rmtree(tmp_path / "tw/Agg_AMT_Candidates")
    r = runner.invoke(main, ["-q", "encode", str(tmp_path / "tw"), "-o", str(tmp_path / "x.h5"), "--format", "twitter1"])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1 and "lacks Agg_AMT_Candidates/" in r.output
