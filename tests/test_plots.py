"""Figures: files of the stated size, readable 100-class labels, and the data drawn equal to the data given."""
import itertools
import subprocess
import sys
from xml.etree import ElementTree

import numpy as np
import pytest
from matplotlib.container import BarContainer, ErrorbarContainer
from PIL import Image

from clip_heads import plots
from clip_heads.calibration import calibration_report
from clip_heads.metrics import classification_report, soft_label_report, summarize_folds
from clip_heads.reproduce import PAPER

EMOTIONS = ["anger", "joy", "fear", "sadness"]
# CIFAR-100-like names: short and long ones, underscores, up to 20 characters.
NAMES_100 = [("sweet_pepper_" if i % 7 == 0 else "aquarium_fish_" if i % 5 == 0 else "ray_" if i % 3 else "tree_")
             + f"{i:02d}" for i in range(100)]


def noisy(C, n, names, seed=0, right=0.6):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, n)
    p = np.where(rng.random(n) < right, y, rng.integers(0, C, n))
    return y, p, classification_report(y, p, names)


def check_png(path, fig):
    """A valid PNG whose pixel size is the figure's size in inches times 150."""
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        want = tuple(v * plots.DPI for v in fig.get_size_inches())
        assert im.size == want, (path, im.size, want)  # whole pixels: sizes are whole half inches
    root = ElementTree.parse(path.with_suffix(".svg")).getroot()
    assert root.tag.endswith("svg")


def label_overlaps(fig, labels):
    """Pairs of tick labels whose drawn boxes overlap (measured by matplotlib's renderer)."""
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in labels if t.get_text()]
    return [(i, j) for (i, a), (j, b) in itertools.combinations(enumerate(boxes), 2)
            if min(a.x1, b.x1) - max(a.x0, b.x0) > 0.5 and min(a.y1, b.y1) - max(a.y0, b.y0) > 0.5]


def inside(fig, labels):
    renderer = fig.canvas.get_renderer()
    fb = fig.bbox
    return all(fb.x0 - 1 <= b.x0 and b.x1 <= fb.x1 + 1 and fb.y0 - 1 <= b.y0 and b.y1 <= fb.y1 + 1
               for b in (t.get_window_extent(renderer) for t in labels))


def test_every_plot_of_a_4_class_cv_run(tmp_path):
    folds = [noisy(4, 60, EMOTIONS, seed=s)[2] for s in range(5)]
    y, p, pooled = noisy(4, 300, EMOTIONS, seed=9)
    cv = summarize_folds(folds, pooled)
    P = np.random.default_rng(0).dirichlet(np.ones(4), len(y))
    cal = calibration_report(y, P)
    rng = np.random.default_rng(1)
    soft = plots.soft_label_breakdown(rng.dirichlet(np.ones(4), 80), rng.dirichlet(np.ones(4), 80), EMOTIONS, EMOTIONS)
    paths = plots.write_run_plots(cv, tmp_path / "plots", calibration=cal, soft=soft, title="mlp, 5-fold CV")
    stems = ["confusion_matrix", "per_class", "fold_spread", "reliability", "soft_labels"]
    assert sorted(p.name for p in paths) == sorted(f"{s}.{x}" for s in stems for x in ("png", "svg"))
    builders = {"confusion_matrix": lambda: plots.confusion_matrix_figure(cv), "per_class": lambda: plots.per_class_figure(cv),
                "fold_spread": lambda: plots.fold_spread_figure(cv), "reliability": lambda: plots.reliability_figure(cal),
                "soft_labels": lambda: plots.soft_label_figure(soft)}
    for s in stems:
        check_png(tmp_path / "plots" / f"{s}.png", builders[s]())


def test_confusion_matrix_colours_are_row_normalised_and_cells_are_counts():
    y = np.array([0, 0, 0, 1, 1, 3, 3, 3, 3])  # class 2 has no true sample
    p = np.array([0, 1, 2, 1, 1, 3, 0, 3, 2])
    rep = classification_report(y, p, EMOTIONS)
    fig = plots.confusion_matrix_figure(rep)
    ax = fig.axes[0]
    shown = ax.images[0].get_array()
    cm = np.array(rep["confusion_matrix"], float)
    expected = cm / cm.sum(1, keepdims=True).clip(min=1)
    assert np.allclose(np.ma.filled(shown, np.nan)[[0, 1, 3]], expected[[0, 1, 3]])
    assert np.ma.getmaskarray(shown)[2].all() or np.isnan(np.ma.filled(shown, np.nan)[2]).all()
    texts = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
    assert texts == {(i, j): str(int(cm[i, j])) for i in range(4) for j in range(4)}
    assert [t.get_text() for t in ax.get_yticklabels()] == EMOTIONS
    assert [t.get_text() for t in ax.get_xticklabels()] == EMOTIONS


