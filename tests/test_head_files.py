"""Head folders: written whole or not at all, and every broken or hostile one refused in one line."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from clip_heads.cli import main
from clip_heads.fsutil import LockedError, exclusive_lock
from clip_heads.heads import Head, HeadFileError, LinearHead, MLPHead, TipAdapterHead
from clip_heads.writer import write_store
from conftest import make_blobs

DIM = 8
BACKBONE = ("org/clip-b32", "sha256:abc123", DIM)


@pytest.fixture(scope="module")
def blobs():
    X, y, means = make_blobs(n_per_class=60, n_classes=3, dim=DIM, sep=3.0, seed=0)
    return X, np.array(["cat", "dog", "eel"])[y], means


def saved(kind: str, blobs, out: Path) -> Path:
    X, y, means = blobs
    head = {"linear": lambda: LinearHead(C=1.0), "mlp": lambda: MLPHead(hidden=16, patience=2),
            "tip-adapter": lambda: TipAdapterHead(prompt_embeds=dict(zip(["cat", "dog", "eel"], means, strict=True)))}[kind]()
    head.fit(X, y).set_backbone(*BACKBONE).save_pretrained(out)
    return out


def edit_config(d: Path, change) -> None:
    config = json.loads((d / "config.json").read_text())
    change(config)
    (d / "config.json").write_text(json.dumps(config))


def write_weights(d: Path, tensors: dict | None = None, raw: bytes | None = None) -> None:
    """Replace the weights and record their checksum, so that the checks past the checksum run."""
    path = d / "model.safetensors"
    if raw is not None:
        path.write_bytes(raw)
    else:
        save_file(tensors, str(path))
    edit_config(d, lambda c: c.update(weights_sha256=hashlib.sha256(path.read_bytes()).hexdigest()))


def change_tensor(name, fn):
    def apply(d):
        t = load_file(str(d / "model.safetensors"))
        t[name] = fn(t[name])
        write_weights(d, t)
    return apply


def set_key(*path_and_value):
    *path, value = path_and_value

    def apply(d):
        def change(c):
            for k in path[:-1]:
                c = c[k]
            if value is DELETE:
                del c[path[-1]]
            else:
                c[path[-1]] = value
        edit_config(d, change)
    return apply


DELETE = object()

# (head kind, how the folder is broken, the file the error must name, what it must say)
BROKEN = {
    "config not JSON": ("linear", lambda d: (d / "config.json").write_text("{head: linear"), "config.json", "not valid JSON"),
    "config not an object": ("linear", lambda d: (d / "config.json").write_text("[1, 2]"), "config.json", "JSON object, got list"),
    "config deeply nested": ("linear", lambda d: (d / "config.json").write_text("[" * 100000), "config.json", "not"),
    "config not UTF-8": ("linear", lambda d: (d / "config.json").write_bytes(b"\xff\xfe{}"), "config.json", "not valid JSON"),
    "no classes": ("linear", set_key("classes", DELETE), "config.json", "lacks 'classes'"),
    "old head without checksum": ("linear", set_key("weights_sha256", DELETE), "config.json", "checksum"),
    "unknown head": ("linear", set_key("head", "svm"), "config.json", "unknown head 'svm'"),
    "head not a string": ("linear", set_key("head", 5), "config.json", "'head' must be a head name"),
    "classes not scalars": ("linear", set_key("classes", [[1], [2], [3]]), "config.json", "'classes' must be"),
    "classes mixed": ("linear", set_key("classes", [1, "dog", None]), "config.json", "'classes' must be"),
    "classes duplicated": ("linear", set_key("classes", ["cat", "cat", "eel"]), "config.json", "duplicates"),
    "n_features_in negative": ("linear", set_key("n_features_in", -3), "config.json", "'n_features_in' must be a positive"),
    "n_features_in a string": ("linear", set_key("n_features_in", "8"), "config.json", "'n_features_in' must be a positive"),
    "param of wrong type": ("linear", set_key("params", "C", "big"), "config.json", "'C' parameter of LinearHead"),
    "unknown param": ("mlp", set_key("params", "hiddn", 3), "config.json", "no parameter 'hiddn'"),
    "params not an object": ("linear", set_key("params", [1]), "config.json", "'params' must be an object"),
    "device meta": ("linear", set_key("params", "device", "meta"), "config.json", "'device' parameter"),
    "backbone null": ("linear", set_key("backbone", None), "config.json", "'backbone' must be"),
    "backbone without model id": ("linear", set_key("backbone", "model_id", DELETE), "config.json", "model_id"),
    "backbone dim wrong": ("linear", set_key("backbone", "dim", 512), "config.json", "'backbone.dim' must equal"),
    "extra lacks a value": ("linear", set_key("extra", "C_", DELETE), "config.json", "'extra' lacks 'C_'"),
    "extra of wrong type": ("mlp", set_key("extra", "best_epoch_", "3"), "config.json", "'extra.best_epoch_' must be int"),
    "training data malformed": ("linear", set_key("training_data", {"store": 3}), "config.json", "'training_data'"),
    "weights of another head": ("linear", lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 64),
                                "model.safetensors", "does not belong to"),
    "pickle named model.safetensors": ("linear", lambda d: write_weights(d, raw=pickle.dumps({"coef": [1.0]})),
                                       "model.safetensors", "not a safetensors file"),
    "int8 weights": ("linear", change_tensor("coef", lambda t: t.to(torch.int8)), "model.safetensors", "dtype I8"),
    "transposed weights": ("linear", change_tensor("coef", lambda t: t.T.contiguous()), "model.safetensors",
                           "'coef' has shape [8, 3]"),
    "NaN weights": ("linear", change_tensor("intercept", lambda t: t * float("nan")), "model.safetensors", "NaN"),
    "missing tensor": ("linear", lambda d: write_weights(d, {"coef": load_file(str(d / "model.safetensors"))["coef"]}),
                       "model.safetensors", "missing ['intercept']"),
    "extra tensor": ("linear", lambda d: write_weights(d, {**load_file(str(d / "model.safetensors")), "x": torch.zeros(1)}),
                     "model.safetensors", "unexpected ['x']"),
    "mlp weights of another width": ("mlp", set_key("params", "hidden", 32), "model.safetensors",
                                     "'model.0.weight' has shape [16, 8]"),
    "cache labels out of range": ("tip-adapter", change_tensor("cache_labels", lambda t: t + 5), "model.safetensors",
                                  "cache_labels must be class indices"),
    "float cache labels": ("tip-adapter", change_tensor("cache_labels", lambda t: t.float()), "model.safetensors",
                           "'cache_labels' has dtype F32"),
    "cache keys and labels disagree": ("tip-adapter", change_tensor("cache_labels", lambda t: t[:-1]),
                                       "model.safetensors", "'cache_labels' has shape"),
    "weights missing": ("linear", lambda d: (d / "model.safetensors").unlink(), "", "not a saved head"),
    "config a FIFO": ("linear", lambda d: ((d / "config.json").unlink(), os.mkfifo(d / "config.json")), "",
                      "not a regular file"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_head_folder_is_refused_in_one_line_naming_the_file(case, blobs, tmp_path):
    kind, breakit, file, needle = BROKEN[case]
    d = saved(kind, blobs, tmp_path / "head")
    breakit(d)
    with pytest.raises((HeadFileError, FileNotFoundError)) as e:
        Head.from_pretrained(d)
    msg = str(e.value)
    assert "\n" not in msg and needle in msg, msg
    assert str(d / file) in msg if file else str(d) in msg
    # Through the CLI: one line, exit 1, no traceback.
    store = tmp_path / "s.h5"
    write_store(store, blobs[0], np.arange(len(blobs[1])) % 3, ["cat", "dog", "eel"], model_id=BACKBONE[0],
                model_hash=BACKBONE[1])
    res = CliRunner().invoke(main, ["evaluate", str(d), str(store), "--out", str(tmp_path / "ev")])
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output and needle in res.output
    assert len(res.output.strip().splitlines()) == 1, res.output


def test_a_healthy_folder_still_loads_and_scores(blobs, tmp_path):
    d = saved("linear", blobs, tmp_path / "head")
    store = tmp_path / "s.h5"
    write_store(store, blobs[0], np.searchsorted(["cat", "dog", "eel"], blobs[1]), ["cat", "dog", "eel"],
                model_id=BACKBONE[0], model_hash=BACKBONE[1])
    res = CliRunner().invoke(main, ["evaluate", str(d), str(store), "--out", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["accuracy"] > 0.9


def test_a_head_without_a_model_hash_is_refused_when_scored(blobs, tmp_path):
    d = saved("linear", blobs, tmp_path / "head")
    edit_config(d, lambda c: c["backbone"].update(model_hash=None))  # what an old head holds
    store = tmp_path / "s.h5"
    write_store(store, blobs[0], np.zeros(len(blobs[1]), int) % 3, ["cat", "dog", "eel"], model_id=BACKBONE[0],
                model_hash=BACKBONE[1])
    res = CliRunner().invoke(main, ["evaluate", str(d), str(store), "--out", str(tmp_path / "ev")])
    assert res.exit_code == 1 and "has no model hash" in res.output and "Traceback" not in res.output


def test_a_mixed_pair_of_files_is_refused(blobs, tmp_path):
    X, y, _ = blobs
    a = saved("linear", blobs, tmp_path / "a")
    b = tmp_path / "b"
    LinearHead(C=0.01).fit(X, y).set_backbone(*BACKBONE).save_pretrained(b)  # same shapes, other weights
    (a / "model.safetensors").write_bytes((b / "model.safetensors").read_bytes())
    with pytest.raises(HeadFileError, match="does not belong to .*config.json.*torn or mixed write"):
        Head.from_pretrained(a)


def test_a_rewrite_that_fails_between_the_files_leaves_the_previous_head(blobs, tmp_path, monkeypatch):
    X, y, _ = blobs
    d = saved("linear", blobs, tmp_path / "head")
    (d / "report.txt").write_text("kept")
    before = Head.from_pretrained(d).predict_proba(X)
    real = Path.write_text

    def disk_full(self, *a, **kw):  # the weights are written; the config is not
        if self.name == "config.json":
            raise OSError(28, "No space left on device")
        return real(self, *a, **kw)

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(OSError, match="No space"):
        MLPHead(hidden=16, patience=2).fit(X, y).set_backbone(*BACKBONE).save_pretrained(d)
    monkeypatch.undo()
    again = Head.from_pretrained(d)
    assert type(again) is LinearHead
    np.testing.assert_array_equal(again.predict_proba(X), before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head"]  # no staging folder, no lock left
    # A successful rewrite keeps the folder's other files.
    MLPHead(hidden=16, patience=2).fit(X, y).set_backbone(*BACKBONE).save_pretrained(d)
    assert type(Head.from_pretrained(d)) is MLPHead and (d / "report.txt").read_text() == "kept"


def test_a_rewrite_killed_between_the_files_leaves_the_previous_head(blobs, tmp_path):
    X, y, _ = blobs
    d = saved("linear", blobs, tmp_path / "head")
    before = Head.from_pretrained(d).predict_proba(X)
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        import numpy as np
        from clip_heads.heads import MLPHead
        real = Path.write_text
        def die(self, *a, **kw):
            if self.name == "config.json":
                os.kill(os.getpid(), signal.SIGKILL)
            return real(self, *a, **kw)
        Path.write_text = die
        X = np.load({str(tmp_path / 'X.npy')!r}); y = np.load({str(tmp_path / 'y.npy')!r})
        MLPHead(hidden=16, patience=2).fit(X, y).set_backbone(*{BACKBONE!r}).save_pretrained({str(d)!r})
    """)
    np.save(tmp_path / "X.npy", X)
    np.save(tmp_path / "y.npy", y)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    again = Head.from_pretrained(d)
    assert type(again) is LinearHead
    np.testing.assert_array_equal(again.predict_proba(X), before)
    # The kill left a hidden staging folder beside it; the next save is not blocked by it or by the lock.
    MLPHead(hidden=16, patience=2).fit(X, y).set_backbone(*BACKBONE).save_pretrained(d)
    assert type(Head.from_pretrained(d)) is MLPHead


def test_a_second_writer_of_a_head_folder_fails_at_once(blobs, tmp_path):
    X, y, _ = blobs
    d = saved("linear", blobs, tmp_path / "head")
    with exclusive_lock(d, "a test holding the head"):
        with pytest.raises(LockedError, match="being written by another process .*a test holding the head"):
            LinearHead(C=1.0).fit(X, y).set_backbone(*BACKBONE).save_pretrained(d)
    assert type(Head.from_pretrained(d)) is LinearHead


def test_a_head_saved_for_a_missing_gpu_loads_on_cpu(blobs, tmp_path, caplog):
    d = saved("linear", blobs, tmp_path / "head")
    edit_config(d, lambda c: c["params"].update(device="cuda:3"))
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    head = Head.from_pretrained(d)
    assert head.device == "cpu" and "lacks: loading it on cpu" in caplog.text
    with pytest.raises(HeadFileError, match="'device' parameter"):
        Head.from_pretrained(d, device="tpu")
