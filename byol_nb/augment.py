"""BYOL's two-view augmentation, batched on the training device, with per-sample parameters.

Every sample draws its own crop, flip, jitter, grayscale, blur and solarize decisions (one draw per
*batch* is a known bug: the two views of every image would then differ in the same way). The colour
steps are kornia's functional ops (``kornia.enhance``, ``kornia.filters``), which take one parameter
per sample. The crop and flip are done here with ``F.affine_grid`` and ``grid_sample`` so that we
know exactly where each view came from: :class:`View` carries, per sample, the crop box in the
original image's normalised coordinates and the flip flag, which PixPro needs to find matching
pixels. Choices "with probability p" are made per sample with ``torch.where`` on the whole batch,
so that no step depends on how many samples were chosen (no data-dependent shapes, no reads of
device values on the host).

Coordinates: a box is ``(x0, y0, x1, y1)`` with ``(0, 0)`` the top-left *corner* of the original
image and ``(1, 1)`` its bottom-right corner (for a photo letterboxed in a square, of the square: the
photo's own box there bounds the crops, see :func:`sample_crop_boxes`). A view pixel at normalised
position ``(u, v)`` in ``[0, 1]^2`` shows the original point ``(x0 + u (x1 - x0), y0 + v (y1 - y0))``,
or with the flip ``(x1 - u (x1 - x0), ...)``.
"""

from __future__ import annotations

import functools
import math
import random
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Iterator, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from kornia.color import rgb_to_grayscale
from kornia.enhance import (
    adjust_brightness_accumulative,
    adjust_contrast_with_mean_subtraction,
    adjust_hue,
    adjust_saturation_with_gray_subtraction,
)
from kornia.filters import filter2d_separable, get_gaussian_kernel1d
from torch import Tensor, nn

from byol_nb.config import BYOL_JITTER, LOCAL_MIN_SCALE, TrainConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Added to a step's seed for its local (multi-crop) views: a stream apart from the two main views'.
LOCAL_SEED_OFFSET = 7_777_777


class View(NamedTuple):
    """One augmented view of a batch: images plus where each came from."""

    images: Tensor  # (B, 3, S, S) float, normalised with ImageNet statistics
    boxes: Tensor  # (B, 4) float, (x0, y0, x1, y1) in the original image's [0, 1] coordinates
    flips: Tensor  # (B,) bool, True where the view is mirrored left-right


@dataclass(frozen=True)
class ViewRecipe:
    """The probabilities that differ between BYOL's two views."""

    blur_p: float
    solarize_p: float


# BYOL's two views (Grill et al. 2020, table 6): the first always blurred, the second rarely blurred
# and sometimes solarized; everything else is drawn alike for both.
BYOL_VIEWS = (ViewRecipe(blur_p=1.0, solarize_p=0.0), ViewRecipe(blur_p=0.1, solarize_p=0.2))


@dataclass(frozen=True)
class AugmentConfig:
    """BYOL's recipe (Grill et al. 2020, table 6); the blur is scaled to the image size."""

    image_size: int
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter: tuple[float, float, float, float] = BYOL_JITTER
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    views: tuple[ViewRecipe, ViewRecipe] = BYOL_VIEWS
    # Multi-crop (Caron et al. 2020): extra small views of small crops, coloured like the second view.
    local_views: int = 0
    local_size: int = 16
    local_crop_scale: tuple[float, float] = (LOCAL_MIN_SCALE, 0.35)

    @classmethod
    def from_train_config(cls, config: TrainConfig) -> "AugmentConfig":
        """A training run's views: BYOL's recipe with the run's crops, jitter and grayscale, and its
        multi-crop views cut from ``LOCAL_MIN_SCALE`` up to the main views' smallest crop; without
        blur (``--no-blur``, solo-learn's CIFAR recipe) neither view is blurred."""
        blur = 1.0 if config.blur else 0.0
        return cls(config.image_size, crop_scale=(config.crop_min_scale, 1.0), jitter=tuple(config.jitter),
                   grayscale_p=config.grayscale_p, views=tuple(replace(v, blur_p=blur * v.blur_p) for v in BYOL_VIEWS),
                   local_views=config.local_views, local_size=config.local_view_size,
                   local_crop_scale=(LOCAL_MIN_SCALE, config.crop_min_scale))


