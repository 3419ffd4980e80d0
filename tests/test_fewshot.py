"""The few-shot protocol: exact, shared, disjoint samples; no head choosing on test vectors; the command."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner

from clip_heads.cli import main
from clip_heads.errors import BadValueError
from clip_heads.fewshot import parse_shots, run_few_shot
from clip_heads.protocols import ShotsError, fi_split, sample_shots, store_split
from clip_heads.store import PromptSet, open_store
from clip_heads.writer import write_store

CLASSES = ["a", "b", "c", "d"]


def noisy_prompt_set(means, seed=0):
    rng = np.random.default_rng(seed)
    embeds = means / np.linalg.norm(means, axis=1, keepdims=True) + 0.8 * rng.normal(size=means.shape) / 4
    return PromptSet("default", CLASSES, ["a photo of {}."], [f"a photo of {c}." for c in CLASSES],
                     embeds.astype(np.float32), np.zeros(4, int), np.arange(4))


def planted_store(path, n=60, split=None, seed=0):
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(4, 16))
    means *= 1.2 / np.linalg.norm(means, axis=1, keepdims=True)
    y = np.repeat(np.arange(4), n)
    X = (means[y] + 0.5 * rng.normal(size=(len(y), 16))).astype(np.float32)
    extras = {"split": np.asarray(split)} if split is not None else None
    write_store(path, X, y, CLASSES, keys=[f"img{i:04d}" for i in range(len(y))], model_id="m",
                prompt_sets=[noisy_prompt_set(means)], extras=extras)
    return X, y


# -- protocols -----------------------------------------------------------------------------------
def test_shots_are_exactly_k_per_class_from_the_pool_and_depend_on_the_seed_alone():
    y = np.repeat(np.arange(3), 20)
    pool = np.arange(0, 60, 2)  # the training rows
    a = sample_shots(y, pool, 4, seed=1)
    assert np.bincount(y[a]).tolist() == [4, 4, 4] and np.isin(a, pool).all()
    np.testing.assert_array_equal(a, sample_shots(y, pool, 4, seed=1))
    assert not np.array_equal(a, sample_shots(y, pool, 4, seed=2))
    np.testing.assert_array_equal(sample_shots(y, pool, "all", seed=5), pool)
    with pytest.raises(ShotsError, match="11 shots.*class 'a' has only 10"):
        sample_shots(y, pool, 11, seed=1, class_names=["a", "b", "c"])
    with pytest.raises(BadValueError):
        sample_shots(y, pool, 0, seed=1)


def test_store_split_uses_the_split_column_else_a_seeded_stratified_split():
    y = np.repeat(np.arange(2), 50)
    col = np.array(["train"] * 60 + ["val"] * 10 + ["test"] * 30)
    s = store_split(y, col)
    assert (len(s.train), len(s.val), len(s.test)) == (60, 10, 30) and s.source == "store split column"
    s = store_split(y, None, seed=3, test_fraction=0.3)
    assert len(np.intersect1d(s.train, s.test)) == 0 and len(s.train) + len(s.test) == 100
    assert np.bincount(y[s.test]).tolist() == [15, 15]
    np.testing.assert_array_equal(s.test, store_split(y, None, seed=3).test)
    with pytest.raises(BadValueError, match="'train' and 'test'"):
        store_split(y, np.array(["train"] * 100))
    f = fi_split(np.repeat(np.arange(2), 200), seed=0)
    assert (len(f.train), len(f.val), len(f.test)) == (320, 20, 60)


def test_parse_shots():
    assert parse_shots("1,2, 16,all") == [1, 2, 16, "all"]
    for bad in ("0", "1,x", "1,1", "2.5", ""):
        with pytest.raises(BadValueError):
            parse_shots(bad)


# -- the grid ------------------------------------------------------------------------------------
HEADS = ["zs-lp", "clap", "lpp", "gda", "tip-adapter", "linear"]
FAST = {"zs-lp": {"epochs": 20}, "clap": {"epochs": 20}, "linear": {"Cs": [1.0, 100.0]}}


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    root = tmp_path_factory.mktemp("fewshot")
    X, y = planted_store(root / "s.h5")
    rep = run_few_shot(root / "s.h5", root / "out", heads=HEADS, shots="1,4", seeds=[1, 2], params=FAST, plots=False)
    return root, X, y, rep


def test_grid_writes_every_row_and_shares_samples_across_heads(grid):
    root, X, y, rep = grid
    out = root / "out"
    rows = list(csv.DictReader((out / "few_shot.csv").open()))
    assert list(rows[0]) == ["head", "shots", "seed", "accuracy", "macro_f1", "fit_seconds", "ece", "brier", "nll"]
    assert len(rows) == len(HEADS) * 2 * 2
    assert {(r["head"], r["shots"], r["seed"]) for r in rows} == {(h, k, s) for h in HEADS for k in ("1", "4")
                                                                     for s in ("1", "2")}
    samples = json.loads((out / "samples.json").read_text())
    split = {r["key"]: r["split"] for r in csv.DictReader((out / "split.csv").open())}
    keys = [f"img{i:04d}" for i in range(len(y))]
    label = dict(zip(keys, y.tolist(), strict=True))
    for seed in ("1", "2"):
        for k in ("1", "4"):
            drawn = samples[seed][k]
            assert np.bincount([label[key] for key in drawn]).tolist() == [int(k)] * 4
            assert all(split[key] == "train" for key in drawn)  # never a test image
    assert samples["1"]["4"] != samples["2"]["4"]
    # The same samples for every head: the sample is written once per (seed, shots), and each head's
    # fit saw exactly those rows (tip-adapter's cache holds one key per training image).
    choices = json.loads((out / "choices.json").read_text())
    assert len(choices) == len(rows)
    text = (out / "report.txt").read_text()
    assert "| head | 1 shots | 4 shots |" in text and all(f"| {h} |" in text for h in HEADS)
    assert not (out / "few_shot.png").exists()  # plots=False; test_fewshot_figures draws the figures
    acc = {(r["head"], r["shots"]): float(r["accuracy"]) for r in rows if r["seed"] == "1"}
    assert acc[("lpp", "4")] > 0.5 and acc[("gda", "4")] > 0.5  # learnable: chance is 0.25


def test_every_head_fits_on_the_drawn_sample(grid, monkeypatch):
    """Record what each head is fitted on: the rows of the shared sample, for every head."""
    root, X, y, _ = grid
    seen = []
    from clip_heads.heads import HEADS as REG

    for name in HEADS:
        cls = REG[name]
        orig = cls.fit

        def spy(self, Xf, yf, *a, _orig=orig, _cls=cls, **kw):
            if type(self) is _cls:  # clap's fit is zs-lp's: record each head once
                seen.append((self.name, np.asarray(Xf).tobytes()))
            return _orig(self, Xf, yf, *a, **kw)

        monkeypatch.setattr(cls, "fit", spy)
    run_few_shot(root / "s.h5", root / "spy", heads=HEADS, shots="2", seeds=[7], params=FAST)
    assert [n for n, _ in seen] == HEADS
    assert len({b for _, b in seen}) == 1  # one sample, byte for byte, for all six heads


def test_no_hyper_parameter_choice_changes_when_test_vectors_are_noise(tmp_path):
    X, y = planted_store(tmp_path / "s.h5")
    run_few_shot(tmp_path / "s.h5", tmp_path / "a", heads=HEADS, shots="2,8", seeds=[1, 2], params=FAST)
    test_keys = [r["key"] for r in csv.DictReader((tmp_path / "a" / "split.csv").open()) if r["split"] == "test"]
    rows = np.asarray([int(k[3:]) for k in test_keys])
    noise = np.random.default_rng(9).normal(size=(len(rows), X.shape[1])).astype(np.float32)
    X2 = X.copy()
    X2[rows] = noise
    with open_store(tmp_path / "s.h5") as s:
        ps = s.prompt_set()  # the very same prompts
    write_store(tmp_path / "n.h5", X2, y, CLASSES, keys=[f"img{i:04d}" for i in range(len(y))], model_id="m",
                prompt_sets=[ps])
    run_few_shot(tmp_path / "n.h5", tmp_path / "b", heads=HEADS, shots="2,8", seeds=[1, 2], params=FAST)
    a = json.loads((tmp_path / "a" / "choices.json").read_text())
    b = json.loads((tmp_path / "b" / "choices.json").read_text())
    assert a == b
    assert any(c["chosen"].get("alpha_") is not None for c in a)  # gda / tip-adapter did choose
    assert json.loads((tmp_path / "a" / "samples.json").read_text()) == \
        json.loads((tmp_path / "b" / "samples.json").read_text())
    acc = lambda d: [float(r["accuracy"]) for r in csv.DictReader((tmp_path / d / "few_shot.csv").open())]  # noqa: E731
    assert np.mean(acc("a")) > np.mean(acc("b")) + 0.2  # the scores did see the noise


def test_split_column_is_the_protocol_and_val_rows_are_left_out(tmp_path):
    split = (["train"] * 30 + ["val"] * 5 + ["test"] * 25) * 4
    planted_store(tmp_path / "s.h5", split=split)
    rep = run_few_shot(tmp_path / "s.h5", tmp_path / "o", heads=["gda", "lpp"], shots="4,all", seeds=[1])
    assert rep["n_train"] == 120 and rep["n_test"] == 100
    assert "store split column" in rep.text
    samples = json.loads((tmp_path / "o" / "samples.json").read_text())
    assert len(samples["1"]["all"]) == 120


def test_cli_few_shot_and_its_refusals(tmp_path):
    planted_store(tmp_path / "s.h5")
    r = CliRunner().invoke(main, ["few-shot", str(tmp_path / "s.h5"), "--out", str(tmp_path / "o"), "--heads",
                                  "gda,lpp", "--shots", "1,2", "--seeds", "1", "--param", "gda.cv=3"])
    assert r.exit_code == 0, r.output
    assert "| gda |" in r.output and (tmp_path / "o" / "few_shot.csv").exists()
    for args, msg in ((["--shots", "1,x"], "shots"), (["--heads", "svm"], "unknown head 'svm'"),
                      (["--shots", "100"], "class 'a' has only"), (["--param", "gda.bogus=1"], "bogus"),
                      (["--param", "lpp=1"], "HEAD.KEY"), (["--heads", "prolip"], "pre-projection")):
        r = CliRunner().invoke(main, ["few-shot", str(tmp_path / "s.h5"), "--out", str(tmp_path / "x")] + args)
        assert r.exit_code == 2, (args, r.output)
        assert msg in r.output and "Traceback" not in r.output, r.output
        assert sum(msg in line for line in r.output.splitlines()) == 1  # said once, on one line
        assert not (tmp_path / "x").exists()  # nothing written



def test_cli_few_shot_no_plots_keeps_the_numbers_and_draws_nothing(tmp_path, monkeypatch):
    planted_store(tmp_path / "s.h5")
    monkeypatch.setenv("CLIP_HEADS_PLOTS", "1")
    args = ["few-shot", str(tmp_path / "s.h5"), "--heads", "gda", "--shots", "1,2", "--seeds", "1", "--param", "gda.cv=3"]
    drawn = CliRunner().invoke(main, args + ["--out", str(tmp_path / "d")])
    bare = CliRunner().invoke(main, args + ["--out", str(tmp_path / "n"), "--no-plots"])
    assert drawn.exit_code == 0 and bare.exit_code == 0, (drawn.output, bare.output)
    assert (tmp_path / "d" / "few_shot.png").is_file() and not list((tmp_path / "n").rglob("*.png"))
    assert _same_numbers(tmp_path / "d" / "few_shot.csv", tmp_path / "n" / "few_shot.csv")


def _same_numbers(a, b) -> bool:
    """The two grids' CSVs equal but for fit_seconds."""
    import csv

    rows = [[{k: v for k, v in r.items() if k != "fit_seconds"} for r in csv.DictReader(open(p))] for p in (a, b)]
    return rows[0] == rows[1]

