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

CLASSES = ["apple", "bed", "cloud", "dolphin"]
COLOURS = np.array([[220, 20, 20], [20, 200, 20], [20, 20, 220], [230, 230, 30]], np.uint8)


def tiny_cifar_tarball(path, n_test=64, n_train=8, seed=0):
    """A CIFAR-100-python-format tarball whose classes are visibly different colours."""
    rng = np.random.default_rng(seed)
    members = {}
    for split, n in (("train", n_train), ("test", n_test)):
        fine = np.arange(n) % len(CLASSES)
        img = COLOURS[fine][:, None, None, :] + rng.integers(0, 30, (n, 32, 32, 3))
        data = np.clip(img, 0, 255).astype(np.uint8).transpose(0, 3, 1, 2).reshape(n, 3072)
        members[split] = {b"filenames": [f"{i}.png".encode() for i in range(n)], b"batch_label": split.encode(),
                          b"fine_labels": fine.tolist(), b"coarse_labels": (fine % 2).tolist(), b"data": data}
    members["meta"] = {b"fine_label_names": [c.encode() for c in CLASSES], b"coarse_label_names": [b"a", b"b"]}
    folder = path.parent / "cifar-src"
    folder.mkdir()
    with tarfile.open(path, "w:gz") as t:
        for name, obj in members.items():
            (folder / name).write_bytes(pickle.dumps(obj, protocol=2))
            t.add(folder / name, arcname=f"cifar-100-python/{name}")
    return path, hashlib.md5(path.read_bytes()).hexdigest()


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
    _, md5 = tiny_cifar_tarball(www / "cifar-100-python.tar.gz")
    out = tmp_path / "cache" / "demo"
    args = ["-q", "demo", "--model", tiny_clip, "--limit", "48", "--cv", "3", "--workers", "0", "--out", str(out),
            "--url", f"{base}/cifar-100-python.tar.gz"]
    res = CliRunner().invoke(main, [*args, "--md5", md5])
    assert res.exit_code == 0, res.output
    tarball = tmp_path / "cache" / "downloads" / "cifar-100-python.tar.gz"
    assert hashlib.md5(tarball.read_bytes()).hexdigest() == md5

    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 48 and summary["skipped"] == 0
    # Visibly different colours: the heads' 3-fold CV must be far above chance (0.25), even
    # with 32 training images a fold.
    assert summary["linear_cv3"]["cv"]["accuracy"] >= 0.8
    assert summary["mlp_cv3"]["cv"]["accuracy"] >= 0.8
    assert 0.0 <= summary["zero_shot"]["accuracy"] <= 1.0
    report = (out / "report.txt").read_text()
    for needle in ("Zero-shot", "Prompt ablation", "linear head", "mlp head", "Macro Avg.", "Weighted Avg."):
        assert needle in report
    assert (out / "head-mlp" / "config.json").exists() and (out / "head-linear" / "model.safetensors").exists()
    # The ablation ranks each of the 19 templates alone and both ensembles.
    assert len(json.loads((out / "ablation" / "metrics.json").read_text())["rows"]) >= 19


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
    tarball, _ = tiny_cifar_tarball(tmp_path / "local.tar.gz")
    out = tmp_path / "demo"
    res = CliRunner().invoke(main, ["-q", "demo", "--source", str(tarball), "--model", tiny_clip, "--limit", "24", "--cv", "2",
                                    "--workers", "0", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "summary.json").read_text())["images"] == 24
    assert not (tmp_path / "downloads").exists()


def test_demo_accepts_an_image_folder_copy(tiny_clip, tmp_path):
    from test_cli_heads import colour_folder

    folder = colour_folder(tmp_path / "cifar-as-images", 10)
    res = CliRunner().invoke(main, ["-q", "demo", "--source", str(folder), "--model", tiny_clip, "--limit", "30", "--cv", "3",
                                    "--workers", "0", "--out", str(tmp_path / "demo")])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["images"] == 30 and summary["linear_cv3"]["cv"]["accuracy"] >= 0.8
    # The terminal gets the headline; the full tables are in report.txt.
    assert "linear head, 3-fold CV" in res.output and "report.txt" in res.output
    assert "Macro Avg." not in res.output and "Macro Avg." in (tmp_path / "demo" / "report.txt").read_text()
