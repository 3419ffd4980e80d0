"""The numbers Bondielli & Passaro (2021) printed, and where they sit on our curves.

Transcribed from the paper's Tables 1-5: (precision, recall, F1) for the macro and weighted
averages, then accuracy. These are the paper's numbers (ViT-B/32, OpenAI ``clip``, the full FI
and CIFAR-100), never ours: every table and figure that shows one labels it "paper".
:mod:`clip_heads.reproduce` prints them beside its measurements, :mod:`clip_heads.plots` marks
them on a WiSE-FT curve.
"""
from __future__ import annotations

from typing import Any

__all__ = ["PAPER", "PAPER_CURVES", "paper_points", "paper_experiment"]

PAPER: dict[str, Any] = {
    "table1": {
        "cifar100": {"macro": (0.69, 0.62, 0.61), "weighted": (0.69, 0.62, 0.61), "accuracy": 0.62},
        "fi": {"macro": (0.46, 0.44, 0.42), "weighted": (0.52, 0.49, 0.48), "accuracy": 0.49},
    },
    "table2": {  # zero-shot per class on FI: precision, recall, F1
        "amusement": (0.80, 0.45, 0.58), "anger": (0.46, 0.37, 0.41), "awe": (0.38, 0.75, 0.50),
        "contentment": (0.61, 0.72, 0.66), "disgust": (0.36, 0.10, 0.16), "excitement": (0.45, 0.43, 0.44),
        "fear": (0.30, 0.49, 0.37), "sadness": (0.30, 0.20, 0.24),
    },
    "table3": {"macro": (0.64, 0.65, 0.64), "weighted": (0.70, 0.67, 0.68), "accuracy": 0.67},
    "table4": {"macro": (0.82, 0.81, 0.81), "weighted": (0.82, 0.82, 0.81), "accuracy": 0.81},
    "table5": {
        "emotion-clip-on-cifar100": {"macro": (0.57, 0.41, 0.40), "weighted": (0.57, 0.41, 0.40), "accuracy": 0.41},
        "cifar100-clip-on-fi": {"macro": (0.43, 0.30, 0.30), "weighted": (0.50, 0.39, 0.34), "accuracy": 0.39},
    },
}

# The generalisation experiments the paper published numbers for, and which of its tables
# sit on each curve: A -> (Table 1 key of A, CV table of A), B -> Table 1 key of B.
PAPER_CURVES = {
    "emotion-clip-on-cifar100": {"a": ("fi", "table3"), "b": "cifar100"},
    "cifar100-clip-on-fi": {"a": ("cifar100", "table4"), "b": "fi"},
}


def paper_points(experiment: str) -> list[dict[str, Any]]:
    """Bondielli & Passaro's accuracies on a generalisation curve (``emotion-clip-on-cifar100``
    or ``cifar100-clip-on-fi``): Table 5 (fine-tuned on A, zero-shot on B) at alpha 1 on B,
    Table 1 (zero-shot CLIP) at alpha 0 on A and B, and Table 3/4 (10-fold CV of the fine-tune
    on A) at alpha 1 on A. Each ``{alpha, side, accuracy, label}``."""
    if experiment not in PAPER_CURVES:
        raise ValueError(f"no paper numbers for experiment {experiment!r}; known: {sorted(PAPER_CURVES)}")
    (a1, acv), b1 = PAPER_CURVES[experiment]["a"], PAPER_CURVES[experiment]["b"]
    return [
        {"alpha": 1.0, "side": "b", "accuracy": PAPER["table5"][experiment]["accuracy"], "label": "paper Table 5"},
        {"alpha": 0.0, "side": "b", "accuracy": PAPER["table1"][b1]["accuracy"], "label": "paper Table 1"},
        {"alpha": 0.0, "side": "a", "accuracy": PAPER["table1"][a1]["accuracy"], "label": "paper Table 1"},
        {"alpha": 1.0, "side": "a", "accuracy": PAPER[acv]["accuracy"],
         "label": f"paper Table {acv[-1]} (10-fold CV)"},
    ]


def paper_experiment(a_format: str | None, b_format: str | None) -> str | None:
    """The paper's generalisation experiment a (fine-tuned on A, scored on B) run is, by the
    datasets' formats: FI then CIFAR-100 is ``emotion-clip-on-cifar100``, the reverse
    ``cifar100-clip-on-fi``; anything else None (the paper has no number for it)."""
    for name, sides in PAPER_CURVES.items():
        if (a_format, b_format) == (sides["a"][0], sides["b"]):
            return name
    return None
