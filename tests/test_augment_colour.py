"""The colour steps of byol_nb.augment against kornia's reference ops, and their per-sample draws."""

from __future__ import annotations

import math

import pytest
import torch
from kornia.color import rgb_to_grayscale
from kornia.enhance import adjust_hue as kornia_adjust_hue
from kornia.enhance import solarize
from kornia.filters import gaussian_blur2d

from byol_nb.augment import (AugmentConfig, TwoViewAugment, ViewRecipe, adjust_hue, colour_jitter, gaussian_blur,
                             random_blur, random_grayscale, random_solarize)


@pytest.fixture
def images() -> torch.Tensor:
    torch.manual_seed(0)
    batch = torch.rand(16, 3, 12, 12)
    batch[0] = 0.5  # gray: no hue at all
    batch[1, 1] = batch[1, 0]  # red and green tie for the largest channel
    batch[2, 2] = batch[2, 1]  # green and blue tie
    return batch


def test_adjust_hue_equals_kornia_for_every_shift(images):
    shifts = torch.linspace(-0.5, 0.5, images.shape[0])
    torch.testing.assert_close(adjust_hue(images, shifts), kornia_adjust_hue(images, shifts * 2 * math.pi),
                               atol=1e-5, rtol=0)


def test_adjust_hue_by_a_full_turn_changes_nothing(images):
    torch.testing.assert_close(adjust_hue(images, torch.ones(images.shape[0])), images, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kernel", [3, 5, 9])
def test_gaussian_blur_equals_kornia_with_a_sigma_per_sample(images, kernel):
    sigmas = torch.linspace(0.1, 3.0, images.shape[0])
    expected = gaussian_blur2d(images, (kernel, kernel), sigmas.unsqueeze(1).expand(-1, 2))
    torch.testing.assert_close(gaussian_blur(images, kernel, sigmas), expected, atol=1e-6, rtol=0)


def test_probability_zero_leaves_images_unchanged(images):
    torch.testing.assert_close(colour_jitter(images, (0.4, 0.4, 0.2, 0.1), p=0.0), images, atol=1e-5, rtol=0)
    assert torch.equal(random_grayscale(images, p=0.0), images)
    assert torch.equal(random_blur(images, 3, (0.1, 2.0), p=0.0), images)
    assert torch.equal(random_solarize(images, p=0.0), images)


def test_probability_one_applies_the_step_to_every_sample(images):
    torch.testing.assert_close(random_grayscale(images, p=1.0), rgb_to_grayscale(images).expand_as(images))
    torch.testing.assert_close(random_solarize(images, p=1.0), solarize(images, 0.5))


def test_blur_and_grayscale_choose_per_sample(images):
    torch.manual_seed(1)
    gray = random_grayscale(images, p=0.5)
    is_gray = (gray[:, 0] == gray[:, 1]).flatten(1).all(1) & (gray[:, 1] == gray[:, 2]).flatten(1).all(1)
    assert 0 < is_gray[1:].sum() < images.shape[0] - 1, "grayscale decided once per batch"
    blurred = random_blur(images, 3, (1.0, 2.0), p=0.5)
    changed = (blurred != images).flatten(1).any(1)
    assert 0 < changed[1:].sum() < images.shape[0] - 1, "blur decided once per batch"


def test_colour_jitter_draws_its_factors_per_sample():
    torch.manual_seed(0)
    same = torch.full((32, 3, 8, 8), 0.4)
    same[:, 0] = 0.7  # a colour, so that hue and saturation act too
    jittered = colour_jitter(same, (0.4, 0.4, 0.2, 0.1), p=1.0)
    assert jittered.min() >= 0 and jittered.max() <= 1
    # every sample had its own factors, so (nearly) every sample has its own colour
    assert jittered[:, :, 0, 0].unique(dim=0).shape[0] == 32


def test_views_are_float32_inside_bf16_autocast():
    """Training steps run under autocast; the views (and the blur's convolution) must not turn bf16."""
    augment = TwoViewAugment(AugmentConfig(16, views=(ViewRecipe(blur_p=1.0, solarize_p=0.0),
                                                      ViewRecipe(blur_p=0.5, solarize_p=0.5))))
    images = torch.randint(0, 256, (8, 3, 24, 24), dtype=torch.uint8)
    expected = augment(images, seed=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        views = augment(images, seed=0)
    for view, reference in zip(views, expected):
        assert view.images.dtype == torch.float32
        torch.testing.assert_close(view.images, reference.images)


@pytest.mark.cpp_compiler
def test_compiled_colour_steps_draw_the_same_views():
    """--compile runs the colour steps through torch.compile; the random draws stay outside the
    compiled code, so a seed gives the same views as the eager steps, in every jitter order."""
    config = AugmentConfig(16, jitter=(0.4, 0.4, 0.4, 0.5), views=(ViewRecipe(blur_p=1.0, solarize_p=0.0),
                                                                 ViewRecipe(blur_p=0.5, solarize_p=0.5)))
    eager, compiled = TwoViewAugment(config), TwoViewAugment(config, compiled=True)
    images = torch.randint(0, 256, (8, 3, 24, 24), dtype=torch.uint8)
    for seed in range(3):
        for view, reference in zip(compiled(images, seed=seed), eager(images, seed=seed)):
            torch.testing.assert_close(view.images, reference.images, atol=1e-5, rtol=0)
            assert torch.equal(view.boxes, reference.boxes) and torch.equal(view.flips, reference.flips)
