"""compare: means and stds over folds and seeds, one row per data set unless asked, honest about what it skips."""
import csv
import io
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from clip_heads.cli import main
from clip_heads.compare import MixedDataError, compare_runs, read_run
from clip_heads.evaluate import run_zero_shot, train_head
from clip_heads.metrics import classification_report, summarize_folds
from test_evaluate import blob_store
from test_report_page import check_page

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    blob_store(root / "s.h5", n=20, sep=2.0)
    blob_store(root / "t.h5", n=20, sep=2.0, seed=7)  # other data
    for seed in (0, 1, 2):
        train_head("linear", root / "s.h5", root / f"lin-s{seed}", cv=3, seed=seed)
    train_head("linear", root / "t.h5", root / "lin-t", cv=3, seed=0)
    train_head("linear", root / "s.h5", root / "lin-fit", seed=0)  # no CV: resubstitution only
    run_zero_shot(root / "s.h5", out_dir=root / "zs")
    return root


def cv_metrics(folder):
    return json.loads((folder / "metrics.json").read_text())["cv"]


def test_three_seeds_give_mean_and_std_over_the_runs(runs, tmp_path):
    dirs = [runs / f"lin-s{s}" for s in (0, 1, 2)]
    comp = compare_runs(dirs, out_dir=tmp_path / "out", plots=True)
    assert len(comp.rows) == 1
    row = comp.rows[0]
    assert row["n"] == 3 and row["over"] == "seeds" and not row["mixed_data"]
    for m, path in (("accuracy", ("accuracy",)), ("macro_f1", ("macro", "f1")), ("weighted_f1", ("weighted", "f1"))):
        per_run = []
        for d in dirs:
            v = cv_metrics(d)["mean"]
            for p in path:
                v = v[p]
            per_run.append(v)
        assert row[f"{m}_mean"] == pytest.approx(np.mean(per_run), abs=1e-12)
        assert row[f"{m}_std"] == pytest.approx(np.std(per_run), abs=1e-12)
    assert len({round(v, 9) for v in per_run}) > 1  # the seeds differ, so the std is not trivially 0
    rows = list(csv.DictReader(io.StringIO((tmp_path / "out" / "comparison.csv").read_text())))
    assert float(rows[0]["accuracy_mean"]) == pytest.approx(row["accuracy_mean"]) and rows[0]["n"] == "3"
    md = (tmp_path / "out" / "comparison.md").read_text()
    assert f"{row['accuracy_mean']:.3f} ± {row['accuracy_std']:.3f}" in md and "3 seeds" in md
    with Image.open(tmp_path / "out" / "comparison.png") as im:
        assert im.format == "PNG" and im.size[0] >= 900
    assert (tmp_path / "out" / "comparison.svg").is_file()


def test_one_cv_run_gives_mean_and_std_over_its_folds(runs):
    row = compare_runs([runs / "lin-s1"]).rows[0]
    cv = cv_metrics(runs / "lin-s1")
    assert row["n"] == 3 and row["over"] == "folds" and row["protocol"] == "3-fold cv"
    assert row["accuracy_mean"] == pytest.approx(cv["mean"]["accuracy"], abs=1e-12)
    assert row["accuracy_std"] == pytest.approx(cv["std"]["accuracy"], abs=1e-12)
    assert row["macro_f1_std"] == pytest.approx(cv["std"]["macro"]["f1"], abs=1e-12)


def test_different_stores_are_never_merged_unless_asked(runs):
    dirs = [runs / "lin-s0", runs / "lin-t"]
    assert len(compare_runs(dirs).rows) == 2  # grouped by store by default
    with pytest.raises(MixedDataError, match="different"):
        compare_runs(dirs, by="head,model,prompt_set")
    rows = compare_runs(dirs, by="head", allow_mixed_data=True).rows
    assert len(rows) == 1 and rows[0]["mixed_data"] and len(rows[0]["data"].split(";")) == 2
    md = compare_runs(dirs, by="head", allow_mixed_data=True).to_markdown()
    assert "**mixed data**" in md


def test_protocols_stay_apart_and_headers_say_what(runs):
    comp = compare_runs([runs / "lin-s0", runs / "lin-fit", runs / "zs"], by="head,store")
    got = {(r["head"], r["protocol"]) for r in comp.rows}
    assert got == {("linear", "3-fold cv"), ("linear", "resubstitution"), ("zero-shot", "test")}
    zs = next(r for r in comp.rows if r["head"] == "zero-shot")
    assert zs["accuracy_mean"] == json.loads((runs / "zs" / "metrics.json").read_text())["accuracy"]
    assert zs["n"] == 1 and zs["accuracy_std"] is None


