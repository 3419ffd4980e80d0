"""The CLI's names and paths (issue 9): one spelling per idea across commands, former spellings
kept hidden with a one-line warning, a missing input file is failed work (exit 1) in every
command, and the options issue 9 found untested (info, zero-shot --top-k, --split,
--label-level, -q) driven through the CLI with their values checked."""
from __future__ import annotations

import json
import logging

import click
import numpy as np
import pytest

from clip_heads.cli import main
from clip_heads.store import PromptSet, open_store
from clip_heads.writer import write_store
from faultkit import invoke, one_line_error


@pytest.fixture
def store(tmp_path):
    """Two separable classes and a prompt set of three templates, the third pointing the wrong way."""
    rng = np.random.default_rng(0)
    means = np.eye(8)[:2] * 4
    y = np.arange(40) % 2
    X = means[y] + rng.normal(size=(40, 8))
    good = means / 4
    embeds = np.r_[good, good + 0.1 * rng.normal(size=(2, 8)), good[::-1]].astype(np.float32)
    ps = PromptSet("mine", ["a", "b"], ["a {}", "the {}", "not {}"],
                   ["a a", "a b", "the a", "the b", "not a", "not b"], embeds, np.repeat(np.arange(3), 2), np.tile([0, 1], 3))
    path = write_store(tmp_path / "s.h5", X, y, ["a", "b"], model_id="m", model_hash="sha256:0", prompt_sets=[ps],
                       keys=[f"k{i:02d}" for i in range(40)])
    return path, X, y, embeds


def _commands():
    for name, cmd in main.commands.items():
        yield name, cmd


# -------------------------------------------------------------------------------------------------- names
def test_every_command_that_writes_takes_out_and_o():
    writers = {name for name, cmd in _commands() if any("--out" in p.opts for p in cmd.params)}
    assert writers >= {"encode", "predict", "zero-shot", "train-head", "evaluate", "ablate-prompts", "few-shot", "compare", "demo",
                       "finetune", "wise-ft", "generalisation", "reproduce"}
    for name in writers:
        out = next(p for p in main.commands[name].params if "--out" in p.opts)
        assert "-o" in out.opts, name


def test_shared_options_mean_one_thing_and_workers_states_its_real_default(monkeypatch):
    from clip_heads import engines

    for opt in ("--split", "--workers", "--label-level"):
        helps = {p.help for _, cmd in _commands() for p in cmd.params if opt in p.opts}
        assert len(helps) == 1, (opt, helps)
    (workers_help,) = {p.help for _, cmd in _commands() for p in cmd.params if "--workers" in p.opts}
    assert "on a GPU every usable core but two, 1 to 32; on a CPU none up to 4 cores, else one per 8 cores" in workers_help
    # ... which is what the engines do.
    for cores, cpu, gpu in ((2, 0, 1), (4, 0, 2), (16, 2, 14), (64, 8, 32)):
        monkeypatch.setattr(engines, "usable_cores", lambda c=cores: c)
        assert (engines.default_workers("cpu"), engines.default_workers("cuda")) == (cpu, gpu), cores


def test_zero_shot_template_ids_and_its_former_name(store, tmp_path):
    path, X, y, embeds = store
    helps = main.commands["zero-shot"].get_help(click.Context(main.commands["zero-shot"]))
    assert "--template-ids" in helps and "--templates" not in helps
    code, out = invoke(["zero-shot", str(path), "--template-ids", "0,2", "-o", str(tmp_path / "new")])
    assert code == 0 and "deprecated" not in out, out
    m = json.loads((tmp_path / "new" / "metrics.json").read_text())
    # Cosine to the normalised mean of templates 0 and 2.
    V = embeds[[0, 1]] / np.linalg.norm(embeds[[0, 1]], axis=1, keepdims=True) \
        + embeds[[4, 5]] / np.linalg.norm(embeds[[4, 5]], axis=1, keepdims=True)
    assert m["accuracy"] == pytest.approx(float(((X @ V.T).argmax(1) == y).mean()), abs=1e-12)
    assert m["info"]["templates"] == ["a {}", "not {}"]
    code, out = invoke(["zero-shot", str(path), "--templates", "0,2", "-o", str(tmp_path / "old")])
    assert code == 0, out
    assert [ln for ln in out.splitlines() if "deprecated" in ln] == ["Warning: --templates is deprecated; use --template-ids"]
    assert json.loads((tmp_path / "old" / "metrics.json").read_text())["accuracy"] == m["accuracy"]
    code, out = invoke(["zero-shot", str(path), "--templates", "0", "--template-ids", "1", "-o", str(tmp_path / "both")])
    assert code == 2 and "--template-ids only" in out and not (tmp_path / "both").exists()
    code, out = invoke(["zero-shot", str(path), "--template-ids", "5", "-o", str(tmp_path / "bad")])
    assert code == 2, out
    one_line_error(out, "prompt set 'mine' has no template 5; its templates are 0: a {}; 1: the {}; 2: not {}")


