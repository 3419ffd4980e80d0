"""index.html: parses, references only files that exist, and every number equals metrics.json."""
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from clip_heads.ablation import ablate_prompts
from clip_heads.calibration import calibration_report
from clip_heads.evaluate import run_zero_shot, train_head
from clip_heads.metrics import classification_report
from clip_heads.report_folder import provenance_from_metrics, render_folder
from clip_heads.report_page import metrics_table, write_index
from test_evaluate import blob_store


class Page(HTMLParser):
    """Every tag, every referenced file, and every number span with its key and text."""

    def __init__(self):
        super().__init__()
        self.tags, self.refs, self.imgs, self.nums, self.text = [], [], [], [], []
        self._num = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(a["src"])
        for k in ("src", "href"):
            if k in a:
                self.refs.append(a[k])
        if tag == "span" and a.get("class") == "num":
            self._num = {"key": json.loads(a["data-key"]), "value": a["data-value"], "text": ""}

    def handle_endtag(self, tag):
        if tag == "span" and self._num is not None:
            self.nums.append(self._num)
            self._num = None

    def handle_data(self, data):
        self.text.append(data)
        if self._num is not None:
            self._num["text"] += data


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text())
    page.close()
    return page


def lookup(d, key):
    for k in key:
        d = d[k]
    return d


def check_page(out: Path, digits: int = 3, source: str = "metrics.json") -> tuple[Page, dict]:
    page = parse(out / "index.html")
    metrics = json.loads((out / source).read_text())
    assert page.tags[0] == "html" and "script" not in page.tags and "link" not in page.tags
    for ref in page.refs:
        assert not ref.startswith(("http:", "https:", "//", "/")), ref  # nothing from the network, all relative
        assert (out / ref).is_file(), ref
    assert page.nums
    for n in page.nums:
        value = lookup(metrics, n["key"])
        assert repr(value) == n["value"], n
        shown = str(value) if isinstance(value, int) else f"{value:.{digits}f}"
        assert n["text"] == shown, n
    return page, metrics


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("page")
    path, *_ = blob_store(root / "s.h5", n=20, sep=2.5)
    return path


def test_train_head_cv_page(store, tmp_path):
    train_head("linear", store, tmp_path / "lin", cv=3, seed=4, plots=True)  # the command writes the pages
    index = tmp_path / "lin" / "index.html"
    page, metrics = check_page(tmp_path / "lin")
    imgs = page.imgs
    assert sorted(imgs) == sorted(f"cv/plots/{s}.png" for s in ("confusion_matrix", "per_class", "fold_spread",
                                                                "reliability"))
    assert all(Path(index.parent, r).with_suffix(".svg").name in {Path(x).name for x in page.refs} for r in imgs)
    assert "cv/index.html" in page.refs  # the section's own page, which shows the same figures
    sub, _ = check_page(tmp_path / "lin" / "cv")
    assert sorted(sub.imgs) == sorted(r[len("cv/"):] for r in imgs)
    keys = {tuple(n["key"]) for n in page.nums}
    cv = metrics["cv"]
    for c in cv["classes"]:  # the paper's table, every cell: mean and std per class, pooled below
        for m in ("precision", "recall", "f1"):
            assert {("cv", "mean", "per_class", c, m), ("cv", "std", "per_class", c, m),
                    ("cv", "pooled", "per_class", c, m)} <= keys
        assert ("cv", "mean", "per_class", c, "support") in keys
    for avg in ("macro", "weighted"):
        assert ("cv", "mean", avg, "f1") in keys and ("cv", "std", avg, "f1") in keys
    assert ("cv", "mean", "accuracy") in keys and ("cv", "pooled", "accuracy") in keys
    text = " ".join(page.text)
    for needle in ("Provenance", "linear", "seed", "3 (stratified, seed 4)", "declared:m", "scikit-learn",
                   metrics["info"]["data"]["fingerprint"], "Macro Avg.", "Weighted Avg.", "Accuracy"):
        assert needle in text, needle


def test_zero_shot_and_ablation_pages(store, tmp_path):
    run_zero_shot(store, out_dir=tmp_path / "zs", plots=True)
    page, metrics = check_page(tmp_path / "zs")
    assert {("accuracy",), ("calibration", "ece")} <= {tuple(n["key"]) for n in page.nums}
    assert sorted(page.imgs) == ["plots/confusion_matrix.png", "plots/per_class.png", "plots/reliability.png"]

    ablate_prompts(store, out_dir=tmp_path / "abl", plots=False)
    assert not (tmp_path / "abl" / "plots").exists() and "not drawn" in (tmp_path / "abl" / "index.html").read_text()
    render_folder(tmp_path / "abl", digits=4)  # drawn afterwards from metrics.json alone
    page, metrics = check_page(tmp_path / "abl", digits=4)
    keys = {tuple(n["key"]) for n in page.nums}
    assert {("rows", i, "accuracy") for i in range(len(metrics["rows"]))} <= keys
    assert ("rank1", "macro", "f1") in keys
    assert "plots/ablation.png" in page.imgs


