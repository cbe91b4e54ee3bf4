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

import math
from dataclasses import asdict

import pytorch_lightning as pl
import torch
from torch import Tensor

from byol_nb.augment import AugmentConfig, TwoViewAugment, normalize
from byol_nb.config import TrainConfig, check_config
from byol_nb.devices import check_worker_can_use_cuda, use_fast_gpu_kernels
from byol_nb.distributed import convert_sync_batchnorm, gather
from byol_nb.ema import cosine_momentum, ema_update_
from byol_nb.metrics import collapse_std, knn_top1
from byol_nb.models import Backbone, BYOLNetworks
from byol_nb.optim import build_optimizer, warmup_cosine


class BYOLModule(pl.LightningModule):
    def __init__(self, config: TrainConfig | dict) -> None:
        super().__init__()
        config = TrainConfig.from_dict(config) if isinstance(config, dict) else config
        check_config(config)
        self.config = config
        self.save_hyperparameters(asdict(config))
        self.nets = BYOLNetworks.from_config(config)
        # channels_last weights, like the channels_last input of every step: convolutions then
        # reorder nothing (and GPUs' tensor cores prefer it).
        self.nets.to(memory_format=torch.channels_last)
        if config.pixel and config.instance_weight == 0:
            # Unused heads must not require gradients: DDP would wait for them, the optimizer skip them.
            self.nets.online.projector.requires_grad_(False)
            self.nets.predictor.requires_grad_(False)
        self.augment = TwoViewAugment(AugmentConfig.from_train_config(config))
        # The first global step whose loss was not finite (-1: none yet), kept on the device.
        self.register_buffer("nonfinite_step", torch.tensor(-1), persistent=False)
        self._monitor: dict[int, list[tuple[Tensor, Tensor]]] = {}
        # What the progress bar shows (byol_nb.callbacks.ProgressBar), as plain numbers updated on
        # logging steps: Lightning reads its own progress-bar values from the device after every step.
        self.progress_values: dict[str, float] = {}

    @property
    def backbone(self) -> Backbone:
        return self.nets.backbone

    # ---- the run's length and its schedules, all functions of the global step -------------------
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch: the length of the training loader the trainer built (any
        loader, ``SSLDataModule``'s or a plain DataLoader), known once training has started."""
        batches = self.trainer.num_training_batches
        if not math.isfinite(batches):
            raise ValueError("the training loader has no length, so a run measured in epochs has no end: "
                             "give --max-steps (Trainer(max_steps=...)) instead")
        return int(batches)

    def total_steps(self) -> int:
        """The run's length in optimizer steps: ``max_steps``, or the epochs times
        :meth:`steps_per_epoch`, whichever ends first."""
        trainer = self.trainer
        if trainer.max_epochs is None or trainer.max_epochs < 0:
            return int(trainer.max_steps)
        by_epochs = trainer.max_epochs * self.steps_per_epoch()
        return by_epochs if trainer.max_steps < 0 else min(by_epochs, trainer.max_steps)

    def peak_learning_rate(self) -> float:
        """``lr`` per 256 images, scaled to the global batch (every process's ``batch_size``)."""
        return self.config.lr * self.config.batch_size * self.trainer.world_size / 256

    def learning_rate(self, step: int) -> float:
        """The rate of optimizer step ``step``: a linear warmup, then a cosine decay to 0.

        Like tau, a function of the global step alone, so a resumed run continues exactly. It is
        read when the step happens, not when the optimizer is built: Lightning builds the optimizer
        before the training loader (whose length an epoch-based run needs) and before a resumed
        run's step is restored, and asking for the length then would build the loader too early.
        """
        total = self.total_steps()
        warmup = self.config.warmup_length(self.steps_per_epoch(), total)
        return self.peak_learning_rate() * warmup_cosine(step, warmup, total)

    def current_tau(self) -> float:
        return cosine_momentum(self.global_step, self.total_steps(), self.config.tau_base)

    def setup(self, stage: str) -> None:
        """With several processes, synchronise BatchNorm (before the optimizer and DDP exist): N
        processes with batch b then compute the gradients of one process with batch N x b."""
        root = self.trainer.strategy.root_device
        if root.type == "cuda":
            check_worker_can_use_cuda()
            use_fast_gpu_kernels()
        if self.config.sync_bn and self.trainer.world_size > 1:
            convert_sync_batchnorm(self.nets, cpu=root.type == "cpu")

    # ---- training ---------------------------------------------------------------------------
    def augment_seed(self) -> int:
        """A seed that depends only on (run seed, global step, rank): resuming replays the same views."""
        return (self.config.seed * 1_000_003 + self.global_step) * 1_009 + self.global_rank

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        """``batch``: uint8 images and labels (unused), and, for letterboxed photos, each photo's box
        in its square (:class:`byol_nb.datasets.ImageFolder`), which bounds the crops."""
        images, content = batch[0], (batch[2] if len(batch) > 2 else None)
        view1, view2 = self.augment(images, seed=self.augment_seed(), content=content)
        outputs = self.nets(_channels_last(torch.cat([view1.images, view2.images])))
        loss, parts = self.nets.loss(outputs, view1, view2, self.config, self.local_projections(images, content))
        for name, value in parts.items():
            self.log(f"train/{name}", value)
        self.nonfinite_step = torch.where((self.nonfinite_step < 0) & ~torch.isfinite(loss.detach()),
                                          self.global_step, self.nonfinite_step)
        self.log("train/loss", loss)
        if self.logs_this_step():
            self.check_finite_loss()
            self.progress_values["loss"] = round(loss.item(), 4)
            self.log("train/collapse_std", collapse_std(gather(outputs.projection.detach())))
            self.log("train/tau", self.current_tau())
            self.log("train/lr", self.learning_rate(self.global_step))
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

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        """This step's learning rate, the optimizer step, then the target's EMA update, as one step.

        Updating the target here rather than in a later hook means every checkpoint (written from
        callbacks' ``on_train_batch_end``) holds online and target networks of the same step, so a
        resumed run is exact. ``global_step`` is incremented only after this hook: optimizer step k
        (from 0) uses the rate and tau of step k.
        """
        for group in optimizer.param_groups:
            group["lr"] = self.learning_rate(self.global_step)
        tau = self.current_tau()
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        ema_update_(self.nets.target, self.nets.online, tau)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """The optimizer over the online side (the target's parameters do not require gradients);
        :meth:`optimizer_step` sets its rate before every step."""
        c = self.config
        return build_optimizer(c.optimizer, self.nets, self.peak_learning_rate(), c.weight_decay,
                               trust_coefficient=c.lars_eta, clip=c.lars_clip)

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
