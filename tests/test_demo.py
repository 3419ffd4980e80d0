"""`clip-heads demo` end to end: download from a local HTTP server, MD5 check, encode, reports."""
import functools
import hashlib
import http.server
import json
import pickle
import socket
import tarfile
import threading

import numpy as np
import pytest
from click.testing import CliRunner

from clip_heads.cli import main
from clip_heads.demo import demo_source
from clip_heads.evaluate import run_zero_shot
from clip_heads.results import store_fingerprint
from conftest import SHARED_DATASETS, requires_shared

CLASSES = ["apple", "bed", "cloud", "dolphin"]
COLOURS = np.array([[220, 20, 20], [20, 200, 20], [20, 20, 220], [230, 230, 30]], np.uint8)
# CIFAR-100's label set: the four coloured classes first, then 96 that no image uses.
CIFAR_NAMES = CLASSES + [f"class{i:02d}" for i in range(96)]


def tiny_cifar_tarball(path, n_test=64, n_train=8, seed=0, names=CLASSES):
    """A CIFAR-100-python-format tarball whose images are of the first four classes of ``names``,
    in visibly different colours."""
    rng = np.random.default_rng(seed)
    members = {}
    for split, n in (("train", n_train), ("test", n_test)):
        fine = np.arange(n) % len(CLASSES)
        img = COLOURS[fine][:, None, None, :] + rng.integers(0, 30, (n, 32, 32, 3))
        data = np.clip(img, 0, 255).astype(np.uint8).transpose(0, 3, 1, 2).reshape(n, 3072)
        members[split] = {b"filenames": [f"{i}.png".encode() for i in range(n)], b"batch_label": split.encode(),
                          b"fine_labels": fine.tolist(), b"coarse_labels": (fine % 2).tolist(), b"data": data}
    members["meta"] = {b"fine_label_names": [c.encode() for c in names], b"coarse_label_names": [b"a", b"b"]}
    folder = path.parent / f"{path.name}-src"
    folder.mkdir()
    with tarfile.open(path, "w:gz") as t:
        for name, obj in members.items():
            (folder / name).write_bytes(pickle.dumps(obj, protocol=2))
            t.add(folder / name, arcname=f"cifar-100-python/{name}")
    return path, hashlib.md5(path.read_bytes()).hexdigest()