def test_write_index_escapes_names_shows_calibration_and_checks_plots(tmp_path):
    classes = ["<b>joy</b>", "fear & loathing", 'say "hi"']
    y = np.array([0, 1, 2, 0, 1, 2, 0, 0])
    P = np.random.default_rng(0).dirichlet(np.ones(3), len(y))
    rep = classification_report(y, P.argmax(1), classes, P)
    rep["calibration"] = calibration_report(y, P, classes)
    (tmp_path / "metrics.json").write_text(json.dumps(rep))
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0\0\0\rIHDR" + (300).to_bytes(4, "big") * 2)
    write_index(tmp_path, {"command": "evaluate", "head": "mlp", "head parameters": {"hidden": 64}},
                rep, [tmp_path / "plots" / "x.png"])
    page, _ = check_page(tmp_path)
    text = "".join(page.text)
    assert all(c in text for c in classes)  # shown as text, not markup
    assert "b" not in [t for t in page.tags if t not in ("body",)]
    keys = {tuple(n["key"]) for n in page.nums}
    assert {("calibration", "ece"), ("calibration", "brier"), ("calibration", "nll")} <= keys
    assert 'style="width:192px"' in (tmp_path / "index.html").read_text()  # 300 px at 150 dpi = 2 in = 192 CSS px
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_index(tmp_path, {}, rep, [tmp_path / "plots" / "missing.png"])
    outside = tmp_path.parent / "elsewhere.png"
    outside.write_bytes(b"x")
    with pytest.raises(ValueError, match="not inside"):
        write_index(tmp_path, {}, rep, [outside])


def test_metrics_table_marks_undefined_cv_cells():
    from clip_heads.metrics import summarize_folds

    # Class c is never predicted and has no sample in fold 2: its precision is defined in no fold.
    f1 = classification_report([0, 1, 2, 2], [0, 1, 0, 1], ["a", "b", "c"])
    f2 = classification_report([0, 1, 0, 1], [0, 1, 1, 1], ["a", "b", "c"])
    html = metrics_table(summarize_folds([f1, f2]), ("cv",))
    assert "–" in html and '"per_class", "c", "recall"' in html.replace("&quot;", '"')
    assert '"per_class", "c", "precision"' not in html.replace("&quot;", '"')


def test_provenance_says_when_the_store_is_gone(store, tmp_path):
    rep = run_zero_shot(store)
    gone = json.loads(json.dumps(rep.metrics, default=str))
    gone["info"]["store"] = str(tmp_path / "moved.h5")
    gone["info"]["run"]["store"] = str(tmp_path / "moved.h5")
    prov = provenance_from_metrics(gone)
    assert "not read" in prov["store attributes"] and prov["command"] == "zero-shot"
    assert provenance_from_metrics(rep.metrics)["model weights hash"] == "declared:m"
    with pytest.raises(FileNotFoundError, match="no metrics.json"):
        render_folder(tmp_path)


def test_generalisation_page_with_the_paper_points(tmp_path):
    out = tmp_path / "emotion-clip-on-cifar100"  # reproduce's folder name: the paper's Table 5 applies
    out.mkdir()
    rows = [{"alpha": a, "a_accuracy": None, "a_macro_f1": None, "b_accuracy": 0.6 - 0.2 * a, "b_macro_f1": 0.5 - 0.2 * a}
            for a in (0.0, 0.5, 1.0)]
    (out / "generalisation.json").write_text(json.dumps({"settings": {"model": "tiny", "seed": 0}, "rows": rows}))
    render_folder(out)
    page, _ = check_page(out, source="generalisation.json")
    keys = {tuple(n["key"]) for n in page.nums}
    assert {("rows", i, "b_accuracy") for i in range(3)} <= keys
    assert page.imgs == ["plots/wise_ft.png"]


def test_many_classes_put_the_averages_first_and_keep_every_row(tmp_path):
    classes = [f"class_{i:03d}" for i in range(40)]
    y = np.arange(200) % 40
    rep = classification_report(y, (y + (np.arange(200) % 3 == 0)) % 40, classes)
    html = metrics_table(rep)
    assert html.index("Macro Avg.") < html.index("<details>") < html.index("class_000")
    page = Page()
    page.feed(html)
    keys = [tuple(n["key"]) for n in page.nums]
    assert all(("per_class", c, "f1") in keys for c in classes)
    assert keys.count(("accuracy",)) == 2  # in the summary and in the full table, the same value


def test_a_generalisation_of_fi_and_cifar100_gets_the_paper_points_whatever_its_folder(tmp_path, monkeypatch):
    from clip_heads import plots
    from clip_heads.paper import paper_experiment, paper_points

    assert paper_experiment("fi", "cifar100") == "emotion-clip-on-cifar100"
    assert paper_experiment("cifar100", "fi") == "cifar100-clip-on-fi"
    assert paper_experiment("folder", "cifar100") is None
    drawn = []
    real = plots.wise_ft_figure
    monkeypatch.setattr(plots, "wise_ft_figure", lambda result, points=None, **kw: drawn.append(points) or real(
        result, points, **kw))
    rows = [{"alpha": a, "a_accuracy": 0.5, "a_macro_f1": 0.4, "b_accuracy": 0.3, "b_macro_f1": 0.2} for a in (0.0, 1.0)]
    for name, fmt_a, fmt_b in (("mine", "cifar100", "fi"), ("other", "folder", "fi")):
        (tmp_path / name).mkdir()
        data = {"a": {"source_format": fmt_a, "source_root": "/d/A"}, "b": {"source_format": fmt_b, "source_root": "/d/B"}}
        (tmp_path / name / "metrics.json").write_text(json.dumps(
            {"info": {"run": {"command": "generalisation"}, "data": data}, "kind": "generalisation", "rows": rows}))
        render_folder(tmp_path / name)
        check_page(tmp_path / name)
    assert drawn == [paper_points("cifar100-clip-on-fi"), None]  # no paper number for a pair the paper did not run
