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

The step reads nothing from the device on the host, so that a GPU never waits for the CPU, except
on the steps whose values are logged (every ``log_every_n_steps``): that is also when a loss that
stopped being finite stops the run.
"""

from __future__ import annotations

from dataclasses import asdict

import pytorch_lightning as pl
import torch
from torch import Tensor

from byol_nb.augment import AugmentConfig, TwoViewAugment, View, ViewRecipe, normalize
from byol_nb.config import LOCAL_MIN_SCALE, TrainConfig, check_config
from byol_nb.devices import check_worker_can_use_cuda
from byol_nb.distributed import convert_sync_batchnorm, gather_with_grad
from byol_nb.ema import cosine_momentum, ema_update_
from byol_nb.losses import cell_distances, symmetric_pixel_contrast_loss, symmetric_pixpro_loss
from byol_nb.metrics import collapse_std, knn_top1
from byol_nb.models import Backbone, BYOLNetworks, Outputs
from byol_nb.optim import build_optimizer, warmup_cosine

PIXEL_CONTRAST_TEMPERATURE = 0.3


class BYOLModule(pl.LightningModule):
    def __init__(self, config: TrainConfig | dict) -> None:
        super().__init__()
        config = TrainConfig.from_dict(config) if isinstance(config, dict) else config
        check_config(config)
        self.config = config
        self.save_hyperparameters(asdict(config))
        backbone = Backbone(config.backbone, small_stem=config.small_stem, pretrained=config.pretrained)
        self.nets = BYOLNetworks(backbone, config.proj_hidden, config.proj_dim, method=config.method)
        # channels_last weights, like the channels_last input of every step: convolutions then
        # reorder nothing (and GPUs' tensor cores prefer it).
        self.nets.to(memory_format=torch.channels_last)
        if config.pixel and config.instance_weight == 0:
            # Unused heads must not require gradients: DDP would wait for them, the optimizer skip them.
            self.nets.online.projector.requires_grad_(False)
            self.nets.predictor.requires_grad_(False)
        blur = 1.0 if config.blur else 0.0
        self.augment = TwoViewAugment(AugmentConfig(config.image_size, crop_scale=(config.crop_min_scale, 1.0),
                                                    jitter=tuple(config.jitter), grayscale_p=config.grayscale_p,
                                                    views=(ViewRecipe(blur_p=blur, solarize_p=0.0),
                                                           ViewRecipe(blur_p=0.1 * blur, solarize_p=0.2)),
                                                    local_views=config.local_views, local_size=config.local_view_size,
                                                    local_crop_scale=(LOCAL_MIN_SCALE, config.crop_min_scale)))
        # The first global step whose loss was not finite (-1: none yet), kept on the device.
        self.register_buffer("nonfinite_step", torch.tensor(-1), persistent=False)
        self._monitor: dict[int, list[tuple[Tensor, Tensor]]] = {}
        # What the progress bar shows (byol_nb.callbacks.ProgressBar), as plain numbers updated on
        # logging steps: Lightning reads its own progress-bar values from the device after every step.
        self.progress_values: dict[str, float] = {}

    @property
    def backbone(self) -> Backbone:
        return self.nets.backbone

    def total_steps(self) -> int:
        """The run's length in optimizer steps, from ``--max-steps`` or the epochs and the
        datamodule. Not Lightning's ``estimated_stepping_batches``: for an epoch-based run that
        builds the training DataLoader, and called from ``configure_optimizers`` (before a resumed
        run's step is restored) it would make the resumed run start at the beginning of its epoch."""
        trainer = self.trainer
        if trainer.max_epochs is None or trainer.max_epochs < 0:
            return int(trainer.max_steps)
        by_epochs = trainer.max_epochs * trainer.datamodule.steps_per_epoch(trainer.world_size)
        return by_epochs if trainer.max_steps < 0 else min(by_epochs, trainer.max_steps)

    def setup(self, stage: str) -> None:
        """With several processes, synchronise BatchNorm (before the optimizer and DDP exist): N
        processes with batch b then compute the gradients of one process with batch N x b."""
        root = self.trainer.strategy.root_device
        if root.type == "cuda":
            check_worker_can_use_cuda()
        if self.config.sync_bn and self.trainer.world_size > 1:
            convert_sync_batchnorm(self.nets, cpu=root.type == "cpu")

    # ---- training ---------------------------------------------------------------------------
    def augment_seed(self) -> int:
        """A seed that depends only on (run seed, global step, rank): resuming replays the same views."""
        return (self.config.seed * 1_000_003 + self.global_step) * 1_009 + self.global_rank

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        """``batch``: uint8 images and labels (unused), and for letterboxed photos where each photo
        sits in its square (:class:`byol_nb.data.ImageFolder`), which bounds the crops."""
        images, content = batch[0], (batch[2] if len(batch) > 2 else None)
        view1, view2 = self.augment(images, seed=self.augment_seed(), content=content)
        outputs = self.nets(_channels_last(torch.cat([view1.images, view2.images])))
        if self.config.pixel:
            loss = self.pixel_loss(outputs, view1, view2)
            self.log("train/pixel_loss", loss)
            if self.config.instance_weight > 0:
                instance = self.nets.instance_loss(outputs)
                self.log("train/instance_loss", instance)
                loss = loss + self.config.instance_weight * instance
        else:
            loss = self.nets.instance_loss(outputs, self.local_projections(images, content))
        self.nonfinite_step = torch.where((self.nonfinite_step < 0) & ~torch.isfinite(loss.detach()),
                                          self.global_step, self.nonfinite_step)
        self.log("train/loss", loss)
        if self.logs_this_step():
            self.check_finite_loss()
            self.progress_values["loss"] = round(loss.item(), 4)
            self.log("train/collapse_std", collapse_std(gather_with_grad(outputs.projection.detach())))
            self.log("train/tau", self.current_tau())
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss

    def check_finite_loss(self) -> None:
        """Raise FloatingPointError, naming the step, once a loss was NaN or infinite (one read of a
        device value: called on logging steps and before every checkpoint, which must not hold
        weights that a non-finite loss already spoiled)."""
        step = int(self.nonfinite_step)
        if step >= 0:
            raise FloatingPointError(
                f"the loss stopped being finite at global step {step}: lower --lr, or resume from the "
                f"last checkpoint (written before that step) with --resume and a smaller --lr")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.check_finite_loss()

    def logs_this_step(self) -> bool:
        """Whether the loggers get this step's values (every ``log_every_n_steps`` steps, the rule
        Lightning applies when it writes them). The monitors are computed only then: ``collapse_std``
        gathers every process's projections, and every value logged is a read from the device."""
        every = self.trainer.log_every_n_steps
        return every > 0 and (self.global_step + 1) % every == 0

    def local_projections(self, images: Tensor, content: Tensor | None = None) -> list[Tensor]:
        """The online projections of this step's local (multi-crop) views, one per view; none without.

        They take their own forward pass (a smaller size than the main views), so BatchNorm sees them
        as their own batch; only the online network sees them.
        """
        if not self.config.local_views:
            return []
        views = self.augment.local_views(images, seed=self.augment_seed(), content=content)
        _, projection = self.nets.online(_channels_last(torch.cat([view.images for view in views])))
        return list(projection.chunk(self.config.local_views))

    def pixel_loss(self, outputs: Outputs, view1: View, view2: View) -> Tensor:
        """PixPro's or pixel contrast's loss on the feature maps of both views (stacked on the batch).

        Which cells match comes from this step's own crop boxes and flips, sample by sample.
        """
        projection = self.nets.online.pixel_projector(outputs.fmap)
        with torch.no_grad():
            target = self.nets.target.pixel_projector(outputs.target_fmap)
        t1, t2 = target.chunk(2)
        distance = cell_distances(view1.boxes, view1.flips, view2.boxes, view2.flips, tuple(outputs.fmap.shape[-2:]))
        if self.config.method == "pixpro":
            y1, y2 = self.nets.propagation(projection).chunk(2)
            return symmetric_pixpro_loss(y1, y2, t1, t2, distance < self.config.pixel_threshold)
        q1, q2 = projection.chunk(2)
        # The one place where the pixel branch crosses processes: every process's target pixels are
        # negatives (the global batch). The positive pairs stay local, never applied to gathered keys.
        return symmetric_pixel_contrast_loss(q1, q2, t1, t2, distance, PIXEL_CONTRAST_TEMPERATURE,
                                             gather_with_grad(t1), gather_with_grad(t2), self.config.pixel_threshold)

    def current_tau(self) -> float:
        return cosine_momentum(self.global_step, self.total_steps(), self.config.tau_base)

    def optimizer_step(self, *args, **kwargs) -> None:
        """The optimizer step, then the target's EMA update, as one step.

        Updating the target here rather than in a later hook means every checkpoint (written from
        callbacks' ``on_train_batch_end``) holds online and target networks of the same step, so a
        resumed run is exact. ``global_step`` is incremented only after this hook: the update that
        follows optimizer step k (from 0) uses tau_k.
        """
        tau = self.current_tau()
        super().optimizer_step(*args, **kwargs)
        ema_update_(self.nets.target, self.nets.online, tau)

    def configure_optimizers(self):
        world = self.trainer.world_size if self.trainer else 1
        lr = self.config.lr * self.config.batch_size * world / 256
        # The target's parameters have requires_grad=False, so only the online side is optimised.
        optimizer = build_optimizer(self.config.optimizer, self.nets, lr, self.config.weight_decay)
        total = self.total_steps()
        # An epoch's steps, from the datamodule (set up by now) rather than a dataloader built before a
        # resumed run's step is restored.
        per_epoch = self.trainer.datamodule.steps_per_epoch(world) if self.config.warmup_epochs is not None else 0
        warmup = self.config.warmup_length(per_epoch, total)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ---- kNN monitor ------------------------------------------------------------------------
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        images, labels = batch
        features = self.backbone(_channels_last(normalize(images)))
        self._monitor.setdefault(dataloader_idx, []).append((features.float(), labels))

    def on_validation_epoch_end(self) -> None:
        if len(self._monitor) == 2:
            (bank, bank_y), (query, query_y) = (self._gather(self._monitor[i]) for i in (0, 1))
            # Every process holds every feature and computes the same score.
            self.log("knn_top1", knn_top1(bank, bank_y, query, query_y), prog_bar=True, sync_dist=True)
        self._monitor.clear()

    def _gather(self, parts: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        features = torch.cat([f for f, _ in parts])
        labels = torch.cat([y for _, y in parts])
        if self.trainer.world_size > 1:
            features = self.all_gather(features).flatten(0, 1)
            labels = self.all_gather(labels).flatten(0, 1)
        return features, labels


def _channels_last(images: Tensor) -> Tensor:
    return images.contiguous(memory_format=torch.channels_last)
