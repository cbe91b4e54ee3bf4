"""The colour steps of byol_nb.augment: kornia's ops, with parameters drawn per sample."""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from kornia.color import rgb_to_grayscale
from kornia.enhance import (
    adjust_brightness_accumulative,
    adjust_contrast_with_mean_subtraction,
    adjust_saturation_with_gray_subtraction,
    solarize,
)
from kornia.filters import gaussian_blur2d

from byol_nb.augment import (
    AugmentConfig,
    TwoViewAugment,
    ViewRecipe,
    colour_jitter,
    random_blur,
    random_grayscale,
    random_solarize,
)


@pytest.fixture
def images() -> torch.Tensor:
    torch.manual_seed(0)
    batch = torch.rand(16, 3, 12, 12)
    batch[0] = 0.5  # gray: no hue at all
    batch[1, 1] = batch[1, 0]  # red and green tie for the largest channel
    return batch


def test_hue_shift_is_in_turns_of_the_colour_wheel_as_in_torchvision(images):
    """The jitter's hue strength is torchvision's (a shift of at most 0.5 turn); kornia works in radians."""
    torch.manual_seed(3)
    jittered = colour_jitter(images, (0.0, 0.0, 0.0, 0.5), p=1.0)
    torch.manual_seed(3)
    torch.rand(3 + 1, len(images))  # the "jitter or not" draw, then brightness, contrast, saturation
    shifts = torch.empty(len(images)).uniform_(-0.5, 0.5)
    expected = torch.stack([TF.adjust_hue(image, float(shift)) for image, shift in zip(images, shifts)])
    torch.testing.assert_close(jittered, expected, atol=2e-3, rtol=0)


def test_jitter_applies_kornias_ops_in_the_given_order_with_a_factor_per_sample(images):
    strengths = (0.4, 0.4, 0.4, 0.0)
    torch.manual_seed(1)
    jittered = colour_jitter(images, strengths, p=1.0, order=[2, 0, 1, 3])
    torch.manual_seed(1)
    torch.rand(len(images))
    brightness, contrast, saturation = (torch.empty(len(images)).uniform_(0.6, 1.4) for _ in range(3))
    expected = adjust_saturation_with_gray_subtraction(images, saturation)
    expected = adjust_contrast_with_mean_subtraction(adjust_brightness_accumulative(expected, brightness), contrast)
    torch.testing.assert_close(jittered, expected)


def test_probability_zero_leaves_images_unchanged(images):
    torch.testing.assert_close(colour_jitter(images, (0.4, 0.4, 0.2, 0.1), p=0.0), images, atol=1e-5, rtol=0)
    assert torch.equal(random_grayscale(images, p=0.0), images)
    assert torch.equal(random_blur(images, 3, (0.1, 2.0), p=0.0), images)
    assert torch.equal(random_solarize(images, p=0.0), images)


def test_probability_one_applies_the_step_to_every_sample(images):
    torch.testing.assert_close(random_grayscale(images, p=1.0), rgb_to_grayscale(images).expand_as(images))
    torch.testing.assert_close(random_solarize(images, p=1.0), solarize(images, 0.5))
    blurred = random_blur(images, 5, (1.5, 1.5), p=1.0)
    torch.testing.assert_close(blurred, gaussian_blur2d(images, (5, 5), torch.full((len(images), 2), 1.5)))


def test_blur_grayscale_and_solarize_choose_per_sample(images):
    torch.manual_seed(1)
    for step in (lambda x: random_grayscale(x, p=0.5), lambda x: random_blur(x, 3, (1.0, 2.0), p=0.5),
                 lambda x: random_solarize(x, p=0.5)):
        changed = (step(images) != images).flatten(1).any(1)
        assert 0 < changed[1:].sum() < images.shape[0] - 1, "decided once per batch"


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
