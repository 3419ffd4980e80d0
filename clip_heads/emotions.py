"""The emotion vocabularies that several dataset formats share, defined once.

Class lists are in alphabetical order, the order every file-backed source uses for its labels.
"""
from __future__ import annotations

# Mikels et al. (2005): four positive and four negative emotions. FI, EmoSet, ArtPhoto, Abstract.
MIKELS_EMOTIONS = ["amusement", "anger", "awe", "contentment", "disgust", "excitement", "fear", "sadness"]
# Ekman's six basic emotions. Emotion6 (plus "neutral" in its distributions), EmotionROI.
EKMAN_EMOTIONS = ["anger", "disgust", "fear", "joy", "sadness", "surprise"]
# Polarity, e.g. Twitter I, EmoSet's two-class grouping.
POLARITY = ["negative", "positive"]
MIKELS_POLARITY = {"amusement": "positive", "awe": "positive", "contentment": "positive", "excitement": "positive",
                   "anger": "negative", "disgust": "negative", "fear": "negative", "sadness": "negative"}
