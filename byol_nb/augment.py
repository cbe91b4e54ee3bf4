"""BYOL's two-view augmentation, batched on the training device, with per-sample parameters.

Every sample draws its own crop, flip, jitter, grayscale, blur and solarize decisions (one draw per
*batch* is a known bug: the two views of every image would then differ in the same way). The crop
and flip are done here with one ``grid_sample`` so that we know exactly where each view came from:
:class:`View` carries, per sample, the crop box in the original image's normalised coordinates and
the flip flag, which PixPro needs to find matching pixels.

The colour steps are functions of a batch and per-sample parameters drawn here (kornia's functional
``kornia.enhance`` ops, plus :func:`adjust_hue` and :func:`gaussian_blur`, each tested equal to
kornia's). kornia's augmentation *modules* do the same work with per-call bookkeeping, and its HSV
hue round trip is 4-5x slower than :func:`adjust_hue`: two 32 px views of a batch of 64 took 14.8 ms
with the modules and take 9.0 ms now (BENCHMARKS.md).

Coordinates: a box is ``(x0, y0, x1, y1)`` with ``(0, 0)`` the top-left *corner* of the original
image and ``(1, 1)`` its bottom-right corner. A view pixel at normalised position ``(u, v)`` in
``[0, 1]^2`` shows the original point ``(x0 + u (x1 - x0), y0 + v (y1 - y0))``, or with the flip
``(x1 - u (x1 - x0), ...)``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace
from typing import Callable, NamedTuple, TypeVar

import torch
import torch.nn.functional as F
from kornia.color import rgb_to_grayscale
from kornia.enhance import (adjust_brightness_accumulative, adjust_contrast_with_mean_subtraction,
                            adjust_saturation_with_gray_subtraction)
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Added to a step's seed for its local (multi-crop) views: a stream apart from the two main views'.
LOCAL_SEED_OFFSET = 7_777_777
T = TypeVar("T")


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


@dataclass(frozen=True)
class AugmentConfig:
    """BYOL's recipe (Grill et al. 2020, table 6); the blur is scaled to the image size."""

    image_size: int
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    views: tuple[ViewRecipe, ViewRecipe] = field(
        default=(ViewRecipe(blur_p=1.0, solarize_p=0.0), ViewRecipe(blur_p=0.1, solarize_p=0.2)))
    # Multi-crop (Caron et al. 2020): extra small views of small crops, coloured like the second view.
    local_views: int = 0
    local_size: int = 16
    local_crop_scale: tuple[float, float] = (0.05, 0.35)

    @property
    def blur_sigma(self) -> tuple[float, float]:
        """(0.1, 2.0) pixels at 224 px, scaled with the image so that small images are not smeared."""
        scale = self.image_size / 224
        return max(0.1 * scale, 0.05), max(2.0 * scale, 0.1)

    @property
    def blur_kernel(self) -> int:
        """About 10% of the image side, odd, at least 3 (23 at 224 px, as in the paper)."""
        return max(3, int(self.image_size * 0.1) // 2 * 2 + 1)


def sample_crop_boxes(batch: int, scale: tuple[float, float], ratio: tuple[float, float],
                      device: torch.device | str = "cpu", tries: int = 10) -> Tensor:
    """RandomResizedCrop's box sampler, vectorised over the batch, for square images.

    Like torchvision, it tries ``tries`` (area, aspect) pairs per sample and keeps the first that
    fits in the image; a sample with none falls back to the whole image.
    """
    area = torch.empty(batch, tries, device=device).uniform_(*scale)
    log_ratio = torch.empty(batch, tries, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    aspect = log_ratio.exp()
    width, height = (area * aspect).sqrt(), (area / aspect).sqrt()
    fits = (width <= 1) & (height <= 1)
    first = fits.float().argmax(dim=1, keepdim=True)
    width = torch.where(fits.any(1), width.gather(1, first).squeeze(1), torch.ones(batch, device=device))
    height = torch.where(fits.any(1), height.gather(1, first).squeeze(1), torch.ones(batch, device=device))
    x0 = torch.rand(batch, device=device) * (1 - width)
    y0 = torch.rand(batch, device=device) * (1 - height)
    return torch.stack([x0, y0, x0 + width, y0 + height], dim=1)


def resized_crop(images: Tensor, boxes: Tensor, flips: Tensor, size: int) -> Tensor:
    """Crop every image to its own box, mirror where ``flips``, resize to ``size`` (bilinear).

    One ``grid_sample`` for the whole batch: the view's grid coordinate ``u`` in [-1, 1] maps to the
    original's ``(x0 + x1 - 1) + (x1 - x0) u`` (negated ``u`` under a flip), likewise for y. That is
    ``F.affine_grid`` with a diagonal matrix, but x depends on the column only and y on the row
    only, so the grid is built from one line per axis, without affine_grid's batched matrix product:
    the crop of 64 images takes 0.3 instead of 0.8 ms at 32 px, 0.9 instead of 3.3 ms at 64 px
    (BENCHMARKS.md), with the same grid up to float rounding (tested).
    """
    x0, y0, x1, y1 = boxes.unbind(1)
    batch = images.shape[0]
    # Pixel centres of the output in [-1, 1], as affine_grid places them with align_corners=False.
    centres = (torch.arange(size, device=images.device, dtype=images.dtype) * 2 + 1) / size - 1
    sign = 1 - 2 * flips.to(images.dtype)
    xs = ((x1 - x0) * sign).unsqueeze(1) * centres + (x0 + x1 - 1).unsqueeze(1)  # (B, size): per column
    ys = (y1 - y0).unsqueeze(1) * centres + (y0 + y1 - 1).unsqueeze(1)  # (B, size): per row
    grid = torch.stack([xs.unsqueeze(1).expand(batch, size, size), ys.unsqueeze(2).expand(batch, size, size)], dim=-1)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _chosen(batch: int, p: float, device: torch.device) -> Tensor:
    """Per-sample Bernoulli(p) decisions, (batch,) bool."""
    return torch.rand(batch, device=device) < p


def _uniform(batch: int, low: float, high: float, device: torch.device) -> Tensor:
    return torch.empty(batch, device=device).uniform_(low, high)


def adjust_hue(images: Tensor, shift: Tensor) -> Tensor:
    """Turn every image's hue by its own ``shift`` (B,), in turns of the colour wheel (0.5 = half a
    turn), keeping HSV saturation and value: torchvision's and kornia's ``adjust_hue``, written as a
    dozen elementwise ops on the batch (kornia's full HSV round trip costs 4-5x more).

    Hue in sixths of a turn is ``(g - b) / C``, ``(b - r) / C + 2`` or ``(r - g) / C + 4`` as red,
    green or blue is the largest channel (``C`` = max - min). Back to RGB, channel ``n`` (5, 3, 1
    for R, G, B) is ``max - C * clamp(min(k, 4 - k), 0, 1)`` with ``k = (n + hue) mod 6``.

    The sector is picked by ``lerp`` with 0/1 weights, which is exact, and the modulo written with
    ``floor``: on a CPU, ``torch.where`` and ``torch.remainder`` took 5-10x longer than plain
    arithmetic (the whole turn 0.9 -> 0.5 ms for 64 images of 32 px, BENCHMARKS.md).
    """
    red, green, blue = images.unbind(1)
    high, low = images.amax(1), images.amin(1)
    chroma = high - low
    # A gray pixel (C = 0) has no hue: any finite one gives it back unchanged, as C times anything is 0.
    safe = chroma.clamp_min(torch.finfo(images.dtype).tiny)
    green_high, red_high = (high == green).to(images.dtype), (high == red).to(images.dtype)
    hue = torch.lerp((red - green) / safe + 4, (blue - red) / safe + 2, green_high)
    hue = torch.lerp(hue, (green - blue) / safe, red_high)  # red first where red and green tie
    hue = hue + 6 * shift.to(images.dtype).view(-1, 1, 1)
    offsets = torch.tensor([5.0, 3.0, 1.0], device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    k = offsets + hue.unsqueeze(1)
    k = k - 6 * torch.floor(k / 6)
    return high.unsqueeze(1) - chroma.unsqueeze(1) * torch.minimum(k, 4 - k).clamp(0, 1)


# The jitter steps clamped back to [0, 1], as torchvision's ColorJitter does after each. One
# function each, not one closure: torch.compile caches its code per function.
def brightness_step(images: Tensor, factors: Tensor) -> Tensor:
    return adjust_brightness_accumulative(images, factors).clamp(0, 1)


def contrast_step(images: Tensor, factors: Tensor) -> Tensor:
    return adjust_contrast_with_mean_subtraction(images, factors).clamp(0, 1)


def saturation_step(images: Tensor, factors: Tensor) -> Tensor:
    return adjust_saturation_with_gray_subtraction(images, factors).clamp(0, 1)


def hue_step(images: Tensor, shifts: Tensor) -> Tensor:
    return adjust_hue(images, shifts).clamp(0, 1)


def per_sample(chosen: Tensor, changed: Tensor, images: Tensor) -> Tensor:
    """``changed`` for the samples ``chosen`` (B,) bool, ``images`` for the others.

    A ``lerp`` with 0/1 weights, which is exact for finite values: ``torch.where`` gives the same
    at twice the cost on a CPU (0.17 vs 0.09 ms for 64 images of 32 px).
    """
    return torch.lerp(images, changed, chosen.to(images.dtype).view(-1, 1, 1, 1))


def grayscale_where(images: Tensor, chosen: Tensor) -> Tensor:
    """Gray (0.299 R + 0.587 G + 0.114 B in all channels) where ``chosen`` (B,) bool."""
    return per_sample(chosen, rgb_to_grayscale(images).expand_as(images), images)


def solarize_where(images: Tensor, chosen: Tensor) -> Tensor:
    """Pixels at or above 0.5 inverted (``x -> 1 - x``) where ``chosen`` (B,) bool.

    ``min(x, 1 - x)`` is exactly that inversion; choosing per sample rather than per pixel makes it
    0.45 -> 0.16 ms for 64 images of 32 px (a per-pixel ``torch.where`` is slow on a CPU).
    """
    return per_sample(chosen, torch.minimum(images, 1 - images), images)


class ColourSteps(NamedTuple):
    """The elementwise colour steps, each ``(images, per-sample tensor) -> images`` in [0, 1].

    They take their random draws as arguments, so that the same steps can run eagerly or compiled
    (:func:`compiled_steps`) and draw the very same numbers either way.
    """

    brightness: Callable[[Tensor, Tensor], Tensor]
    contrast: Callable[[Tensor, Tensor], Tensor]
    saturation: Callable[[Tensor, Tensor], Tensor]
    hue: Callable[[Tensor, Tensor], Tensor]
    grayscale: Callable[[Tensor, Tensor], Tensor]
    solarize: Callable[[Tensor, Tensor], Tensor]


EAGER_STEPS = ColourSteps(brightness_step, contrast_step, saturation_step, hue_step, grayscale_where, solarize_where)


@functools.cache
def compiled_steps() -> ColourSteps:
    """:data:`EAGER_STEPS` through ``torch.compile``, made once per process: each step becomes one
    fused loop over the batch instead of up to a dozen passes (the hue turn of 64 images of 32 px:
    4.3 -> 1.2 ms on one thread)."""
    return ColourSteps(*(torch.compile(step) for step in EAGER_STEPS))


def colour_jitter(images: Tensor, strengths: tuple[float, float, float, float], p: float,
                  steps: ColourSteps = EAGER_STEPS) -> Tensor:
    """torchvision's ColorJitter with probability ``p``, parameters drawn per sample.

    Brightness, contrast and saturation factors are uniform in ``[1 - s, 1 + s]``, the hue shift in
    ``[-h, h]`` turns; samples that skip the jitter get neutral factors. The four steps run in one
    random order per call, as in kornia's ``ColorJitter``.
    """
    batch, device = images.shape[0], images.device
    brightness, contrast, saturation, hue = strengths
    on = _chosen(batch, p, device)

    def factor(strength: float, neutral: float) -> Tensor:
        drawn = _uniform(batch, neutral - strength, neutral + strength, device)
        return torch.where(on, drawn, torch.full_like(drawn, neutral))

    jitters = [(brightness, steps.brightness, factor(brightness, 1.0)),
               (contrast, steps.contrast, factor(contrast, 1.0)),
               (saturation, steps.saturation, factor(saturation, 1.0)),
               (hue, steps.hue, factor(hue, 0.0))]
    for index in torch.randperm(4).tolist():
        strength, step, factors = jitters[index]
        if strength > 0:
            images = step(images, factors)
    return images


def random_grayscale(images: Tensor, p: float, steps: ColourSteps = EAGER_STEPS) -> Tensor:
    """Each sample becomes gray (0.299 R + 0.587 G + 0.114 B in all channels) with probability ``p``."""
    return steps.grayscale(images, _chosen(images.shape[0], p, images.device))


# Kernels up to this size run as one k x k depthwise convolution, larger ones as two 1-D passes.
# On the 2-core CPU of BENCHMARKS.md one 3x3 pass over 64 images of 32 px took 0.15 ms against
# 0.25 ms for two passes, 7x7 at 64 px 0.64 against 0.82 ms; from 9x9 (96 px) two passes win.
SQUARE_BLUR_MAX_KERNEL = 7


def gaussian_blur(images: Tensor, kernel: int, sigma: Tensor) -> Tensor:
    """Blur every image with its own ``sigma`` (B,): kornia's ``gaussian_blur2d`` (separable,
    reflected border) as depthwise convolutions over the whole batch: one with the k x k kernel
    for small kernels (fewer passes), the row and the column kernel one after the other for
    larger ones (fewer multiplications), see :data:`SQUARE_BLUR_MAX_KERNEL`."""
    batch, channels, height, width = images.shape
    half = kernel // 2
    taps = torch.arange(-half, half + 1, device=images.device, dtype=images.dtype)
    weights = torch.exp(-0.5 * (taps / sigma.to(images.dtype).unsqueeze(1)) ** 2)
    weights = (weights / weights.sum(1, keepdim=True)).repeat_interleave(channels, dim=0)  # (B*C, k)
    planes = F.pad(images.reshape(1, batch * channels, height, width), (half, half, half, half), mode="reflect")
    if kernel <= SQUARE_BLUR_MAX_KERNEL:
        square = weights.unsqueeze(2) * weights.unsqueeze(1)  # (B*C, k, k): column weight x row weight
        planes = F.conv2d(planes, square.unsqueeze(1), groups=batch * channels)
    else:
        planes = F.conv2d(planes, weights.view(-1, 1, 1, kernel), groups=batch * channels)
        planes = F.conv2d(planes, weights.view(-1, 1, kernel, 1), groups=batch * channels)
    return planes.view(batch, channels, height, width)


def random_blur(images: Tensor, kernel: int, sigma: tuple[float, float], p: float) -> Tensor:
    """Gaussian blur with probability ``p``, sigma uniform in ``sigma`` per sample."""
    chosen = _chosen(images.shape[0], p, images.device)
    if not chosen.any():
        return images
    if chosen.all():
        return gaussian_blur(images, kernel, _uniform(images.shape[0], *sigma, images.device))
    images = images.clone()
    images[chosen] = gaussian_blur(images[chosen], kernel, _uniform(int(chosen.sum()), *sigma, images.device))
    return images


def random_solarize(images: Tensor, p: float, steps: ColourSteps = EAGER_STEPS) -> Tensor:
    """Invert the pixels at or above 0.5 (``x -> 1 - x``) with probability ``p``, per sample; a
    probability of 0 (BYOL's first view) costs nothing."""
    chosen = _chosen(images.shape[0], p, images.device)
    return steps.solarize(images, chosen) if p > 0 else images


class TwoViewAugment(nn.Module):
    """uint8 batch in, two :class:`View` s out. Runs wherever its input lives (CPU or GPU).

    ``seed`` makes a call reproducible without touching the global random state, which is how
    training stays exactly resumable: the module passes a seed derived from the global step.
    """

    def __init__(self, config: AugmentConfig, compiled: bool = False) -> None:
        """``compiled`` runs the colour steps through torch.compile (:func:`compiled_steps`): the
        same views from the same seed, faster after a one-time compilation (``--compile``)."""
        super().__init__()
        self.config = config
        self.compiled = compiled
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def recolour(self, images: Tensor, recipe: ViewRecipe) -> Tensor:
        """The colour steps of one view, in BYOL's order: jitter, grayscale, blur, solarize."""
        c, steps = self.config, compiled_steps() if self.compiled else EAGER_STEPS
        images = colour_jitter(images, c.jitter, c.jitter_p, steps)
        images = random_grayscale(images, c.grayscale_p, steps)
        blur = c if images.shape[-1] == c.image_size else replace(c, image_size=images.shape[-1])  # local views
        images = random_blur(images, blur.blur_kernel, blur.blur_sigma, recipe.blur_p)
        return random_solarize(images, recipe.solarize_p, steps)

    def view(self, images: Tensor, index: int, local: bool = False) -> View:
        """One view of a float batch in [0, 1], coloured with recipe ``index`` (0 or 1); ``local``:
        a multi-crop view (a smaller crop at ``local_size``)."""
        c = self.config
        batch = images.shape[0]
        scale, size = (c.local_crop_scale, c.local_size) if local else (c.crop_scale, c.image_size)
        boxes = sample_crop_boxes(batch, scale, c.crop_ratio, images.device)
        flips = torch.rand(batch, device=images.device) < c.flip_p
        out = resized_crop(images, boxes, flips, size)
        out = self.recolour(out.clamp_(0, 1), c.views[index])
        return View((out - self.mean) / self.std, boxes, flips)

    @torch.no_grad()
    def forward(self, images: Tensor, seed: int | None = None) -> tuple[View, View]:
        """Two views of ``images`` (uint8, or float in [0, 1]), in float32 even inside autocast."""
        return self._draw(images, seed, lambda batch: (self.view(batch, 0), self.view(batch, 1)))

    @torch.no_grad()
    def local_views(self, images: Tensor, seed: int | None = None) -> list[View]:
        """``config.local_views`` multi-crop views of ``images``, coloured like the second view
        (the blur scaled to their size).

        They draw from their own random stream (seeded with ``seed + LOCAL_SEED_OFFSET``), so
        turning them on leaves the two main views of a seed as they were.
        """
        seed = None if seed is None else seed + LOCAL_SEED_OFFSET
        return self._draw(images, seed, lambda batch: [self.view(batch, 1, local=True)
                                                       for _ in range(self.config.local_views)])

    def _draw(self, images: Tensor, seed: int | None, draw: Callable[[Tensor], T]) -> T:
        """``draw`` on ``images`` as floats in [0, 1], outside autocast, with its own seeded random
        stream when ``seed`` is given (the global random state is left untouched)."""
        if images.dtype == torch.uint8:
            images = images.float().div_(255)
        device = images.device.type
        with torch.autocast(device, enabled=False):
            if seed is None:
                return draw(images)
            with torch.random.fork_rng(devices=[images.device] if device == "cuda" else [], device_type=device):
                _seed(seed, images.device)
                return draw(images)


def _seed(seed: int, device: torch.device) -> None:
    """``torch.manual_seed`` for the generators a draw uses: the CPU's and, for a CUDA batch, the GPUs'
    (any other device: ``torch.manual_seed`` itself).

    ``torch.manual_seed`` also queues the seed for every GPU backend that is not initialised yet,
    saving the Python stack with each (for when the backend starts): about 1 ms of a 32 px CPU step
    inside Lightning's deep call stack (BENCHMARKS.md).
    """
    if device.type not in ("cpu", "cuda"):
        torch.manual_seed(seed)  # another accelerator (MPS, XPU): seed its generator the general way
        return
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(seed)


def normalize(images: Tensor) -> Tensor:
    """uint8 (or [0, 1] float) images to the normalised input every backbone here expects."""
    if images.dtype == torch.uint8:
        images = images.float() / 255
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def denormalize(images: Tensor) -> Tensor:
    """Inverse of :func:`normalize`, clipped to [0, 1], for plotting."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images * std + mean).clamp(0, 1)
