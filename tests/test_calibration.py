"""ECE, Brier and NLL against hand computations and scikit-learn; a calibrated predictor's ECE."""
import math

import numpy as np
import pytest
from sklearn.metrics import brier_score_loss, log_loss

from clip_heads.calibration import calibration_report, format_calibration, reliability_bins

# Five samples, three classes; top-label confidences 0.70, 0.62, 0.50, 0.90, 0.72 fall in the
# 15-bin edges' interiors: bins 10, 9, 7, 13 and 10 (0.70 and 0.72 share one).
Y = np.array([0, 1, 2, 1, 0])
P = np.array([[0.70, 0.20, 0.10],
              [0.28, 0.62, 0.10],
              [0.50, 0.30, 0.20],
              [0.90, 0.05, 0.05],
              [0.72, 0.18, 0.10]])


def test_fixed_probabilities_against_a_hand_computation():
    cal = calibration_report(Y, P, classes=["a", "b", "c"])
    # correct: rows 0, 1, 4. Bin 10 holds rows 0 and 4: confidence 0.71, accuracy 1.
    assert cal["ece"] == pytest.approx((2 * abs(1 - 0.71) + abs(1 - 0.62) + abs(0 - 0.50) + abs(0 - 0.90)) / 5)
    assert cal["ece"] == pytest.approx(0.472)
    assert cal["mce"] == pytest.approx(0.90)
    brier_rows = [0.3**2 + 0.2**2 + 0.1**2,
                  0.28**2 + 0.38**2 + 0.1**2,
                  0.5**2 + 0.3**2 + 0.8**2,
                  0.9**2 + 0.95**2 + 0.05**2,
                  0.28**2 + 0.18**2 + 0.1**2]
    assert cal["brier"] == pytest.approx(sum(brier_rows) / 5)
    assert cal["brier"] == pytest.approx(0.63772)
    assert cal["nll"] == pytest.approx(-(math.log(0.7) + math.log(0.62) + math.log(0.2) + math.log(0.05)
                                         + math.log(0.72)) / 5)
    assert cal["accuracy"] == pytest.approx(3 / 5)
    assert cal["mean_confidence"] == pytest.approx((0.7 + 0.62 + 0.5 + 0.9 + 0.72) / 5)
    bins = cal["bins"]
    assert [b["count"] for b in bins] == [0] * 7 + [1, 0, 1, 2, 0, 0, 1, 0]
    assert bins[10]["confidence"] == pytest.approx(0.71) and bins[10]["accuracy"] == 1.0
    assert bins[7]["accuracy"] == 0.0 and bins[0]["confidence"] is None
    assert bins[0]["lower"] == 0 and bins[-1]["upper"] == 1 and len(bins) == cal["n_bins"] == 15
    assert "brier_binary" not in cal and cal["classes"] == ["a", "b", "c"]
    text = format_calibration(cal)
    assert "ECE              0.4720" in text and "Brier            0.6377" in text


def test_against_scikit_learn_multiclass_and_binary():
    rng = np.random.default_rng(0)
    P3 = rng.dirichlet(np.ones(3), size=200)
    y3 = rng.integers(0, 3, 200)
    cal = calibration_report(y3, P3)
    assert cal["nll"] == pytest.approx(log_loss(y3, P3, labels=[0, 1, 2]))
    assert cal["brier"] == pytest.approx(brier_score_loss(y3, P3, labels=[0, 1, 2], scale_by_half=False))

    P2 = rng.dirichlet(np.ones(2), size=200)
    y2 = rng.integers(0, 2, 200)
    cal = calibration_report(y2, P2)
    assert cal["brier_binary"] == pytest.approx(brier_score_loss(y2, P2[:, 1]))
    assert cal["brier"] == pytest.approx(2 * brier_score_loss(y2, P2[:, 1]))  # the stated convention
    assert cal["nll"] == pytest.approx(log_loss(y2, P2[:, 1]))


def test_perfectly_calibrated_predictor_has_small_ece_and_an_overconfident_one_does_not():
    rng = np.random.default_rng(1)
    n, C = 20000, 5
    P = rng.dirichlet(np.full(C, 0.7), size=n)
    # Draw each label from the predicted distribution itself: P(correct | confidence c) = c.
    y = (rng.random(n)[:, None] > np.cumsum(P, 1)).sum(1)
    assert calibration_report(y, P)["ece"] < 0.02
    sharp = P**4 / (P**4).sum(1, keepdims=True)  # the same ranking, overconfident
    cal = calibration_report(y, sharp)
    assert cal["ece"] > 0.1
    assert cal["mean_confidence"] > cal["accuracy"] + 0.1


def test_bin_edges_are_left_open_right_closed():
    bins = reliability_bins(np.array([0.0, 0.5, 0.5 + 1e-9, 1.0]), np.array([1, 0, 1, 1]), n_bins=2)
    assert [b["count"] for b in bins] == [2, 2]  # 0 and 0.5 in (0, 0.5]; the rest in (0.5, 1]
    assert bins[0]["accuracy"] == 0.5


@pytest.mark.parametrize("y, proba, match", [
    (Y, P * 2, "sum to 1"),
    (Y, np.log(P), "negative"),
    (Y[:3], P, "n_samples"),
    (np.array([0, 1, 2, 3, 0]), P, "out of range"),
    (Y.astype(float), P, "integers"),
    (np.array([], np.int64), np.zeros((0, 3)), "no samples"),
])
def test_bad_input_is_refused_with_a_message(y, proba, match):
    with pytest.raises(ValueError, match=match):
        calibration_report(y, proba)
