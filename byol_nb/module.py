"""The LightningModule that ties augmentation, networks, losses and the EMA together.

One training step::

    uint8 batch --augment (on device)--> view 1, view 2 (+ boxes, flips)
    online:  backbone -> projector -> predictor   (both views in one forward pass)
    target:  backbone -> projector                 (EMA copy, no gradients, one forward pass)
    loss -> backward -> optimizer step -> EMA update of the target with tau(global step)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from byol_nb.augment import AugmentConfig, TwoViewAugment, normalize
from byol_nb.ema import cosine_momentum, ema_update_
from byol_nb.evaluate import knn_top1
from byol_nb.losses import symmetric_byol_loss
from byol_nb.models import Backbone, BYOLNetworks
from byol_nb.optim import build_optimizer, warmup_cosine

METHODS = ("byol",)


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
    batch_size: int = 128  # per process
    optimizer: str = "lars"
    lr: float = 2.0  # paper: 0.2 with batch 4096 (ImageNet); short small-image runs need more
    weight_decay: float = 1.5e-6
    warmup_steps: int = 50  # paper: 10 epochs
    tau_base: float = 0.99  # paper: 0.996 (for 300+ epochs)
    proj_hidden: int = 1024  # paper: 4096
    proj_dim: int = 256
    seed: int = 0

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


class BYOLModule(pl.LightningModule):
    def __init__(self, config: TrainConfig | dict) -> None:
        super().__init__()
        config = TrainConfig.from_dict(config) if isinstance(config, dict) else config
        self.config = config
        self.save_hyperparameters(asdict(config))
        backbone = Backbone(config.backbone, small_stem=config.small_stem, pretrained=config.pretrained)
        self.nets = BYOLNetworks(backbone, config.proj_hidden, config.proj_dim)
        self.augment = TwoViewAugment(AugmentConfig(config.image_size))
        self._monitor: dict[int, list[tuple[Tensor, Tensor]]] = {}

    @property
    def backbone(self) -> Backbone:
        return self.nets.backbone

    def total_steps(self) -> int:
        return int(self.trainer.estimated_stepping_batches)

    # ---- training ---------------------------------------------------------------------------
    def augment_seed(self) -> int:
        """A seed that depends only on (run seed, global step, rank): resuming replays the same views."""
        return (self.config.seed * 1_000_003 + self.global_step) * 1_009 + self.global_rank

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, _ = batch
        view1, view2 = self.augment(images, seed=self.augment_seed())
        both = torch.cat([view1.images, view2.images]).contiguous(memory_format=torch.channels_last)
        _, projection = self.nets.online(both)
        prediction = self.nets.predictor(projection)
        with torch.no_grad():
            _, target = self.nets.target(both)
        p1, p2 = prediction.chunk(2)
        z1, z2 = target.chunk(2)
        loss = symmetric_byol_loss(p1, p2, z1, z2)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"the loss became {loss.item()} at global step {self.global_step}: lower --lr, "
                f"or resume from the last checkpoint with --resume and a smaller learning rate")
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/collapse_std", self.collapse_std(projection.detach()))
        self.log("train/tau", self.current_tau())
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss

    @staticmethod
    def collapse_std(projection: Tensor) -> Tensor:
        """Per-dimension std of L2-normalised projections, times sqrt(dim): about 1 for spread-out
        embeddings, 0 when every image maps to the same point (collapse)."""
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
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        tau = cosine_momentum(self.global_step, self.total_steps(), self.config.tau_base)
        ema_update_(self.nets.target, self.nets.online, tau)

    def configure_optimizers(self):
        world = self.trainer.world_size if self.trainer else 1
        lr = self.config.lr * self.config.batch_size * world / 256
        # The target's parameters have requires_grad=False, so only the online side is optimised.
        optimizer = build_optimizer(self.config.optimizer, self.nets, lr, self.config.weight_decay)
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