def test_100_class_confusion_matrix_has_no_overlapping_labels(tmp_path):
    _, _, rep = noisy(100, 3000, NAMES_100)
    fig = plots.confusion_matrix_figure(rep)
    fig.draw_without_rendering()
    ax = fig.axes[0]
    assert not ax.texts  # past 30 classes the cells stay bare
    for labels in (ax.get_xticklabels(), ax.get_yticklabels()):
        assert len(labels) == 100 and [t.get_text() for t in labels] == NAMES_100
        assert label_overlaps(fig, labels) == []
        assert inside(fig, labels)
    assert label_overlaps(fig, ax.get_xticklabels() + ax.get_yticklabels()) == []
    # The same check does catch crowding: squeezed to 6 inches, the labels collide.
    small = plots.confusion_matrix_figure(rep)
    small.set_size_inches(6, 6)
    small.draw_without_rendering()
    assert len(label_overlaps(small, small.axes[0].get_yticklabels())) > 50
    paths = plots.save_figure(fig, tmp_path, "cm100")
    check_png(paths[0], fig)
    with Image.open(paths[0]) as im:
        assert 1500 < im.size[0] < 4000  # grown for 100 classes, within reason


def test_100_class_per_class_bars(tmp_path):
    _, _, rep = noisy(100, 3000, NAMES_100)
    fig = plots.per_class_figure(rep)
    fig.draw_without_rendering()
    ax = fig.axes[0]
    labels = ax.get_yticklabels()
    assert [t.get_text() for t in labels] == NAMES_100
    assert label_overlaps(fig, labels) == [] and inside(fig, labels)
    f1 = [b.get_width() for b in ax.containers[2]]
    assert np.allclose(f1, [rep["per_class"][c]["f1"] for c in NAMES_100])
    support = [b.get_width() for b in fig.axes[1].patches]
    assert support == [rep["per_class"][c]["support"] for c in NAMES_100]
    check_png(plots.save_figure(fig, tmp_path, "pc100")[0], fig)


def test_cv_per_class_bars_are_means_with_std_and_fold_spread_is_the_folds():
    folds = [noisy(4, 40, EMOTIONS, seed=s)[2] for s in range(4)]
    cv = summarize_folds(folds)
    fig = plots.per_class_figure(cv)
    bars = [c for c in fig.axes[0].containers if isinstance(c, BarContainer)]
    errs = [c for c in fig.axes[0].containers if isinstance(c, ErrorbarContainer)]
    assert np.allclose([b.get_width() for b in bars[1]], [cv["mean"]["per_class"][c]["recall"] for c in EMOTIONS])
    whisker = errs[1].lines[2][0].get_segments()  # recall's error bars: mean -/+ std
    assert np.allclose([seg[1][0] - seg[0][0] for seg in whisker],
                       [2 * cv["std"]["per_class"][c]["recall"] for c in EMOTIONS])
    spread = plots.fold_spread_figure(cv)
    points = spread.axes[0].collections[0].get_offsets()  # accuracy's strip
    assert sorted(points[:, 1]) == sorted(f["accuracy"] for f in folds)
    with pytest.raises(ValueError, match="CV report"):
        plots.fold_spread_figure(folds[0])


def test_ablation_bars_follow_the_ranked_rows():
    rows = [{"prompt_set": "s", "template": f"a photo of a {{}} #{i}", "template_id": i, "accuracy": 0.9 - 0.1 * i,
             "macro_f1": 0.8 - 0.1 * i, "rank": i + 1} for i in range(3)]
    rows.append({"prompt_set": "s", "template": "(ensemble of 3 templates)", "template_id": None, "accuracy": 0.5,
                 "macro_f1": 0.45, "rank": 4})
    fig = plots.ablation_figure(list(reversed(rows)))  # the figure orders by rank itself
    acc, mf1 = fig.axes[0], fig.axes[1]
    assert [b.get_width() for b in acc.patches] == [r["accuracy"] for r in rows]
    assert [b.get_width() for b in mf1.patches[:4]] == [r["macro_f1"] for r in rows]
    colours = {tuple(b.get_facecolor()) for b in acc.patches}
    assert len(colours) == 2 and acc.patches[3].get_facecolor() != acc.patches[0].get_facecolor()
    assert acc.get_yticklabels()[0].get_text() == "s: a photo of a {} #0"