def cifar_folder_copy(root, n_test=2, n_train=1, n_classes=100, seed=0):
    """An image-folder copy of CIFAR-100 split into train/ and test/ (as ../shared/datasets has):
    one colour per class, train images named train-*.png so they can be told apart."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 255, (n_classes, 3))
    for split, n in (("train", n_train), ("test", n_test)):
        for c in range(n_classes):
            d = root / split / f"class{c:03d}"
            d.mkdir(parents=True)
            for i in range(n):
                arr = np.clip(colours[c] + rng.normal(0, 10, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(d / f"{split}-{i}.png")
    return root


@pytest.fixture
def server(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/www; yields its base URL."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a, **k: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", www
    httpd.shutdown()
    httpd.server_close()


def test_demo_downloads_verifies_and_reports(tiny_clip, tmp_path, server):
    base, www = server
    _, md5 = tiny_cifar_tarball(www / "cifar-100-python.tar.gz", names=CIFAR_NAMES)
    out = tmp_path / "cache" / "demo"
    args = ["-q", "demo", "--model", tiny_clip, "--limit", "48", "--cv", "3", "--workers", "0", "--out", str(out),
            "--url", f"{base}/cifar-100-python.tar.gz"]
    res = CliRunner().invoke(main, [*args, "--md5", md5])
    assert res.exit_code == 0, res.output
    tarball = tmp_path / "cache" / "downloads" / "cifar-100-python.tar.gz"
    assert hashlib.md5(tarball.read_bytes()).hexdigest() == md5

    summary = json.loads((out / "metrics.json").read_text())
    assert summary["images"] == 48 and summary["skipped"] == 0
    # What was measured is on record: split, images used of those available, the store's fingerprint.
    data = summary["data"]
    assert (data["split"], data["n_images"], data["available"], data["limit"]) == ("test", 48, 64, 48)
    assert data["fingerprint"] == store_fingerprint(summary["store"]) and data["n_classes"] == 100
    assert any("64 test images, a part of CIFAR-100's 10,000" in n for n in data["notes"])
    assert "48 of 64 images (a seeded sample, seed 0)" in res.output and data["fingerprint"][:12] in res.output
    assert summary["info"]["run"]["command"] == "demo" and summary["info"]["data"] == data
    # Visibly different colours: the heads' 3-fold CV must be far above chance (0.25), even
    # with 32 training images a fold.
    assert summary["linear_cv3"]["cv"]["accuracy"] >= 0.8
    assert summary["mlp_cv3"]["cv"]["accuracy"] >= 0.8
    # The zero-shot headline is the store's zero-shot result, recomputed independently.
    again = run_zero_shot(summary["store"], prompt_set="bp-photo").metrics
    assert summary["zero_shot"]["accuracy"] == again["accuracy"]
    assert summary["zero_shot"]["macro_f1"] == again["macro"]["f1"]
    report = (out / "report.txt").read_text()
    for needle in ("Zero-shot", "Prompt ablation", "linear head", "mlp head", "Macro Avg.", "Weighted Avg.",
                   "data: CIFAR-100 test split"):
        assert needle in report
    assert (out / "head-mlp" / "config.json").exists() and (out / "head-linear" / "model.safetensors").exists()
    # The ablation ranks each of the 19 templates alone and both ensembles.
    assert len(json.loads((out / "ablation" / "metrics.json").read_text())["rows"]) == 19 + 2
    # Its page: the headline as printed, and a link to every step's own page (each of which exists).
    from test_report_page import check_page, parse

    page = parse(out / "index.html")
    assert {"zero-shot/index.html", "ablation/index.html", "head-linear/index.html", "head-mlp/index.html"} <= set(page.refs)
    assert all((out / ref).is_file() for ref in page.refs) and "best templates" in "".join(page.text)
    for step in ("zero-shot", "ablation", "head-linear/cv"):
        check_page(out / step)


def test_demo_refuses_a_wrong_checksum_and_keeps_nothing(tiny_clip, tmp_path, server):
    base, www = server
    tiny_cifar_tarball(www / "cifar-100-python.tar.gz")
    out = tmp_path / "cache" / "demo"
    res = CliRunner().invoke(main, ["demo", "--model", tiny_clip, "--out", str(out), "--url", f"{base}/cifar-100-python.tar.gz",
                                    "--md5", "0" * 32])
    assert res.exit_code == 1 and "checksum mismatch" in res.output and "0" * 32 in res.output
    assert "Traceback" not in res.output
    assert not list((tmp_path / "cache" / "downloads").glob("*"))


def test_demo_unreachable_url_suggests_source(tiny_clip, tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = CliRunner().invoke(main, ["demo", "--model", tiny_clip, "--out", str(tmp_path / "d"), "--url", f"http://127.0.0.1:{port}/x.tar.gz"])
    assert res.exit_code == 1 and "--source PATH" in res.output


def test_demo_runs_offline_from_a_local_source(tiny_clip, tmp_path):
    tarball, _ = tiny_cifar_tarball(tmp_path / "local.tar.gz", names=CIFAR_NAMES)
    out = tmp_path / "demo"
    res = CliRunner().invoke(main, ["-q", "demo", "--source", str(tarball), "--model", tiny_clip, "--limit", "24", "--cv", "2",
                                    "--workers", "0", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "metrics.json").read_text())["images"] == 24
    assert not (tmp_path / "downloads").exists()


def test_demo_refuses_a_source_that_is_not_cifar100(tiny_clip, tmp_path):
    from test_cli_heads import colour_folder

    # A 4-class tarball in the official format, and a 3-class image folder: both refused before encoding.
    tarball, _ = tiny_cifar_tarball(tmp_path / "four.tar.gz")
    folder = colour_folder(tmp_path / "three", 4)
    for source, n in ((tarball, 4), (folder, 3)):
        out = tmp_path / f"demo-{n}"
        res = CliRunner().invoke(main, ["demo", "--source", str(source), "--model", tiny_clip, "--out", str(out)])
        assert res.exit_code == 1 and "Traceback" not in res.output
        assert f"has {n} classes" in res.output and "CIFAR-100 (100 classes)" in res.output
        assert not list(out.glob("*.h5*"))
    # A split copy without test/ is refused too: the demo evaluates the test split.
    (tmp_path / "only-train" / "train" / "apple").mkdir(parents=True)
    with pytest.raises(ValueError, match="no test/"):
        demo_source(str(tmp_path / "only-train"))


def test_demo_uses_test_of_a_split_image_folder_copy(tiny_clip, tmp_path):
    # The layout of ../shared/datasets/cifar100-partial: <split>/<class>/<image>. Read as a plain
    # folder it would be a 2-class dataset "test" vs "train"; the demo must use test/ and say so.
    root = cifar_folder_copy(tmp_path / "cifar-as-images", n_test=3, n_train=1)
    assert demo_source(str(root))[0] == str(root / "test")
    out = tmp_path / "demo"
    res = CliRunner().invoke(main, ["demo", "--source", str(root), "--model", tiny_clip, "--limit", "1000", "--cv", "2",
                                    "--workers", "0", "--out", str(out)])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "metrics.json").read_text())
    data = summary["data"]
    assert (data["split"], data["n_images"], data["available"], data["n_classes"]) == ("test", 300, 300, 100)
    assert "test/ used" in data["layout"]
    # --limit larger than the data: said in the record, the log and the headline.
    assert data["notes"][0] == "--limit 1000 is more than the 300 images there are: all 300 are used"
    assert "--limit 1000 is more than the 300 images there are" in res.output
    from clip_heads.store import open_store

    with open_store(summary["store"]) as s:
        keys, classes = s.keys, s.classes
    assert len(keys) == 300 and all("/test-" in k for k in keys) and classes[:2] == ["class000", "class001"]
    # The terminal gets the headline; the full tables are in report.txt.
    assert "linear head, 2-fold CV" in res.output and "report.txt" in res.output
    assert "Macro Avg." not in res.output and "Macro Avg." in (out / "report.txt").read_text()


@requires_shared
@pytest.mark.shared_data
def test_demo_on_the_shared_cifar100_partial(tiny_clip, tmp_path):
    source = SHARED_DATASETS / "cifar100-partial"
    out = tmp_path / "demo"
    res = CliRunner().invoke(main, ["demo", "--source", str(source), "--model", tiny_clip, "--cv", "2", "--workers", "0",
                                    "--out", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads((out / "metrics.json").read_text())["data"]
    n_test = sum(1 for p in (source / "test").rglob("*.png"))
    assert (data["split"], data["n_images"], data["available"], data["n_classes"]) == ("test", n_test, n_test, 100)
    assert "a part of CIFAR-100's 10,000" in res.output and "--limit 1000 is more than" in res.output
