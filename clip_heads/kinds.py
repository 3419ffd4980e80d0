"""What kind of data a dataset is, decided in one place: emotions, or everything else (objects).

The kind picks defaults: the prompt template sets an encode writes, the fine-tune's caption
templates and its number of epochs (Bondielli & Passaro: 3 on emotions, 1 on CIFAR-100).
"""
from __future__ import annotations

from typing import Sequence

from .datasets import EMOTION_FORMATS  # the formats that declare kind "emotions"
from .emotions import EKMAN_EMOTIONS, MIKELS_EMOTIONS, POLARITY

__all__ = ["EMOTION_FORMATS", "EMOTION_WORDS", "is_emotion_data"]

# Class names that make a dataset of any format (plain class folders, a CSV) emotion data:
# Mikels', Ekman's, polarity, and WEBEmo's primary emotions.
EMOTION_WORDS = frozenset([*MIKELS_EMOTIONS, *EKMAN_EMOTIONS, *POLARITY, "neutral", "love", "confusion"])


def is_emotion_data(format: str | None, classes: Sequence[str] | None = None) -> bool:
    """Whether a dataset is emotion data: its format is one of :data:`EMOTION_FORMATS`, or
    every one of its ``classes`` is an emotion word (:data:`EMOTION_WORDS`, any case)."""
    if format in EMOTION_FORMATS:
        return True
    return bool(classes) and {str(c).strip().lower() for c in classes} <= EMOTION_WORDS
