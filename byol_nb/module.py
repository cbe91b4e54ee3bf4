"""The LightningModule that ties augmentation, networks, losses and the EMA together.

One training step::

    uint8 batch --augment (on device)--> view 1, view 2 (+ boxes, flips)
    online:  backbone -> projector -> predictor   (both views in one forward pass)
    target:  backbone -> projector                 (EMA copy, no gradients, one forward pass)
    loss -> backward -> optimizer step -> EMA update of the target with tau(global step)

``--method pixpro`` adds PixPro's pixel branch on the backbone's feature map (pixel projector on
both networks, PPM on the online side, positive pairs from each sample's crop boxes and flips);
``pixcontrast`` replaces PixPro's loss by pixel InfoNCE. Their loss is
``pixel loss + instance_weight x BYOL loss`` on the pooled features.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from byol_nb.augment import AugmentConfig, TwoViewAugment, normalize
from byol_nb.ema import EMAUpdate, cosine_momentum, target_pairs
from byol_nb.evaluate import knn_top1
from byol_nb.augment import View
from byol_nb.distributed import convert_sync_batchnorm, gather_with_grad
from byol_nb.losses import (multi_crop_byol_loss, positive_pixel_mask, symmetric_pixel_contrast_loss,
                            symmetric_pixpro_loss)
from byol_nb.models import Backbone, BYOLNetworks
from byol_nb.optim import LARS, build_optimizer, warmup_cosine

PIXEL_METHODS = ("pixpro", "pixcontrast")
METHODS = ("byol",) + PIXEL_METHODS
PIXEL_CONTRAST_TEMPERATURE = 0.3
# Local (multi-crop) views cut crops of 5% of the image up to the main views' smallest, as DINO does.
LOCAL_MIN_SCALE = 0.05


@dataclass
class TrainConfig:
    """Everything that defines a run's model and optimisation; saved in every checkpoint.

    ``lr`` is per 256 images of *global* batch. Defaults are tuned for short runs on small images
    (see the README); the paper's ImageNet values are noted where they differ.
    """

    method: str = "byol"
    backbone: str = "resnet18"
    small_stem: bool = False
    pretrained: bool = False
    image_size: int = 32
    crop_min_scale: float = 0.35  # paper: 0.08; small images lose the object in tinier crops (BENCHMARKS.md)
    jitter: tuple[float, float, float, float] = AugmentConfig.jitter  # brightness, contrast, saturation, hue
    grayscale_p: float = AugmentConfig.grayscale_p
    batch_size: int = 128  # per process
    optimizer: str = "lars"
    lr: float = 2.0  # paper: 0.2 with batch 4096 (ImageNet); short small-image runs need more
    weight_decay: float = 1.5e-6
    warmup_steps: int = 50  # paper: 10 epochs
    tau_base: float = 0.99  # paper: 0.996 (for 300+ epochs)
    proj_hidden: int = 1024  # paper: 4096
    proj_dim: int = 256
    local_views: int = 0  # multi-crop: extra small views per image (byol only)
    local_size: int | None = None  # their side in pixels; None: half of image_size
    seed: int = 0
    sync_bn: bool = True  # BatchNorm statistics over all processes (byol_nb.distributed)
    # Pixel methods only. PixPro's paper pretrains without the instance branch (weight 0) for
    # detection; on the built-in data the pooled branch also helps the dense probe (BENCHMARKS.md).
    instance_weight: float = 1.0
    pixel_threshold: float = 0.7  # positive pairs: normalised cell distance below this

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    @property
    def local_view_size(self) -> int:
        return self.local_size or self.image_size // 2

    @property
    def pixel(self) -> bool:
        return self.method in PIXEL_METHODS


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
    if not 0 <= config.grayscale_p <= 1:
        raise ValueError(f"--grayscale-p is a probability, in [0, 1], got {config.grayscale_p}")
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
    if not config.pixel:
        return
    side = Backbone.feature_side(config.image_size, config.small_stem)
    if side < 2:
        raise ValueError(
            f"--method {config.method} needs a feature map of at least 2x2 cells, but {config.image_size} px "
            f"images give {side}x{side} with the {'small' if config.small_stem else 'standard'} stem "
            f"(stride {Backbone.stride_of(config.small_stem)}): add --small-stem or use --image-size "
            f"{2 * Backbone.stride_of(config.small_stem)} or more")
    if config.instance_weight < 0:
        raise ValueError(f"--instance-weight must be 0 or more, got {config.instance_weight}")
    if config.pixel_threshold <= 0:
        raise ValueError(f"--pixel-threshold must be positive, got {config.pixel_threshold}")


class BYOLModule(pl.LightningModule):
    def __init__(self, config: TrainConfig | dict, compiled: bool = False) -> None:
        """``compiled`` runs LARS's update and the augmentation's colour steps through torch.compile
        (``--compile``): the same numbers, faster steps after a one-time compilation (BENCHMARKS.md)."""
        super().__init__()
        config = TrainConfig.from_dict(config) if isinstance(config, dict) else config
        self.config = config
        self.compiled = compiled
        self.save_hyperparameters(asdict(config))
        check_config(config)
        backbone = Backbone(config.backbone, small_stem=config.small_stem, pretrained=config.pretrained)
        self.nets = BYOLNetworks(backbone, config.proj_hidden, config.proj_dim, pixel=config.pixel)
        # channels_last weights, like the channels_last input of every step: oneDNN then reorders
        # nothing per convolution (4-13% of a CPU model step, see BENCHMARKS.md).
        self.nets.to(memory_format=torch.channels_last)
        if config.pixel and config.instance_weight == 0:
            # Unused heads must not require gradients: DDP would wait for them, the optimizer skip them.
            self.nets.online.projector.requires_grad_(False)
            self.nets.predictor.requires_grad_(False)
        self.augment = TwoViewAugment(AugmentConfig(config.image_size, crop_scale=(config.crop_min_scale, 1.0),
                                                    jitter=tuple(config.jitter), grayscale_p=config.grayscale_p,
                                                    local_views=config.local_views, local_size=config.local_view_size,
                                                    local_crop_scale=(LOCAL_MIN_SCALE, config.crop_min_scale)),
                                      compiled=compiled)
        self._monitor: dict[int, list[tuple[Tensor, Tensor]]] = {}
        self._target_update: tuple[torch.optim.Optimizer, dict[Tensor, Tensor], EMAUpdate] | None = None

    @property
    def backbone(self) -> Backbone:
        return self.nets.backbone

    def total_steps(self) -> int:
        return int(self.trainer.estimated_stepping_batches)

    # ---- training ---------------------------------------------------------------------------
    def augment_seed(self) -> int:
        """A seed that depends only on (run seed, global step, rank): resuming replays the same views."""
        return (self.config.seed * 1_000_003 + self.global_step) * 1_009 + self.global_rank

    def setup(self, stage: str) -> None:
        """With several processes, synchronise BatchNorm (before the optimizer and DDP exist): N
        processes with batch b then compute the gradients of one process with batch N x b."""
        if self.config.sync_bn and self.trainer.world_size > 1:
            convert_sync_batchnorm(self.nets, cpu=self.trainer.strategy.root_device.type == "cpu")

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, _ = batch
        view1, view2 = self.augment(images, seed=self.augment_seed())
        both = torch.cat([view1.images, view2.images]).contiguous(memory_format=torch.channels_last)
        fmap, projection = self.nets.online(both)
        with torch.no_grad():
            target_fmap, target = self.nets.target(both)
        if self.config.pixel:
            loss = self.pixel_loss(fmap, target_fmap, view1, view2)
            self.log("train/pixel_loss", loss)
            if self.config.instance_weight > 0:
                instance = self.instance_loss(projection, target)
                self.log("train/instance_loss", instance)
                loss = loss + self.config.instance_weight * instance
        else:
            loss = self.instance_loss(projection, target, self.local_projections(images))
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"the loss became {loss.item()} at global step {self.global_step}: lower --lr, "
                f"or resume from the last checkpoint with --resume and a smaller learning rate")
        self.log("train/loss", loss, prog_bar=True)
        if self.logs_this_step():
            self.log("train/collapse_std", self.collapse_std(gather_with_grad(projection.detach())))
            self.log("train/tau", self.current_tau())
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss

    def logs_this_step(self) -> bool:
        """Whether the loggers get this step's values (every ``log_every_n_steps`` steps, the rule
        Lightning applies when it writes them). The monitors are computed and logged only then:
        ``collapse_std`` gathers every process's projections, and each ``self.log`` costs about a
        third of a millisecond, 1% of a 32 px CPU step (BENCHMARKS.md)."""
        every = self.trainer.log_every_n_steps
        return every > 0 and (self.global_step + 1) % every == 0

    def instance_loss(self, projection: Tensor, target: Tensor, local: Tensor | None = None) -> Tensor:
        """BYOL's symmetric loss between the two views' pooled projections (both views stacked),
        plus the local views' predictions of both targets when ``local`` (their projections, stacked)."""
        p1, p2 = self.nets.predictor(projection).chunk(2)
        z1, z2 = target.chunk(2)
        local_predictions = () if local is None else self.nets.predictor(local).chunk(self.config.local_views)
        return multi_crop_byol_loss(p1, p2, z1, z2, local_predictions)

    def local_projections(self, images: Tensor) -> Tensor | None:
        """The online projections of this step's local (multi-crop) views, stacked; None without them.

        They take their own forward pass (a smaller size than the main views), so BatchNorm sees them
        as their own batch; only the online network sees them.
        """
        if not self.config.local_views:
            return None
        views = self.augment.local_views(images, seed=self.augment_seed())
        stacked = torch.cat([view.images for view in views]).contiguous(memory_format=torch.channels_last)
        return self.nets.online(stacked)[1]

    def pixel_loss(self, fmap: Tensor, target_fmap: Tensor, view1: View, view2: View) -> Tensor:
        """PixPro's or pixel contrast's loss on the feature maps of both views (stacked on the batch).

        The positive-pair mask comes from this step's own crop boxes and flips, sample by sample.
        """
        projection = self.nets.online.pixel_projector(fmap)
        with torch.no_grad():
            target = self.nets.target.pixel_projector(target_fmap)
        mask = positive_pixel_mask(view1.boxes, view1.flips, view2.boxes, view2.flips,
                                   tuple(fmap.shape[-2:]), self.config.pixel_threshold)
        t1, t2 = target.chunk(2)
        if self.config.method == "pixpro":
            y1, y2 = self.nets.propagation(projection).chunk(2)
            return symmetric_pixpro_loss(y1, y2, t1, t2, mask)
        q1, q2 = projection.chunk(2)
        return symmetric_pixel_contrast_loss(q1, q2, t1, t2, mask, PIXEL_CONTRAST_TEMPERATURE,
                                             self.global_keys(t1), self.global_keys(t2))

    def global_keys(self, keys: Tensor) -> Tensor:
        """Every process's target pixels, for pixel contrast's negatives (the global batch).

        This is the one place where the pixel branch crosses processes (the identity in one
        process). The positive-pair masks stay local: they are never applied to gathered keys.
        """
        return gather_with_grad(keys)

    @staticmethod
    def collapse_std(projection: Tensor) -> Tensor:
        """Per-dimension std of L2-normalised projections, times sqrt(dim): about 1 for spread-out
        embeddings, 0 when every image maps to the same point (collapse). The training step passes
        the global batch (every process's projections), so the value does not depend on the split."""
        z = F.normalize(projection.float(), dim=1)
        return z.std(dim=0).mean() * math.sqrt(z.shape[1])

    def current_tau(self) -> float:
        return cosine_momentum(self.global_step, self.total_steps(), self.config.tau_base)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        """The optimizer step, then the target's EMA update, as one step.

        Updating the target here rather than in a later hook means every checkpoint (written every
        N steps or on a signal, from callbacks' ``on_train_batch_end``) holds online and target
        networks of the same step, so a resumed run is exact. ``global_step`` is incremented only
        after this hook: the update that follows optimizer step k (from 0) uses tau_k.
        """
        tau = self.current_tau()
        inner = getattr(optimizer, "optimizer", optimizer)  # Lightning passes its LightningOptimizer wrapper
        follow, ema = self._target_update_for(inner)
        if follow:
            # LARS moves each target weight right after its online weight (one read of the weights
            # fewer: BENCHMARKS.md); the EMA update then does the rest (BatchNorm buffers).
            optimizer.step(closure=optimizer_closure, follow=follow, follow_weight=1 - tau)
        else:
            super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        ema.apply_(tau)

    def _target_update_for(self, optimizer: torch.optim.Optimizer) -> tuple[dict[Tensor, Tensor], EMAUpdate]:
        """The target weights ``optimizer`` moves itself (LARS: :func:`byol_nb.ema.target_pairs`; none
        for the others) and the EMA update of everything else, built on the optimizer's first step and
        kept: the tensors stay the same objects for a whole fit, and listing them costs 0.6 ms a step."""
        if self._target_update is None or self._target_update[0] is not optimizer:
            follow = target_pairs(self.nets.target, self.nets.online, optimizer) if isinstance(optimizer, LARS) else {}
            self._target_update = (optimizer, follow, EMAUpdate(self.nets.target, self.nets.online, skip=follow.values()))
        return self._target_update[1], self._target_update[2]

    def configure_optimizers(self):
        world = self.trainer.world_size if self.trainer else 1
        lr = self.config.lr * self.config.batch_size * world / 256
        # The target's parameters have requires_grad=False, so only the online side is optimised.
        optimizer = build_optimizer(self.config.optimizer, self.nets, lr, self.config.weight_decay,
                                    compiled=self.compiled)
        total = self.total_steps()
        warmup = min(self.config.warmup_steps, max(1, total // 10))
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ---- kNN monitor ------------------------------------------------------------------------
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        images, labels = batch
        features = self.backbone(normalize(images).contiguous(memory_format=torch.channels_last))
        self._monitor.setdefault(dataloader_idx, []).append((features.float(), labels))

    def on_validation_epoch_end(self) -> None:
        if len(self._monitor) == 2:
            (bank, bank_y), (query, query_y) = (self._gather(self._monitor[i]) for i in (0, 1))
            self.log("knn_top1", knn_top1(bank, bank_y, query, query_y), prog_bar=True, rank_zero_only=True)
        self._monitor.clear()

    def _gather(self, parts: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        features = torch.cat([f for f, _ in parts])
        labels = torch.cat([y for _, y in parts])
        if self.trainer.world_size > 1:
            features = self.all_gather(features).flatten(0, 1)
            labels = self.all_gather(labels).flatten(0, 1)
        return features, labels