def blur_kernel(size: int) -> int:
    """The blur's kernel for a view of ``size`` px: about 10% of its side, odd, at least 3 (23 at
    224 px, as in the paper)."""
    return max(3, int(size * 0.1) // 2 * 2 + 1)


def blur_sigma(size: int) -> tuple[float, float]:
    """The blur's sigma range for a view of ``size`` px: (0.1, 2.0) px at 224 px, scaled with the
    view so that small images are not smeared."""
    scale = size / 224
    return max(0.1 * scale, 0.05), max(2.0 * scale, 0.1)


def sample_crop_boxes(batch: int, scale: tuple[float, float], ratio: tuple[float, float],
                      device: torch.device | str = "cpu", tries: int = 10, content: Tensor | None = None) -> Tensor:
    """RandomResizedCrop's box sampler, vectorised over the batch.

    Like torchvision, it tries ``tries`` (area, aspect) pairs per sample and keeps the first that
    fits in the image; a sample with none falls back to the largest centred box of an allowed aspect.
    ``content`` (B, 4) says where each photo sits in its square when photos are letterboxed
    (:func:`byol_nb.data.load_photo`): the area is then a fraction of the photo's, and the box stays
    inside the photo, as torchvision's sampler run on the original photo would have it. Without it,
    every image fills its square.
    """
    if content is None:  # the whole square; filled on the device (a tensor of host values would be a copy there)
        content = torch.cat([torch.zeros(batch, 2, device=device), torch.ones(batch, 2, device=device)], dim=1)
    left, top, right, bottom = content.unbind(1)
    photo_w, photo_h = right - left, bottom - top
    area = torch.empty(batch, tries, device=device).uniform_(*scale) * (photo_w * photo_h)[:, None]
    log_ratio = torch.empty(batch, tries, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    aspect = log_ratio.exp()
    width, height = (area * aspect).sqrt(), (area / aspect).sqrt()
    fits = (width <= photo_w[:, None]) & (height <= photo_h[:, None])
    found = fits.any(1)
    first = fits.float().argmax(dim=1, keepdim=True)
    photo_aspect = photo_w / photo_h
    fallback_w = torch.where(photo_aspect > ratio[1], photo_h * ratio[1], photo_w)
    fallback_h = torch.where(photo_aspect < ratio[0], photo_w / ratio[0], photo_h)
    width = torch.where(found, width.gather(1, first).squeeze(1), fallback_w)
    height = torch.where(found, height.gather(1, first).squeeze(1), fallback_h)
    x_at, y_at = torch.rand(batch, device=device), torch.rand(batch, device=device)
    x0 = left + torch.where(found, x_at, 0.5) * (photo_w - width)
    y0 = top + torch.where(found, y_at, 0.5) * (photo_h - height)
    return torch.stack([x0, y0, x0 + width, y0 + height], dim=1)


def resized_crop(images: Tensor, boxes: Tensor, flips: Tensor, size: int) -> Tensor:
    """Crop every image to its own box, mirror where ``flips``, resize to ``size`` (bilinear).

    ``grid_sample`` reads the original at the grid's coordinates in [-1, 1]: the view's coordinate
    ``u`` maps to ``(x1 - x0) u + (x0 + x1 - 1)`` (``u`` negated under a flip), likewise for y,
    which is one affine matrix per sample.
    """
    x0, y0, x1, y1 = boxes.unbind(1)
    sign = 1 - 2 * flips.to(boxes.dtype)
    zero = torch.zeros_like(x0)
    theta = torch.stack([torch.stack([(x1 - x0) * sign, zero, x0 + x1 - 1], dim=1),
                         torch.stack([zero, y1 - y0, y0 + y1 - 1], dim=1)], dim=1)  # (B, 2, 3)
    grid = F.affine_grid(theta.to(images.dtype), [images.shape[0], images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _chosen(batch: int, p: float, device: torch.device) -> Tensor:
    """Per-sample Bernoulli(p) decisions, (batch,) bool."""
    return torch.rand(batch, device=device) < p


def _uniform(batch: int, low: float, high: float, device: torch.device) -> Tensor:
    return torch.empty(batch, device=device).uniform_(low, high)


def _per_sample(chosen: Tensor, changed: Tensor, images: Tensor) -> Tensor:
    """``changed`` where ``chosen`` (B,) is True, ``images`` elsewhere."""
    return torch.where(chosen.view(-1, 1, 1, 1), changed, images)


def _turn_hue(images: Tensor, turns: Tensor) -> Tensor:
    """kornia's ``adjust_hue`` with the shift in turns of the colour wheel (torchvision's unit)."""
    return adjust_hue(images, 2 * math.pi * turns)


def colour_jitter(images: Tensor, strengths: tuple[float, float, float, float], p: float,
                  order: Sequence[int] | None = None) -> Tensor:
    """torchvision's ColorJitter with probability ``p``, parameters drawn per sample.

    Brightness, contrast and saturation factors are uniform in ``[1 - s, 1 + s]``, the hue shift in
    ``[-h, h]`` turns; samples that skip the jitter get neutral factors. The four steps run in
    ``order`` (indices into brightness, contrast, saturation, hue), or in a random order drawn here.
    """
    batch, device = images.shape[0], images.device
    on = _chosen(batch, p, device)

    def factors(strength: float, neutral: float) -> Tensor:
        return torch.where(on, _uniform(batch, neutral - strength, neutral + strength, device), neutral)

    brightness, contrast, saturation, hue = strengths
    steps = [(brightness, adjust_brightness_accumulative, factors(brightness, 1.0)),
             (contrast, adjust_contrast_with_mean_subtraction, factors(contrast, 1.0)),
             (saturation, adjust_saturation_with_gray_subtraction, factors(saturation, 1.0)),
             (hue, _turn_hue, factors(hue, 0.0))]
    for index in order if order is not None else torch.randperm(4).tolist():
        strength, adjust, values = steps[index]
        if strength > 0:
            images = adjust(images, values)
    return images


def random_grayscale(images: Tensor, p: float) -> Tensor:
    """Each sample becomes gray (0.299 R + 0.587 G + 0.114 B in all channels) with probability ``p``."""
    chosen = _chosen(images.shape[0], p, images.device)
    return _per_sample(chosen, rgb_to_grayscale(images).expand_as(images), images)


def random_blur(images: Tensor, kernel: int, sigma: tuple[float, float], p: float) -> Tensor:
    """Gaussian blur (reflected border) with probability ``p``, sigma uniform in ``sigma`` per sample.

    kornia's separable filter with one kernel per sample (what ``kornia.filters.gaussian_blur2d``
    computes, without its check that every sigma is positive, which reads them on the host).
    """
    batch = images.shape[0]
    chosen = _chosen(batch, p, images.device)
    sigmas = _uniform(batch, *sigma, images.device)
    weights = get_gaussian_kernel1d(kernel, sigmas.unsqueeze(1))  # (B, kernel)
    blurred = filter2d_separable(images, weights, weights, border_type="reflect")
    return _per_sample(chosen, blurred, images)


def random_solarize(images: Tensor, p: float) -> Tensor:
    """Invert the pixels at or above 0.5 (``x -> 1 - x``) with probability ``p``, per sample.

    kornia's ``solarize`` computes the same ``where``, but first copies its threshold to the device
    from the host, which makes the host wait for the GPU in every view.
    """
    chosen = _chosen(images.shape[0], p, images.device)
    return _per_sample(chosen, torch.where(images < 0.5, images, 1 - images), images)


class TwoViewAugment(nn.Module):
    """uint8 batch in, two :class:`View` s out. Runs wherever its input lives (CPU or GPU).

    ``seed`` makes a call reproducible without touching the global random state, which is how
    training stays exactly resumable: the module passes a seed derived from the global step.

    >>> images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    >>> view1, view2 = TwoViewAugment(AugmentConfig(image_size=24))(images, seed=0)
    >>> view1.images.shape, view1.boxes.shape, view2.flips.dtype  # views, crop boxes, flips per sample
    (torch.Size([4, 3, 24, 24]), torch.Size([4, 4]), torch.bool)
    >>> torch.equal(TwoViewAugment(AugmentConfig(image_size=24))(images, seed=0)[0].images, view1.images)
    True
    """

    def __init__(self, config: AugmentConfig) -> None:
        super().__init__()
        self.config = config
        mean, std = _imagenet_stats(torch.device("cpu"))  # buffers: they move with the module
        self.register_buffer("mean", mean.clone(), persistent=False)
        self.register_buffer("std", std.clone(), persistent=False)

    def recolour(self, images: Tensor, recipe: ViewRecipe, jitter_order: Sequence[int] | None = None) -> Tensor:
        """The colour steps of one view, in BYOL's order: jitter, grayscale, blur, solarize."""
        c = self.config
        size = images.shape[-1]
        images = colour_jitter(images, c.jitter, c.jitter_p, jitter_order)
        images = random_grayscale(images, c.grayscale_p)
        # A step of probability 0 is left out, not computed and discarded (view 1 is never solarized;
        # solo-learn's CIFAR recipe never blurs). The random numbers it would have drawn are not drawn.
        if recipe.blur_p > 0:
            images = random_blur(images, blur_kernel(size), blur_sigma(size), recipe.blur_p)
        if recipe.solarize_p > 0:
            images = random_solarize(images, recipe.solarize_p)
        return images

    def view(self, images: Tensor, index: int, local: bool = False, jitter_order: Sequence[int] | None = None,
             content: Tensor | None = None) -> View:
        """One view of a float batch in [0, 1], coloured with recipe ``index`` (0 or 1); ``local``:
        a multi-crop view (a smaller crop at ``local_size``); ``content``: where each letterboxed
        photo sits in its square (see :func:`sample_crop_boxes`)."""
        c = self.config
        batch = images.shape[0]
        scale, size = (c.local_crop_scale, c.local_size) if local else (c.crop_scale, c.image_size)
        boxes = sample_crop_boxes(batch, scale, c.crop_ratio, images.device, content=content)
        flips = torch.rand(batch, device=images.device) < c.flip_p
        out = resized_crop(images, boxes, flips, size).clamp(0, 1)
        out = self.recolour(out, c.views[index], jitter_order)
        return View((out - self.mean) / self.std, boxes, flips)

    @torch.no_grad()
    def forward(self, images: Tensor, seed: int | None = None, content: Tensor | None = None) -> tuple[View, View]:
        """Two views of ``images`` (uint8, or float in [0, 1]), in float32 even inside autocast;
        ``content``: where each photo sits in its square, for letterboxed photos."""
        with _seeded(images, seed) as (batch, orders):
            return (self.view(batch, 0, jitter_order=next(orders), content=content),
                    self.view(batch, 1, jitter_order=next(orders), content=content))

    @torch.no_grad()
    def local_views(self, images: Tensor, seed: int | None = None, content: Tensor | None = None) -> list[View]:
        """``config.local_views`` multi-crop views of ``images``, coloured like the second view
        (the blur scaled to their size).

        They draw from their own random stream (seeded with ``seed + LOCAL_SEED_OFFSET``), so
        turning them on leaves the two main views of a seed as they were.
        """
        seed = None if seed is None else seed + LOCAL_SEED_OFFSET
        with _seeded(images, seed) as (batch, orders):
            return [self.view(batch, 1, local=True, jitter_order=next(orders), content=content)
                    for _ in range(self.config.local_views)]


@contextmanager
def _seeded(images: Tensor, seed: int | None) -> Iterator[tuple[Tensor, Iterator[list[int] | None]]]:
    """``images`` as floats in [0, 1] outside autocast, and the views' jitter orders, drawing from a
    random stream of their own seeded with ``seed`` (the caller's random state is restored after);
    with ``seed=None`` from the global stream.

    The jitter orders come from Python's ``random`` seeded alike: choosing the next colour step
    must not wait for a value computed on the device.
    """
    device = images.device
    with torch.autocast(device.type, enabled=False), torch.random.fork_rng(
            devices=[device] if device.type == "cuda" else [], enabled=seed is not None, device_type=device.type):
        if seed is not None:
            torch.manual_seed(seed)
        batch = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        yield batch, _jitter_orders(seed)


def _jitter_orders(seed: int | None) -> Iterator[list[int] | None]:
    rng = None if seed is None else random.Random(seed)
    while True:
        yield None if rng is None else rng.sample(range(4), 4)


@functools.lru_cache(maxsize=None)
def _imagenet_stats(device: torch.device) -> tuple[Tensor, Tensor]:
    """ImageNet's channel mean and std, shaped (1, 3, 1, 1) to broadcast over a batch; made once
    per device (each is a copy from the host, which a GPU would wait for on every batch)."""
    return (torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1),
            torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1))


def normalize(images: Tensor) -> Tensor:
    """uint8 (or [0, 1] float) images to the normalised input every backbone here expects."""
    if images.dtype == torch.uint8:
        images = images.float() / 255
    mean, std = _imagenet_stats(images.device)
    return (images - mean) / std


def denormalize(images: Tensor) -> Tensor:
    """Inverse of :func:`normalize`, clipped to [0, 1], for plotting."""
    mean, std = _imagenet_stats(images.device)
    return (images * std + mean).clamp(0, 1)