def test_unreadable_folders_are_named_and_all_unreadable_is_an_error(runs, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metrics.json").write_text(json.dumps({"info": {"run": {"command": "zero-shot"}}}))
    comp = compare_runs([runs / "zs", empty, broken], out_dir=tmp_path / "out")
    reasons = dict(comp.unreadable)
    assert "no metrics.json" in reasons[str(empty)] and "lacks" in reasons[str(broken)]
    md = (tmp_path / "out" / "comparison.md").read_text()
    assert "Not read:" in md and str(empty) in md
    with pytest.raises(ValueError, match="no run could be read"):
        compare_runs([empty, broken])
    with pytest.raises(ValueError, match="not among"):
        compare_runs([runs / "zs"], by="head,dataset")


def test_finetune_cv_folder_and_unknown_data(tmp_path):
    rng = np.random.default_rng(0)
    folds = []
    for _ in range(4):
        y = rng.integers(0, 3, 30)
        folds.append(classification_report(y, np.where(rng.random(30) < 0.7, y, 0), ["a", "b", "c"]))
    summary = summarize_folds(folds)
    for name, identity in (("ft1", {"model_id": "tiny", "source": "abc123", "seed": 0, "templates": ["a photo of {}"]}),
                           ("ft2", None), ("ft3", None)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(summary))
        if identity:
            (tmp_path / name / "fold-00").mkdir()
            (tmp_path / name / "fold-00" / "train_log.json").write_text(json.dumps({"identity": identity}))
    [e] = read_run(tmp_path / "ft1")
    assert e.attrs["head"] == "finetune" and e.attrs["model"] == "tiny" and e.data == "source:abc123"
    assert e.values["accuracy"] == [f["accuracy"] for f in folds]
    # Two fine-tunes whose data is not recorded cannot be told to be on the same data.
    with pytest.raises(MixedDataError, match="unrecorded"):
        compare_runs([tmp_path / "ft2", tmp_path / "ft3"])


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_exit_codes_and_files(runs, tmp_path, monkeypatch):
    monkeypatch.setenv("CLIP_HEADS_PLOTS", "1")  # the default, which the suite turns off
    ok = run_cli("-q", "compare", str(runs / "lin-s0"), str(runs / "lin-s1"), "--out", str(tmp_path / "c"))
    assert ok.exit_code == 0, ok.output
    assert {p.name for p in (tmp_path / "c").iterdir()} == {"comparison.csv", "comparison.md", "comparison.png",
                                                            "comparison.svg", "metrics.json", "index.html"}
    page, metrics = check_page(tmp_path / "c")  # the rows' numbers on the page are metrics.json's
    assert "comparison.png" in page.imgs and {("rows", 0, "accuracy_mean"), ("rows", 0, "accuracy_std")} <= {
        tuple(n["key"]) for n in page.nums}
    fast = run_cli("-q", "compare", str(runs / "lin-s0"), "--out", str(tmp_path / "fast"), "--no-plots")
    assert fast.exit_code == 0 and not (tmp_path / "fast" / "comparison.png").exists()
    assert (tmp_path / "fast" / "index.html").is_file()
    mixed = run_cli("compare", str(runs / "lin-s0"), str(runs / "lin-t"), "--by", "head", "--out", str(tmp_path / "m"))
    assert mixed.exit_code == 2 and "--allow-mixed-data" in mixed.output and "Traceback" not in mixed.output
    assert not (tmp_path / "m").exists()
    bad_by = run_cli("compare", str(runs / "zs"), "--by", "colour", "--out", str(tmp_path / "b"))
    assert bad_by.exit_code == 2 and "colour" in bad_by.output
    (tmp_path / "e").mkdir()
    nothing = run_cli("compare", str(tmp_path / "e"), "--out", str(tmp_path / "n"))
    assert nothing.exit_code == 1 and "no run could be read" in nothing.output
    over = run_cli("compare", str(runs / "zs"), "--out", str(runs))
    assert over.exit_code == 1 and "holds the run folder" in over.output
    # Another comparison in --out is not replaced silently.
    again = run_cli("compare", str(runs / "zs"), "--out", str(tmp_path / "c"))
    assert again.exit_code == 1 and "--overwrite" in again.output
    assert "lin-s0" in (tmp_path / "c" / "comparison.csv").read_text()


def test_a_generalisation_folder_gives_one_row_per_alpha_and_side(tmp_path):
    rng = np.random.default_rng(1)

    def rep(right):
        y = rng.integers(0, 3, 40)
        return classification_report(y, np.where(rng.random(40) < right, y, (y + 1) % 3), ["a", "b", "c"])

    reports = {f"{a:.2f}": {"a": rep(0.5 + 0.4 * a), "b": rep(0.8 - 0.4 * a)} for a in (0.0, 1.0)}
    data = {"a": {"fingerprint": "aaa111", "source_root": "/d/FI"}, "b": {"fingerprint": "bbb222", "source_root": "/d/C"}}
    m = {"info": {"run": {"command": "generalisation", "model": "tiny", "finetuned": "ft", "holdout": 4, "seed": 0},
                  "data": data}, "kind": "generalisation", "rows": [], "reports": reports}
    (tmp_path / "gen").mkdir()
    (tmp_path / "gen" / "metrics.json").write_text(json.dumps(m))
    comp = compare_runs([tmp_path / "gen"])
    got = {(r["head"], r["protocol"][:9]): r for r in comp.rows}
    assert set(got) == {(f"WiSE-FT alpha {a}", p) for a in ("0.00", "1.00") for p in ("held-out ", "zero-shot")}
    b1 = got[("WiSE-FT alpha 1.00", "zero-shot")]
    assert b1["accuracy_mean"] == reports["1.00"]["b"]["accuracy"] and b1["data"] == "source:bbb222"
    assert b1["weighted_precision_mean"] == reports["1.00"]["b"]["weighted"]["precision"]
    # An older folder (generalisation.json only) is named with what to do.
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "generalisation.json").write_text("{}")
    with pytest.raises(ValueError, match="rerun `clip-heads generalisation`"):
        read_run(tmp_path / "old")


