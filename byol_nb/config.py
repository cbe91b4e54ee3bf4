"""A run's vocabulary: the names a run is made of (methods, backbones, named datasets), what it
trains (the frozen ``TrainConfig``), and the checks that stop a configuration that cannot work.

The command line that fills a ``TrainConfig`` is :mod:`byol_nb.cli`. This module imports only the
standard library, so that every other module can share its names without importing a parser,
torch or Lightning.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields
from typing import Any

METHODS = ("byol", "pixpro", "pixcontrast")
PIXEL_METHODS = ("pixpro", "pixcontrast")
BACKBONES = ("resnet18", "resnet34", "resnet50")
OPTIMIZERS = ("lars", "sgd", "adamw")
# --data names: the built-in dataset, then the sets torchvision downloads (any other value is a folder).
TORCHVISION_DATA = ("cifar10", "stl10")
NAMED_DATA = ("shapes", *TORCHVISION_DATA)
BYOL_JITTER = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue (Grill et al. 2020, table 6)
# Local (multi-crop) views cut crops of 5% of the image up to the main views' smallest, as DINO does.
LOCAL_MIN_SCALE = 0.05
# The smallest feature map the pixel methods accept. On 2x2 cells about half of all cell pairs are
# positives, and the pixel loss is then nearly the instance loss; on 4x4 about a sixth are.
MIN_PIXEL_GRID = 4


def backbone_stride(small_stem: bool) -> int:
    """Input pixels per feature-map cell: the standard ResNet stem and layers shrink the image 32
    times; the small stem (3x3 stride-1 convolution, no max-pool) 8 times."""
    return 8 if small_stem else 32


def feature_map_side(image_size: int, small_stem: bool) -> int:
    """Side of a ResNet's last feature map for square ``image_size`` inputs (each stride-2 layer
    rounds up)."""
    return -(-image_size // backbone_stride(small_stem))


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run's model and optimisation; saved in every checkpoint.

    ``lr`` is per 256 images of *global* batch. Defaults are tuned for short runs on small images
    (README, "Recipes by data"); the paper's ImageNet values are noted where they differ.
    """

    method: str = "byol"
    backbone: str = "resnet18"
    small_stem: bool = False
    pretrained: bool = False
    image_size: int = 32
    crop_min_scale: float = 0.35  # paper: 0.08; a crop of 8% of a 32 px image keeps little of the object
    jitter: tuple[float, float, float, float] = BYOL_JITTER
    grayscale_p: float = 0.2
    blur: bool = True  # the paper's Gaussian blur (solo-learn's CIFAR recipe leaves it out)
    batch_size: int = 128  # per process
    optimizer: str = "lars"
    lr: float = 2.0  # paper: 0.2 with batch 4096 (ImageNet); short small-image runs need more
    weight_decay: float = 1.5e-6
    lars_eta: float = 0.001  # LARS trust coefficient (paper); solo-learn's CIFAR recipe: 0.02
    lars_clip: bool = False  # clip each layer's LARS rate at the global rate (solo-learn)
    warmup_steps: int = 50  # paper: 10 epochs
    warmup_epochs: float | None = None  # when set, the warmup in epochs instead (long runs)
    tau_base: float = 0.99  # paper: 0.996 (for 300+ epochs)
    proj_hidden: int = 1024  # paper: 4096
    proj_dim: int = 256
    local_views: int = 0  # multi-crop: extra small views per image (byol only)
    local_size: int | None = None  # their side in pixels; None: half of image_size
    seed: int = 0
    sync_bn: bool = True  # BatchNorm statistics over all processes (byol_nb.distributed)
    # Pixel methods only. PixPro's paper pretrains without the instance branch (weight 0) for
    # detection; on the built-in data the pooled branch also helps the dense probe.
    instance_weight: float = 1.0
    pixel_threshold: float = 0.7  # positive pairs: normalised cell distance below this (paper)
    ppm_gamma: float = 2.0  # PixPro: sharpness of the propagation's similarity (paper)
    pixel_temperature: float = 0.3  # pixel contrast: InfoNCE temperature (paper)
    # pixel contrast: cells of one image farther apart than this are negatives; those between the
    # positive threshold and this are neither (official code's --pixpro-neg-ratio)
    pixel_negative_distance: float = 1.0

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """The configuration saved as ``values`` (a checkpoint's hyper-parameters). A name that is
        no field (from another version) is left out with a warning, never silently."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            warnings.warn(f"ignored unknown TrainConfig field(s) {', '.join(unknown)} (written by another version "
                          f"of byol_nb); their defaults apply", stacklevel=2)
        known = {k: v for k, v in values.items() if k in names}
        if "jitter" in known:
            known["jitter"] = tuple(known["jitter"])
        return cls(**known)

    @property
    def local_view_size(self) -> int:
        return self.local_size or self.image_size // 2

    @property
    def pixel(self) -> bool:
        return self.method in PIXEL_METHODS

    def warmup_length(self, steps_per_epoch: int, total_steps: int) -> int:
        """The learning-rate warmup in steps: ``warmup_epochs`` converted when set, else
        ``warmup_steps``; at most a tenth of the run, so that a short run is not all warmup."""
        warmup = self.warmup_steps if self.warmup_epochs is None else round(self.warmup_epochs * steps_per_epoch)
        return min(warmup, max(1, total_steps // 10))


def check_config(config: TrainConfig) -> None:
    """Raise ValueError, naming the flag to change, for a configuration that cannot train."""
    if config.method not in METHODS:
        raise ValueError(f"unknown method {config.method!r}: choose one of {', '.join(METHODS)}")
    if not 0 < config.crop_min_scale <= 1:
        raise ValueError(f"--crop-min-scale must be in (0, 1], got {config.crop_min_scale}")
    brightness, contrast, saturation, hue = config.jitter
    if min(brightness, contrast, saturation, hue) < 0 or hue > 0.5:
        raise ValueError(f"--jitter strengths must be 0 or more, with hue at most 0.5 (a half turn of the "
                         f"colour wheel), got {' '.join(str(v) for v in config.jitter)}")
    if config.warmup_steps < 0 or (config.warmup_epochs is not None and config.warmup_epochs < 0):
        raise ValueError(f"--warmup-steps and --warmup-epochs must be 0 or more, got "
                         f"{config.warmup_epochs if config.warmup_epochs is not None else config.warmup_steps}")
    if not 0 <= config.grayscale_p <= 1:
        raise ValueError(f"--grayscale-p is a probability, in [0, 1], got {config.grayscale_p}")
    if config.lars_eta <= 0:
        raise ValueError(f"--lars-eta must be positive, got {config.lars_eta}")
    if config.local_views < 0:
        raise ValueError(f"--local-views must be 0 or more, got {config.local_views}")
    if config.local_views and config.pixel:
        raise ValueError(f"--local-views is for --method byol (the pixel losses pair the two main views only); "
                         f"use --local-views 0 with --method {config.method}")
    if config.local_views and not 8 <= config.local_view_size <= config.image_size:
        raise ValueError(f"--local-size must be between 8 and --image-size ({config.image_size}), "
                         f"got {config.local_view_size}")
    if config.local_views and config.crop_min_scale <= LOCAL_MIN_SCALE:
        raise ValueError(f"local views crop between {LOCAL_MIN_SCALE} and --crop-min-scale of the image, so with "
                         f"--local-views --crop-min-scale must be above {LOCAL_MIN_SCALE}, got {config.crop_min_scale}")
    if config.pixel:
        _check_pixel_config(config)


def _check_pixel_config(config: TrainConfig) -> None:
    side = feature_map_side(config.image_size, config.small_stem)
    if side < MIN_PIXEL_GRID:
        if not config.small_stem and feature_map_side(config.image_size, True) >= MIN_PIXEL_GRID:
            fix = "add --small-stem (a stride of 8 instead of 32)"
        else:
            needed = MIN_PIXEL_GRID * backbone_stride(config.small_stem)
            fix = f"use --image-size {needed} or more" + ("" if config.small_stem else " or --small-stem")
        raise ValueError(
            f"--method {config.method} needs a feature map of at least {MIN_PIXEL_GRID}x{MIN_PIXEL_GRID} cells "
            f"(on fewer, most cell pairs are positives and the pixel loss is nearly the instance loss), but "
            f"{config.image_size} px images give {side}x{side} with the "
            f"{'small' if config.small_stem else 'standard'} stem: {fix}")
    if config.instance_weight < 0:
        raise ValueError(f"--instance-weight must be 0 or more, got {config.instance_weight}")
    if config.pixel_threshold <= 0:
        raise ValueError(f"--pixel-threshold must be positive, got {config.pixel_threshold}")
    if config.pixel_negative_distance < config.pixel_threshold:
        raise ValueError(f"--pixel-negative-distance ({config.pixel_negative_distance}) must be at least "
                         f"--pixel-threshold ({config.pixel_threshold}): a cell pair cannot be both")
    if config.pixel_temperature <= 0 or config.ppm_gamma <= 0:
        raise ValueError(f"--pixel-temperature and --ppm-gamma must be positive, got {config.pixel_temperature} "
                         f"and {config.ppm_gamma}")