def test_views_column_trains_the_heads_that_ask_for_it(tmp_path, monkeypatch):
    X, y = planted_store(tmp_path / "plain.h5")
    V = (X[:, None, :] + 0.2 * np.random.default_rng(4).normal(size=(len(X), 3, X.shape[1]))).astype(np.float32)
    with open_store(tmp_path / "plain.h5") as s:
        ps = s.prompt_set()
    write_store(tmp_path / "v.h5", X, y, CLASSES, keys=[f"img{i:04d}" for i in range(len(y))], model_id="m",
                prompt_sets=[ps], extras={"views": V})
    from clip_heads.heads import TipAdapterHead

    seen = []
    orig = TipAdapterHead.fit

    def spy(self, Xf, yf, views=None):
        seen.append((np.asarray(Xf), views))
        return orig(self, Xf, yf, views)

    monkeypatch.setattr(TipAdapterHead, "fit", spy)
    run_few_shot(tmp_path / "v.h5", tmp_path / "o", heads=["tip-adapter", "lpp"], shots="2", seeds=[1],
                 params={"tip-adapter": {"use_views": True}})
    (Xf, views), = seen
    rows = [int(np.flatnonzero((X == x).all(1))[0]) for x in Xf]  # which images were drawn
    np.testing.assert_array_equal(views, V[rows])  # their own views, nothing else
    with pytest.raises(BadValueError, match="--views"):
        run_few_shot(tmp_path / "plain.h5", tmp_path / "p", heads=["lpp"], shots="2", seeds=[1],
                     params={"lpp": {"use_views": True}})


