"""Each BYOL implementation trained the way its own documentation shows, on the same images.

Every ``train_*`` function takes one :class:`Setup` (the same backbone, resolution, batch, steps and
uint8 pixels for everyone) and returns the trained backbone plus a timestamp per step. What differs
is only what each library brings: its augmentation, data path, model wrapper, loss, EMA and the
optimizer its docs recommend.

* ``byol_nb``: :class:`byol_nb.module.BYOLModule` under a Lightning ``Trainer``, exactly as
  ``python -m byol_nb.train`` runs it (uint8 batches, two-view augmentation on the device, LARS).
* ``byol-pytorch`` 0.9.1 (lucidrains): its README loop, ``BYOL(resnet18, hidden_layer="avgpool")``
  with ``use_simplicial_embeddings=False`` (BYOL as published), its default batched torchvision
  augmentation, Adam at lr 3e-4, ``learner.update_moving_average()`` after each step.
* ``lightly`` 1.6.0: its BYOL example, ``BYOLProjectionHead``/``BYOLPredictionHead``,
  ``NegativeCosineSimilarity``, ``update_momentum`` with ``cosine_schedule`` and ``BYOLTransform``
  (PIL, per image) in a ``DataLoader`` with workers; SGD at lr 0.06 with momentum 0.9.
* ``ideal``: byol_nb's networks on views augmented once before timing: online forward, loss,
  backward and target forward only, the floor that any full step is compared with.

All share the projector/predictor shape (1024 hidden, 256 out; byol_nb's and lightly's example
default; byol-pytorch is told so) so that the compared work is the same model. A :class:`Setup`
with ``flags`` trains byol_nb alone on the recipe those flags of ``python -m byol_nb.train`` give
(``("--data", "cifar10")``: the cifar10 preset), for byol_nb's own speed and step-over-ideal figures.
"""

from __future__ import annotations

import copy
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np
import torch
import torchvision
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

HIDDEN, OUT = 1024, 256
# lightly asks PyPI for its latest version when imported, unless told it already did: on a machine
# with no internet that request waits for its timeout.
os.environ.setdefault("LIGHTLY_DID_VERSION_CHECK", "True")


@dataclass(frozen=True)
class Setup:
    """One run: the same for every implementation."""

    pixels: Tensor  # (N, 3, S, S) uint8 training images
    size: int
    batch: int
    steps: int
    seed: int = 0
    workers: int = 2  # DataLoader workers where the library's examples use them (lightly)
    precision: str = "auto"  # byol_nb's --precision (auto: what ``python -m byol_nb.train`` picks)
    flags: tuple[str, ...] = ()  # byol_nb only: its recipe from these train flags (byol_nb_config)

    @property
    def device(self) -> torch.device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Trained(NamedTuple):
    backbone: nn.Module  # ImageNet-normalised (B, 3, S, S) -> pooled features (B, 512)
    stamps: list[float]  # time.perf_counter() at the start of every step, then once at the end
    ideal_s: tuple[float, ...] = ()  # paired runs only: every ideal step timed
    block_s: tuple[float, ...] = ()  # paired runs only: per step, the time of the ideal block run after it (or 0)


class Clock:
    """Timestamps at step boundaries; waits for the GPU so a stamp means the work is done."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def tick(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())


def resnet18() -> nn.Module:
    """The shared backbone: torchvision's ResNet-18, random init, standard stem."""
    return torchvision.models.resnet18(weights=None)


def pooled(resnet: nn.Module) -> nn.Module:
    """A torchvision ResNet without its classifier: (B, 3, S, S) -> (B, 512)."""
    return nn.Sequential(*list(resnet.children())[:-1], nn.Flatten(1))


