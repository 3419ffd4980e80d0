"""Augmented views: the recipe's boxes, seeded per image, different from each other and from the plain image."""
from __future__ import annotations

import numpy as np
from PIL import Image

from clip_heads.augment import RATIO, SCALE, augmented_views, recipe, view_boxes


def picture(w=64, h=48, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8))


def test_views_depend_on_key_view_and_seed_alone():
    a = view_boxes(64, 48, "img/1.jpg", 4, seed=0)
    assert a == view_boxes(64, 48, "img/1.jpg", 4, seed=0)  # a resumed encode draws the same
    assert a[:2] == view_boxes(64, 48, "img/1.jpg", 2, seed=0)  # view j does not depend on K
    assert a != view_boxes(64, 48, "img/2.jpg", 4, seed=0)
    assert a != view_boxes(64, 48, "img/1.jpg", 4, seed=1)
    assert len(set(a)) == 4


def test_boxes_follow_the_recipe():
    boxes = [b for i in range(200) for b in view_boxes(64, 48, f"k{i}", 3)]
    areas = np.array([(r - l) * (lo - t) for (l, t, r, lo), _ in boxes]) / (64 * 48)
    ratios = np.array([(r - l) / (lo - t) for (l, t, r, lo), _ in boxes])
    assert areas.min() >= SCALE[0] - 0.03 and areas.max() <= SCALE[1] + 1e-9
    assert ratios.min() >= RATIO[0] - 0.05 and ratios.max() <= RATIO[1] + 0.05
    assert all(0 <= l < r <= 64 and 0 <= t < lo <= 48 for (l, t, r, lo), _ in boxes)
    flips = np.mean([f for _, f in boxes])
    assert 0.4 < flips < 0.6
    assert recipe(4, 1)["views"] == 4 and recipe(4, 1)["scale"] == [0.5, 1.0]


def test_views_are_crops_of_the_image_resized_and_flipped():
    img = picture()
    views = augmented_views(img, "x", 3, size=30)
    assert all(v.size == (30, 30) and v.mode == "RGB" for v in views)
    arrays = [np.asarray(v, dtype=np.float64) for v in views]
    plain = np.asarray(img.resize((30, 30), Image.Resampling.BICUBIC), dtype=np.float64)
    assert all(np.abs(a - plain).mean() > 1 for a in arrays)
    assert np.abs(arrays[0] - arrays[1]).mean() > 1
    (box, flipped), = view_boxes(64, 48, "x", 1)
    ref = img.resize((30, 30), Image.Resampling.BICUBIC, box=box)
    ref = ref.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flipped else ref
    np.testing.assert_array_equal(np.asarray(views[0]), np.asarray(ref))
