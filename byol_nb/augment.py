"""BYOL's two-view augmentation, batched on the training device, with per-sample parameters.

Every sample draws its own crop, flip, jitter, grayscale, blur and solarize decisions (one draw per
*batch* is a known bug: the two views of every image would then differ in the same way). The crop
and flip are done here with one ``grid_sample`` so that we know exactly where each view came from:
:class:`View` carries, per sample, the crop box in the original image's normalised coordinates and
the flip flag, which PixPro needs to find matching pixels. Colour operations are kornia's.

Coordinates: a box is ``(x0, y0, x1, y1)`` with ``(0, 0)`` the top-left *corner* of the original
image and ``(1, 1)`` its bottom-right corner. A view pixel at normalised position ``(u, v)`` in
``[0, 1]^2`` shows the original point ``(x0 + u (x1 - x0), y0 + v (y1 - y0))``, or with the flip
``(x1 - u (x1 - x0), ...)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import kornia.augmentation as K
import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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

    One affine ``grid_sample`` for the whole batch: the view's grid coordinate ``u`` in [-1, 1] maps
    to the original's ``(x0 + x1 - 1) + (x1 - x0) u`` (negated ``u`` under a flip), likewise for y.
    """
    x0, y0, x1, y1 = boxes.unbind(1)
    sign = 1 - 2 * flips.to(images.dtype)
    theta = torch.zeros(images.shape[0], 2, 3, device=images.device, dtype=images.dtype)
    theta[:, 0, 0] = (x1 - x0) * sign
    theta[:, 0, 2] = x0 + x1 - 1
    theta[:, 1, 1] = y1 - y0
    theta[:, 1, 2] = y0 + y1 - 1
    grid = F.affine_grid(theta, [images.shape[0], images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


class TwoViewAugment(nn.Module):
    """uint8 batch in, two :class:`View` s out. Runs wherever its input lives (CPU or GPU).

    ``seed`` makes a call reproducible without touching the global random state, which is how
    training stays exactly resumable: the module passes a seed derived from the global step.
    """

    def __init__(self, config: AugmentConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.colour = nn.ModuleList()
        for recipe in c.views:
            ops = [K.ColorJitter(*c.jitter, p=c.jitter_p), K.RandomGrayscale(p=c.grayscale_p),
                   K.RandomGaussianBlur(c.blur_kernel, c.blur_sigma, p=recipe.blur_p),
                   K.RandomSolarize(thresholds=0.0, additions=0.0, p=recipe.solarize_p)]
            # an op that never fires still costs a kornia call (view 1's solarize: 8% of a view)
            self.colour.append(nn.Sequential(*(op for op in ops if op.p > 0)))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def view(self, images: Tensor, index: int) -> View:
        """One view of a float batch in [0, 1], drawn with recipe ``index`` (0 or 1)."""
        c = self.config
        batch = images.shape[0]
        boxes = sample_crop_boxes(batch, c.crop_scale, c.crop_ratio, images.device)
        flips = torch.rand(batch, device=images.device) < c.flip_p
        out = resized_crop(images, boxes, flips, c.image_size)
        out = self.colour[index](out).clamp_(0, 1)
        return View((out - self.mean) / self.std, boxes, flips)

    @torch.no_grad()
    def forward(self, images: Tensor, seed: int | None = None) -> tuple[View, View]:
        if images.dtype == torch.uint8:
            images = images.float().div_(255)
        if seed is None:
            return self.view(images, 0), self.view(images, 1)
        devices = [images.device] if images.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type=images.device.type):
            torch.manual_seed(seed)
            return self.view(images, 0), self.view(images, 1)


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