def batches(setup: Setup, dataset: Dataset, workers: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(setup.seed)
    return DataLoader(dataset, batch_size=setup.batch, shuffle=True, drop_last=True, num_workers=workers,
                      generator=generator, persistent_workers=workers > 0,
                      pin_memory=setup.device.type == "cuda")


def forever(loader: DataLoader):
    while True:
        yield from loader


# ---- byol_nb --------------------------------------------------------------------------------------
def train_byol_nb(setup: Setup, paired: bool = False) -> Trained:
    """``paired``: after every ``PAIR_BLOCK`` steps, ``PAIR_BLOCK`` ideal steps (:func:`model_step` on
    views augmented once) with the same networks, timed apart and returned in ``Trained.ideal_s``;
    see :func:`paired_ratio`."""
    import pytorch_lightning as pl

    from byol_nb.datasets import TensorImages
    from byol_nb.devices import resolve_precision

    class StepClock(pl.Callback):
        def __init__(self) -> None:
            self.clock = Clock()
            self.ideal_s: list[float] = []
            self.block_s: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
            self.clock.tick()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
            if not (paired and batch_idx % PAIR_BLOCK == PAIR_BLOCK - 1):
                self.block_s.append(0.0)
                return
            block = Clock()
            block.tick()
            for _ in range(PAIR_BLOCK):
                ideal = Clock()
                ideal.tick()
                model_step(pl_module.nets, both, bf16)
                ideal.tick()
                self.ideal_s.append(ideal.stamps[1] - ideal.stamps[0])
            pl_module.nets.zero_grad(set_to_none=True)
            block.tick()
            self.block_s.append(block.stamps[1] - block.stamps[0])

        def on_train_end(self, trainer, pl_module) -> None:
            self.clock.tick()

    pl.seed_everything(setup.seed, verbose=False)
    config = byol_nb_config(setup)
    module = byol_nb_module(config, setup.device)
    dataset = TensorImages(setup.pixels.numpy(), [-1] * len(setup.pixels), setup.size, classes=[], channels_first=True)
    precision = resolve_precision(setup.precision, "auto")
    bf16 = precision == "bf16-mixed"
    if paired:
        both = fixed_views(setup, config, dataset.pixels[: setup.batch])
    clock = StepClock()
    trainer = pl.Trainer(accelerator="auto", devices=1, max_steps=setup.steps, logger=False, precision=precision,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, callbacks=[clock])
    trainer.fit(module, train_dataloaders=batches(setup, dataset))
    return Trained(module.backbone, clock.clock.stamps, tuple(clock.ideal_s), tuple(clock.block_s))


# Steps per block of paired measurement. An ideal step run right after each Lightning step slowed the
# Lightning step that followed it by 10-15% (one process, 32 px: 341 vs 305 ms; the host's state
# carries over from one kind of step to the next), so the two alternate in blocks, and the first
# Lightning step after each ideal block is left out.
PAIR_BLOCK = 4


def paired_ratio(stamps: list[float], ideal_s: list[float], block_s: list[float], warmup: int) -> dict:
    """byol_nb's full step over its ideal step, measured in alternating blocks in one process.

    Step k's full time is the gap between the starts of steps k and k+1, minus the ideal block run
    at its end, if any. Separate runs of the two, a minute apart on a shared machine, drift by more
    than the 20% being measured; alternated, a slow spell of the host slows both alike.
    """
    gaps = [b - a - block for a, b, block in zip(stamps, stamps[1:], block_s)]
    full = [gap for k, gap in enumerate(gaps) if k >= warmup and not (k > 0 and block_s[k - 1] > 0)]
    return {"full_s": full, "ideal_s": ideal_s, "ratio": statistics.median(full) / statistics.median(ideal_s)}


# ---- byol-pytorch (lucidrains) --------------------------------------------------------------------
class _Uint8Images(Dataset):
    def __init__(self, pixels: Tensor) -> None:
        self.pixels = pixels

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, index: int) -> Tensor:
        return self.pixels[index]


def train_byol_pytorch(setup: Setup) -> Trained:
    from byol_pytorch import BYOL

    torch.manual_seed(setup.seed)
    resnet = resnet18().to(setup.device)
    learner = BYOL(resnet, image_size=setup.size, hidden_layer="avgpool", projection_size=OUT,
                   projection_hidden_size=HIDDEN, use_simplicial_embeddings=False)
    optimizer = torch.optim.Adam(learner.parameters(), lr=3e-4)
    clock = Clock()
    data = forever(batches(setup, _Uint8Images(setup.pixels)))
    for _ in range(setup.steps):
        clock.tick()
        images = next(data).to(setup.device, non_blocking=True).float().div_(255)  # its augmentation takes [0, 1]
        loss = learner(images)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        learner.update_moving_average()
    clock.tick()
    return Trained(pooled(resnet), clock.stamps)


# ---- lightly --------------------------------------------------------------------------------------
class _PilViews(Dataset):
    """What torchvision's CIFAR10 does in lightly's example: uint8 array in memory -> PIL -> transform."""

    def __init__(self, pixels: Tensor, transform: Callable) -> None:
        self.pixels = pixels.permute(0, 2, 3, 1).numpy()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, index: int):
        from PIL import Image

        return self.transform(Image.fromarray(np.ascontiguousarray(self.pixels[index]))), 0


class _LightlyBYOL(nn.Module):
    """The model class of lightly's BYOL example."""

    def __init__(self, backbone: nn.Module) -> None:
        from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
        from lightly.models.utils import deactivate_requires_grad

        super().__init__()
        self.backbone = backbone
        self.projection_head = BYOLProjectionHead(512, HIDDEN, OUT)
        self.prediction_head = BYOLPredictionHead(OUT, HIDDEN, OUT)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)

    def forward(self, x: Tensor) -> Tensor:
        return self.prediction_head(self.projection_head(self.backbone(x).flatten(start_dim=1)))

    def forward_momentum(self, x: Tensor) -> Tensor:
        return self.projection_head_momentum(self.backbone_momentum(x).flatten(start_dim=1)).detach()