def test_a_mix_of_run_kinds_with_few_shot_and_a_finetune_cv(runs, tmp_path):
    """train-head CV, zero-shot, evaluate, few-shot and a fine-tune CV in one table, each on its data."""
    from clip_heads.evaluate import evaluate_head
    from clip_heads.fewshot import run_few_shot

    evaluate_head(runs / "lin-fit", runs / "t.h5", out_dir=tmp_path / "ev")  # the head on other data
    fs = run_few_shot(runs / "s.h5", tmp_path / "fs", heads=["linear", "gda"], shots="2,4", seeds=[1, 2, 3],
                      params={"linear": {"C": 1.0}, "gda": {"cv": 2}}, plots=False)
    page, _ = check_page(tmp_path / "fs")  # its page: the mean ± std table is metrics.json's
    assert {("table", "gda", "4", "mean"), ("table", "linear", "2", "std")} <= {tuple(n["key"]) for n in page.nums}
    folds = [classification_report(np.arange(9) % 3, (np.arange(9) + k) % 3 * (k < 2) + np.arange(9) % 3 * (k >= 2),
                                   ["a", "b", "c"]) for k in range(3)]
    (tmp_path / "ft").mkdir()
    (tmp_path / "ft" / "metrics.json").write_text(json.dumps(summarize_folds(folds)))
    (tmp_path / "ft" / "fold-00").mkdir()
    (tmp_path / "ft" / "fold-00" / "train_log.json").write_text(json.dumps(
        {"identity": {"model_id": "tiny", "source": "feedbeef", "seed": 0, "templates": ["a photo of a {}"]}}))
    comp = compare_runs([runs / "lin-s0", runs / "zs", tmp_path / "ev", tmp_path / "fs", tmp_path / "ft"],
                        out_dir=tmp_path / "cmp")
    got = {(r["head"], r["protocol"]): r for r in comp.rows}
    s_fp = json.loads((runs / "zs" / "metrics.json").read_text())["info"]["data"]["fingerprint"]
    t_fp = json.loads((tmp_path / "ev" / "metrics.json").read_text())["info"]["data"]["fingerprint"]
    assert got[("zero-shot", "test")]["data"] == s_fp and got[("linear", "test")]["data"] == t_fp != s_fp
    assert got[("finetune", "3-fold cv")]["data"] == "source:feedbeef"
    # A few-shot cell: mean ± std (ddof=0) over its seeds, from few_shot.csv, on the store's fingerprint.
    csv_rows = list(csv.DictReader(open(tmp_path / "fs" / "few_shot.csv")))
    for head in ("linear", "gda"):
        for k in ("2", "4"):
            acc = [float(r["accuracy"]) for r in csv_rows if r["head"] == head and r["shots"] == k]
            row = got[(head, f"few-shot {k}-shot")]
            assert len(acc) == 3 and row["n"] == 3 and row["over"] == "seeds" and row["data"] == s_fp
            assert row["accuracy_mean"] == pytest.approx(np.mean(acc), abs=1e-6)
            assert row["accuracy_std"] == pytest.approx(np.std(acc), abs=1e-6)
            assert fs.metrics["table"][head][k]["mean"] == pytest.approx(100 * np.mean(acc), abs=1e-4)
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "few-shot 4-shot" in md and "3 seeds" in md and s_fp[:12] in md and t_fp[:12] in md
    check_page(tmp_path / "cmp")
    # Few-shot cells on two stores are never merged into one row unasked.
    other = json.loads((tmp_path / "fs" / "metrics.json").read_text())
    other["info"]["data"]["fingerprint"] = t_fp
    (tmp_path / "fs-t").mkdir()
    (tmp_path / "fs-t" / "metrics.json").write_text(json.dumps(other))
    (tmp_path / "fs-t" / "few_shot.csv").write_text((tmp_path / "fs" / "few_shot.csv").read_text())
    with pytest.raises(MixedDataError, match="different"):
        compare_runs([tmp_path / "fs", tmp_path / "fs-t"], by="head")
    merged = compare_runs([tmp_path / "fs", tmp_path / "fs-t"], by="head", allow_mixed_data=True)
    assert all(r["mixed_data"] and r["n"] == 2 and r["over"] == "runs" for r in merged.rows)