def test_wise_ft_alphas_and_its_former_name(tiny_clip, tmp_path):
    helps = main.commands["wise-ft"].get_help(click.Context(main.commands["wise-ft"]))
    assert "--alphas" in helps and "--alpha " not in helps
    # The former spelling reaches the same check (a weight outside [0, 1] is refused, nothing written).
    for flag in ("--alphas", "--alpha"):
        code, out = invoke(["wise-ft", tiny_clip, tiny_clip, flag, "0,1.5", "-o", str(tmp_path / "w")])
        assert code == 1 and "1.5" in out and "Traceback" not in out, out
        assert ("Warning: --alpha is deprecated; use --alphas" in out) == (flag == "--alpha")
    assert not (tmp_path / "w").exists()


# -------------------------------------------------------------------------------------------------- missing paths
@pytest.mark.parametrize("argv, name", [
    (["info", "M"], "STORE"),
    (["verify", "M"], "STORE"),
    (["prompts", "M", "-t", "bp-photo"], "STORE"),
    (["zero-shot", "M"], "STORE"),
    (["ablate-prompts", "M"], "STORE"),
    (["few-shot", "M", "-o", "O"], "STORE"),
    (["train-head", "linear", "M", "-o", "O"], "STORE"),
    (["train-head", "linear", "S", "-o", "O", "--eval-store", "M"], "--eval-store"),
    (["evaluate", "M", "S"], "HEAD_DIR"),
    (["evaluate", "D", "M"], "STORE"),
    (["predict", "M", "D", "-o", "O"], "HEAD_DIR"),
    (["merge", "O", "M"], "SHARDS"),
    (["compare", "M", "-o", "O"], "RUN_DIRS"),
    (["wise-ft", "D", "M", "-o", "O"], "FINETUNED_MODEL"),
    (["demo", "--source", "M", "-o", "O"], "--source"),
    (["reproduce", "--fi", "M", "--cifar", "D", "-o", "O"], "--fi"),
    (["encode", "M", "-o", "O"], None),  # SOURCE: the library's own check, the same code
    (["finetune", "M", "-o", "O"], None),
])
def test_a_missing_input_is_failed_work_in_every_command(store, tmp_path, argv, name):
    missing = tmp_path / "no" / "such.h5"
    subst = {"M": str(missing), "S": str(store[0]), "O": str(tmp_path / "out"), "D": str(tmp_path)}
    code, out = invoke([subst.get(a, a) for a in argv])
    assert code == 1, out
    one_line_error(out, str(missing))
    if name:
        assert out.startswith(f"Error: {name}: ") and "does not exist" in out, out
    assert not (tmp_path / "out").exists()


# -------------------------------------------------------------------------------------------------- issue 9's gaps
def test_info_prints_the_stores_contents(store):
    path, X, y, _ = store
    code, out = invoke(["info", str(path)])
    assert code == 0, out
    lines = out.splitlines()
    assert f"vectors    40 x 8 float32, raw" in lines  # noqa: F541 (the line as printed)
    assert "classes    2" in lines and "  a  20" in lines and "  b  20" in lines
    assert "prompts    1 sets" in lines and "  mine: 3 templates x 2 classes = 6 prompts" in lines
    assert "      not {}" in lines and "skipped    0" in lines
    code, out = invoke(["info", str(path), "--json"])
    d = json.loads(out)
    assert d["n_images"] == 40 and d["dim"] == 8 and d["classes"] == {"a": 20, "b": 20}
    assert d["prompt_sets"]["mine"]["template_texts"] == ["a {}", "the {}", "not {}"]


