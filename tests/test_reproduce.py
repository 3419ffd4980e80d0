"""`clip-heads reproduce` on a miniature FI and CIFAR-100 with the tiny CLIP: every table is
produced, and each 'ours' number equals the one the underlying command measures on its own."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from clip_heads.cli import main
from clip_heads.evaluate import run_zero_shot
from clip_heads.datasets import FI_CLASSES
from clip_heads.reproduce import PAPER
from test_demo import tiny_cifar_tarball


@pytest.fixture
def one_thread():
    """The fine-tunes here are tiny: one torch thread is faster, and the setting is restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def fi_folder(root, n=6, seed=0):
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 255, (len(FI_CLASSES), 3))
    for c, name in enumerate(FI_CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(n):
            arr = np.clip(colours[c] + rng.normal(0, 15, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / name / f"{i}.jpg")
    return root


@pytest.mark.parametrize("finetune", [False, True])
def test_reproduce_writes_every_table(tiny_clip, tmp_path, finetune, one_thread):
    fi = fi_folder(tmp_path / "FI")
    cifar, _ = tiny_cifar_tarball(tmp_path / "cifar.tar.gz", n_test=16, n_train=16)
    out = tmp_path / "repro"
    argv = ["-q", "reproduce", "--fi", fi, "--cifar", cifar, "--out", out, "--model", tiny_clip, "--cv", "2",
            "--heads", "linear,mlp", "--workers", "0", "--alphas", "0,1", "--ft-batch-size", "16"]
    res = CliRunner().invoke(main, [str(a) for a in argv] + ([] if finetune else ["--no-finetune"]))
    assert res.exit_code == 0, res.output
    text = (out / "tables.md").read_text()
    results = json.loads((out / "metrics.json").read_text())
    assert (out / "report.txt").read_text() == text
    for needle in ("Table 1", "Table 2", "Beyond the paper", "(paper)", "(ours)"):
        assert needle in text
    assert ("Table 5" in text) == finetune and ("Table 3" in text) == finetune
    # The paper's numbers appear as printed; ours equal an independent run of the same command.
    assert "| accuracy | " in text and f"{PAPER['table1']['fi']['accuracy']:.2f}" in text
    fi_zs = run_zero_shot(str(out / "stores" / "fi.h5"), prompt_set="bp-emotion").metrics
    assert results["zero_shot"]["fi"]["accuracy"] == pytest.approx(fi_zs["accuracy"])
    assert f"| accuracy | {results['zero_shot']['cifar100']['accuracy']:.2f} | 0.62 | {fi_zs['accuracy']:.2f} | 0.49 |" in text
    assert set(results["heads"]) == {"fi/linear", "fi/mlp", "cifar100/linear", "cifar100/mlp"}
    # What was measured is stated: split, image count, fingerprint; a small CIFAR-100 is flagged.
    from clip_heads.results import store_fingerprint

    data = results["data"]
    assert (data["fi"]["n_images"], data["cifar100"]["n_images"], data["cifar100"]["split"]) == (48, 32, "all")
    assert data["cifar100"]["fingerprint"] == store_fingerprint(out / "stores" / "cifar100.h5")
    assert "**Measured on:**" in text and f"fingerprint `{data['fi']['fingerprint'][:12]}`" in text
    assert "32 images, not the official 60,000" in text
    assert "Table 1: zero-shot (CIFAR-100: 32 images; FI: 48 images)" in text
    # The results layout's record on top, as in every command's folder.
    assert results["info"]["run"]["command"] == "reproduce" and results["info"]["data"] == data
    assert results["info"]["run"]["finetune"] == finetune and results["text"] == text
    # The "ours" cells are the rows of the comparison of every step (clip-heads compare).
    comp = {r["runs"]: r for r in results["comparison"]["rows"]}
    zs_row = comp[str(out / "zero-shot" / "fi")]
    assert zs_row["accuracy_mean"] == results["zero_shot"]["fi"]["accuracy"]
    assert (out / "comparison" / "comparison.csv").is_file() and "comparison.csv" in text
    lin = comp[str(out / "heads" / "fi-linear")]
    assert lin["n"] == 2 and lin["accuracy_mean"] == pytest.approx(results["heads"]["fi/linear"]["mean"]["accuracy"])
    assert f"| linear head | {lin['accuracy_mean']:.2f} | {lin['accuracy_std']:.2f} |" in text
    # The page: tables.md as HTML tables, a link to every step's page.
    from test_report_page import parse

    page = parse(out / "index.html")
    assert "table" in page.tags and all((out / ref).is_file() for ref in page.refs)
    assert {"comparison/index.html", "zero-shot/fi/index.html", "heads/fi-linear/index.html"} <= set(page.refs)
    if finetune:
        t5 = str(out / "table5" / "emotion-clip-on-cifar100")
        b1 = next(r for r in results["comparison"]["rows"] if r["runs"] == t5 and r["head"] == "WiSE-FT alpha 1.00"
                  and r["protocol"].startswith("zero-shot on B"))
        assert b1["accuracy_mean"] == results["table5"]["emotion-clip-on-cifar100"]["finetuned_b"]["accuracy"]
        rows = results["table5"]["emotion-clip-on-cifar100"]["rows"]
        assert [r["alpha"] for r in rows] == [0.0, 1.0]
        cv = results["finetune_cv"]["fi"]
        assert len(cv["folds"]) == 2 and cv["info"]["run"]["command"] == "finetune --cv"
        assert cv["mean"]["accuracy"] == pytest.approx(np.mean([f["accuracy"] for f in cv["folds"]]))
        assert f"| accuracy | {cv['mean']['accuracy']:.2f} | 0.67 |" in text