def test_fi_protocol_trains_on_80_and_scores_on_15_percent(tmp_path):
    planted_store(tmp_path / "s.h5", n=100)
    rep = run_few_shot(tmp_path / "s.h5", tmp_path / "o", heads=["gda"], shots="4", seeds=[1], protocol="fi")
    assert (rep["n_train"], rep["n_test"]) == (320, 60) and "80/5/15" in rep.text
    with pytest.raises(BadValueError, match="no split column"):
        run_few_shot(tmp_path / "s.h5", tmp_path / "x", heads=["gda"], shots="4", seeds=[1], protocol="split-column")


def test_prolip_on_a_store_encoded_with_pre_projection_features(tiny_clip, tmp_path):
    from PIL import Image

    from clip_heads.encode import encode

    rng = np.random.default_rng(0)
    rgb = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
    for name, c in rgb.items():
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(4):
            arr = np.clip(np.array(c)[None, None] + rng.normal(0, 20, (30, 36, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(tmp_path / "imgs" / name / f"{i}.jpg", quality=95)
    r = encode(str(tmp_path / "imgs"), tmp_path / "s.h5", model=tiny_clip, workers=0, progress=False,
               dtype="float32", features="projected,pre-projection")
    rep = run_few_shot(r.path, tmp_path / "o", heads=["prolip", "zero-shot"], shots="2", seeds=[1],
                       params={"prolip": {"reg": float("inf")}}, test_fraction=0.5)
    rows = {x["head"]: float(x["accuracy"]) for x in csv.DictReader((tmp_path / "o" / "few_shot.csv").open())}
    # lambda = inf leaves the store's own projection: prolip on pre_embeds is zero-shot on embeds.
    assert rows["prolip"] == rows["zero-shot"]
    assert rep["n_test"] == 6
    plain = encode(str(tmp_path / "imgs"), tmp_path / "p.h5", model=tiny_clip, workers=0, progress=False)
    with pytest.raises(BadValueError, match="pre-projection"):
        run_few_shot(plain.path, tmp_path / "x", heads=["prolip"], shots="1", seeds=[1])
