"""The built-in dataset: deterministic from its seed, masks that match the labels, and shapes whose
size and position stay within the ranges the two views can teach a network to ignore."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from byol_nb.shapes import CENTRE_JITTER, RADIUS_RANGE, SHAPE_CLASSES, generate_shapes, mask_path, render_shape_image


def _pixels(root, split="train"):
    return {p.relative_to(root): np.asarray(Image.open(p)) for p in sorted((root / split).rglob("*.png"))}


def test_generation_is_deterministic_from_the_seed(tmp_path):
    first = generate_shapes(tmp_path / "a", train_per_class=3, test_per_class=1, size=32, seed=4)
    again = generate_shapes(tmp_path / "b", train_per_class=3, test_per_class=1, size=32, seed=4)
    other = generate_shapes(tmp_path / "c", train_per_class=3, test_per_class=1, size=32, seed=5)
    a, b, c = _pixels(first), _pixels(again), _pixels(other)
    assert a.keys() == b.keys() == c.keys() and len(a) == 3 * len(SHAPE_CLASSES)
    assert all(np.array_equal(a[name], b[name]) for name in a)
    assert not any(np.array_equal(a[name], c[name]) for name in a)


def test_each_mask_marks_its_own_class(tiny_shapes):
    for label, name in enumerate(SHAPE_CLASSES):
        for image in (tiny_shapes / "train" / name).iterdir():
            mask = np.asarray(Image.open(mask_path(image)))
            assert set(np.unique(mask)) == {0, 1 + label}, image


@pytest.mark.parametrize("label", range(len(SHAPE_CLASSES)), ids=SHAPE_CLASSES)
def test_size_and_position_stay_within_their_ranges(label):
    """Every shape has its centroid at its centre and spans at most twice its radius (the cross's
    arm ends stand 5% beyond it): both are read back from the masks of 60 samples."""
    size, rng = 128, np.random.default_rng(label)
    lowest, highest = RADIUS_RANGE
    for _ in range(60):
        _, mask = render_shape_image(rng, label, size)
        ys, xs = np.nonzero(mask)
        centre = np.array([xs.mean(), ys.mean()]) / size
        assert np.abs(centre - 0.5).max() <= CENTRE_JITTER + 2 / size, centre
        extent = max(xs.max() - xs.min(), ys.max() - ys.min()) / size
        assert extent <= 2 * 1.06 * highest + 2 / size, extent
        if SHAPE_CLASSES[label] == "circle":  # area pi r^2 with r in the range
            radius = math.sqrt(len(xs) / math.pi) / size
            assert lowest - 1 / size <= radius <= highest + 1 / size, radius