def train_lightly(setup: Setup) -> Trained:
    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.utils import update_momentum
    from lightly.transforms.byol_transform import BYOLTransform, BYOLView1Transform, BYOLView2Transform
    from lightly.utils.scheduler import cosine_schedule

    torch.manual_seed(setup.seed)
    model = _LightlyBYOL(nn.Sequential(*list(resnet18().children())[:-1])).to(setup.device)
    # The example's CIFAR-10 settings (input_size 32 there, no blur on small images).
    transform = BYOLTransform(view_1_transform=BYOLView1Transform(input_size=setup.size, gaussian_blur=0.0),
                              view_2_transform=BYOLView2Transform(input_size=setup.size, gaussian_blur=0.0))
    criterion = NegativeCosineSimilarity()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.06, momentum=0.9)
    clock = Clock()
    data = forever(batches(setup, _PilViews(setup.pixels, transform), workers=setup.workers))
    for step in range(setup.steps):
        clock.tick()
        (x0, x1), _ = next(data)
        momentum = cosine_schedule(step, setup.steps, 0.996, 1)
        update_momentum(model.backbone, model.backbone_momentum, m=momentum)
        update_momentum(model.projection_head, model.projection_head_momentum, m=momentum)
        x0, x1 = x0.to(setup.device), x1.to(setup.device)
        p0, z0 = model(x0), model.forward_momentum(x0)
        p1, z1 = model(x1), model.forward_momentum(x1)
        loss = 0.5 * (criterion(p0, z1) + criterion(p1, z0))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    clock.tick()
    return Trained(nn.Sequential(model.backbone, nn.Flatten(1)), clock.stamps)


# ---- the ideal step -------------------------------------------------------------------------------
def byol_nb_config(setup: Setup) -> "TrainConfig":  # noqa: F821 (imported lazily)
    """byol_nb's configuration for ``setup``: the peers' shared model shape, or, with ``setup.flags``,
    the recipe ``python -m byol_nb.train`` builds from those flags (its ``--data`` preset included)
    at the setup's image size, batch and seed."""
    from byol_nb.cli import build_parser, config_from_args
    from byol_nb.config import TrainConfig

    if not setup.flags:
        return TrainConfig(image_size=setup.size, batch_size=setup.batch, proj_hidden=HIDDEN, proj_dim=OUT,
                           seed=setup.seed)
    args = build_parser().check([*setup.flags, "--image-size", str(setup.size), "--batch-size", str(setup.batch),
                                 "--seed", str(setup.seed)])
    return config_from_args(args)


def byol_nb_module(config: "TrainConfig", device: torch.device) -> "BYOLModule":  # noqa: F821 (imported lazily)
    """byol_nb's LightningModule as ``python -m byol_nb.train`` builds it, CPU speed-ups included."""
    from byol_nb.cpu_speed import speed_up_for_cpu
    from byol_nb.module import BYOLModule

    module = BYOLModule(config)
    if device.type == "cpu":
        speed_up_for_cpu(module.nets)
    return module


def model_step(nets: "BYOLNetworks", both: Tensor, bf16: bool) -> None:  # noqa: F821 (byol_nb is imported lazily)
    """The model work every BYOL step must do: online forward and backward, target forward, the
    loss (byol_nb's own forward: ``BYOLNetworks.forward`` and ``instance_loss``)."""
    with torch.autocast(both.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = nets.instance_loss(nets(both))
    nets.zero_grad(set_to_none=True)
    loss.backward()


def fixed_views(setup: Setup, config: "TrainConfig", images: Tensor) -> Tensor:  # noqa: F821 (imported lazily)
    """The ideal step's input: both views of ``images`` (uint8), augmented once with the run's
    recipe, stacked on the batch, channels_last on the run's device, as byol_nb's step feeds its networks."""
    from byol_nb.augment import AugmentConfig, TwoViewAugment

    augment = TwoViewAugment(AugmentConfig.from_train_config(config)).to(setup.device)
    view1, view2 = augment(images.to(setup.device), seed=setup.seed)
    return torch.cat([view1.images, view2.images]).contiguous(memory_format=torch.channels_last)


def ideal_step(setup: Setup) -> Trained:
    """byol_nb's networks and loss on fixed, already augmented views: no data, no augmentation, no
    optimizer, no EMA, no Lightning. Memory format and precision are those of byol_nb's step."""
    from byol_nb.devices import resolve_precision

    torch.manual_seed(setup.seed)
    device = setup.device
    config = byol_nb_config(setup)
    # The module's own networks, so the ideal follows whatever layout byol_nb trains with.
    nets = byol_nb_module(config, device).nets.to(device)
    both = fixed_views(setup, config, setup.pixels[: setup.batch])
    bf16 = resolve_precision(setup.precision, "auto") == "bf16-mixed"
    clock = Clock()
    for _ in range(setup.steps):
        clock.tick()
        model_step(nets, both, bf16)
    clock.tick()
    return Trained(nets.backbone, clock.stamps)


PEERS: dict[str, Callable[[Setup], Trained]] = {
    "byol_nb": train_byol_nb,
    "byol-pytorch": train_byol_pytorch,
    "lightly": train_lightly,
}
RUNNERS: dict[str, Callable[[Setup], Trained]] = {**PEERS, "ideal": ideal_step}