def test_wise_ft_curve_and_the_paper_points():
    rows = [{"alpha": a, "a_accuracy": 0.5 + 0.2 * a, "a_macro_f1": 0.4 + 0.2 * a, "b_accuracy": 0.6 - 0.2 * a,
             "b_macro_f1": 0.5 - 0.2 * a} for a in (1.0, 0.0, 0.5)]
    points = plots.paper_points("emotion-clip-on-cifar100")
    assert {(p["alpha"], p["side"], p["accuracy"]) for p in points} == {
        (1.0, "b", PAPER["table5"]["emotion-clip-on-cifar100"]["accuracy"]), (0.0, "b", PAPER["table1"]["cifar100"]["accuracy"]),
        (0.0, "a", PAPER["table1"]["fi"]["accuracy"]), (1.0, "a", PAPER["table3"]["accuracy"])}
    fig = plots.wise_ft_figure({"rows": rows}, points)
    ax = fig.axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert list(lines["B: accuracy"].get_xdata()) == [0.0, 0.5, 1.0]
    assert np.allclose(lines["B: accuracy"].get_ydata(), [0.6, 0.5, 0.4])
    assert np.allclose(lines["A: macro-F1"].get_ydata(), [0.4, 0.5, 0.6])
    stars = np.concatenate([c.get_offsets() for c in ax.collections])
    assert {tuple(s) for s in stars.tolist()} == {(p["alpha"], p["accuracy"]) for p in points}
    # No held-out A (B&P's Table 5 setting): only B is drawn.
    no_a = [dict(r, a_accuracy=None, a_macro_f1=None) for r in rows]
    ax = plots.wise_ft_figure({"rows": no_a}, points).axes[0]
    assert {ln.get_label() for ln in ax.get_lines()} == {"B: accuracy", "B: macro-F1"}
    stars = np.concatenate([c.get_offsets() for c in ax.collections])
    assert {tuple(s) for s in stars.tolist()} == {(p["alpha"], p["accuracy"]) for p in points if p["side"] == "b"}
    with pytest.raises(ValueError, match="known"):
        plots.paper_points("fi-on-emotion6")


def test_soft_label_breakdown_groups_by_dominant_vote_with_the_metrics_definitions():
    # Vote columns in another order and with a column the head lacks (neutral).
    true_cols = ["joy", "neutral", "anger", "fear"]
    pred_cols = ["anger", "joy", "fear"]
    T = np.array([[0.7, 0.1, 0.1, 0.1], [0.6, 0.2, 0.2, 0.0], [0.1, 0.1, 0.8, 0.0], [0.0, 1.0, 0.0, 0.0]])
    Q = np.array([[0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.9, 0.05, 0.05], [0.3, 0.3, 0.4]])
    b = plots.soft_label_breakdown(T, Q, true_cols, pred_cols)
    assert b["overall"] == soft_label_report(T, Q, true_cols, pred_cols)
    assert b["columns"] == ["anger", "joy", "fear"]
    # Row 3 has votes only on neutral: no mass on the shared columns, left out as in metrics.
    assert {c: g["n"] for c, g in b["per_class"].items()} == {"joy": 2, "anger": 1}
    joy = soft_label_report(T[:2][:, [2, 0, 3]], Q[:2])
    assert b["per_class"]["joy"]["kl"] == pytest.approx(joy["kl"])
    assert b["per_class"]["joy"]["top1_agreement"] == 0.5  # row 0 predicted joy, row 1 anger
    assert b["per_class"]["anger"]["top1_agreement"] == 1.0
    shared = T[:3][:, [2, 0, 3]]
    assert np.allclose(b["mean_true"], (shared / shared.sum(1, keepdims=True)).mean(0))


def test_import_clip_heads_does_not_import_matplotlib():
    code = ("import sys, clip_heads, clip_heads.plots, clip_heads.calibration, clip_heads.report_page, "
            "clip_heads.report_folder, clip_heads.results, clip_heads.compare, clip_heads.cli; "
            "print('matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_reliability_gap_is_hatched_not_filled_so_an_underconfident_bar_reads_at_its_height():
    from clip_heads.calibration import calibration_report

    rng = np.random.default_rng(0)
    P = rng.dirichlet(np.ones(4) * 3, 400)  # flat probabilities: confidence ~0.5
    y = P.argmax(1)  # ...and always right: underconfident, the gap lies over the accuracy bars
    cal = calibration_report(y, P)
    fig = plots.reliability_figure(cal)
    ax = fig.axes[0]
    bars = [p for p in ax.patches if not p.get_hatch()]
    gaps = [p for p in ax.patches if p.get_hatch()]
    full = [b for b in cal["bins"] if b["count"]]
    assert len(bars) == len(gaps) == len(full)
    assert [round(p.get_height(), 9) for p in bars] == [round(b["accuracy"], 9) for b in full] == [1.0] * len(full)
    assert all(p.get_facecolor()[3] == 0 for p in gaps)  # no tint over the accuracy bar
    for p, b in zip(gaps, full, strict=True):
        assert (p.get_y(), p.get_y() + p.get_height()) == pytest.approx((b["confidence"], b["accuracy"]))