def test_zero_shot_top_k_writes_the_nearest_images_of_each_class(store, tmp_path):
    path, X, y, embeds = store
    code, out = invoke(["zero-shot", str(path), "--top-k", "3", "--template-ids", "0", "-o", str(tmp_path / "zs")])
    assert code == 0, out
    doc = json.loads((tmp_path / "zs" / "top_k.json").read_text())
    assert doc["k"] == 3 and doc["prompt_set"] == "mine"
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    for c, name in enumerate(["a", "b"]):
        v = embeds[c] / np.linalg.norm(embeds[c])
        cos = Xn @ v
        best = np.argsort(-cos, kind="stable")[:3]
        assert [k for k, _ in doc["top_k"][name]] == [f"k{i:02d}" for i in best]
        assert [s for _, s in doc["top_k"][name]] == pytest.approx(cos[best].tolist(), abs=1e-6)


def test_split_and_label_level_reach_the_source(tiny_clip, tmp_path):
    from test_demo import tiny_cifar_tarball

    tgz, _ = tiny_cifar_tarball(tmp_path / "cifar-100-python.tar.gz", n_test=6, n_train=8)
    common = ["--model", tiny_clip, "--workers", "0", "-t", "bp-photo"]
    code, out = invoke(["-q", "encode", str(tgz), "-o", str(tmp_path / "train.h5"), "--split", "train",
                        "--label-level", "coarse", *common])
    assert code == 0, out
    with open_store(tmp_path / "train.h5") as s:
        assert len(s) == 8 and s.classes == ["a", "b"] and s.labels.tolist() == [i % 4 % 2 for i in range(8)]
        assert all(k.startswith("train/") for k in s.keys)
        assert s.attrs["source"]["options"] == {"split": "train", "label_level": "coarse"}
    code, out = invoke(["-q", "encode", str(tgz), "-o", str(tmp_path / "test.h5"), *common])
    with open_store(tmp_path / "test.h5") as s:  # the default: the fine labels of the test split
        assert len(s) == 6 and len(s.classes) == 4 and all(k.startswith("test/") for k in s.keys)
    code, out = invoke(["-q", "encode", str(tgz), "-o", str(tmp_path / "bad.h5"), "--split", "val", *common])
    assert code == 2, out  # a bad value
    one_line_error(out, "split must be one of test, train, all; got 'val'")
    assert not (tmp_path / "bad.h5").exists()


def test_quiet_silences_info_and_progress_never_warnings(store, tmp_path, caplog):
    path = store[0]
    code, out = invoke(["-q", "train-head", "linear", str(path), "-o", str(tmp_path / "lin")])
    assert code == 0, out

    def run(*flags):
        """evaluate on the training store (a resubstitution warning) and zero-shot --top-k on a store
        whose images cannot be found (an INFO line: no grid)."""
        caplog.clear()
        outs = []
        with caplog.at_level(logging.DEBUG):
            for argv in (["evaluate", str(tmp_path / "lin"), str(path)], ["zero-shot", str(path), "--top-k", "2"]):
                code, out = invoke([*flags, *argv, "-o", str(tmp_path / f"{argv[0]}{len(flags)}"), "--no-plots"])
                assert code == 0, out
                outs.append(out.replace(str(tmp_path / f"{argv[0]}{len(flags)}"), "OUT"))
        return outs, [(r.levelno, r.getMessage()) for r in caplog.records if r.name.startswith("clip_heads")]

    loud, records = run()
    assert any(level == logging.INFO and "top-k grid skipped" in m for level, m in records)
    quiet, quiet_records = run("-q")
    # The resubstitution warning survives -q; nothing below WARNING does; what is printed is the same.
    warnings = [m for level, m in records if level >= logging.WARNING]
    assert any("was trained on this data" in m for m in warnings)
    assert quiet_records == [(logging.WARNING, m) for m in warnings]
    assert quiet == loud


def test_python_m_clip_heads_is_the_command():
    import subprocess
    import sys

    for mod in ("clip_heads", "clip_heads.cli"):
        res = subprocess.run([sys.executable, "-m", mod, "info", "/no/such/store.h5"], capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 1 and res.stderr.strip() == "Error: STORE: File '/no/such/store.h5' does not exist.", res
    res = subprocess.run([sys.executable, "-m", "clip_heads", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.startswith("Usage: clip-heads ")
    listed = {ln.split()[0] for ln in res.stdout.split("Commands:")[1].splitlines() if ln.strip()}
    assert listed == set(main.commands) and "few-shot" in listed and len(listed) == 17
