"""BYOL in one plain PyTorch loop (no Lightning), for the lessons and their ablations.

:class:`byol_nb.module.BYOLModule` is the real trainer. This loop uses the very same pieces
(augmentation, networks, loss, EMA schedule) so that a notebook can switch one of them off and
watch what happens in a minute on a CPU::

    nets, history = train_minimal(images, steps=50)                       # BYOL
    nets, history = train_minimal(images, steps=50, use_predictor=False)  # collapses
    nets, history = train_minimal(images, steps=50, use_ema=False)        # target = online copy
    nets, history = train_minimal(images, steps=50, use_stop_grad=False)  # gradient through both branches

``history`` holds, per step, the loss, the momentum tau and the spread of the online projections
(:func:`byol_nb.metrics.collapse_std`: about 1 for embeddings spread over the sphere, 0 when every
image lands on the same point); with ``monitor`` also the kNN accuracy of the backbone
(``knn_step``, ``knn``), as the Lightning trainer logs them.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from byol_nb.augment import AugmentConfig, TwoViewAugment
from byol_nb.cpu_speed import speed_up_for_cpu
from byol_nb.ema import cosine_momentum, ema_update_
from byol_nb.features import extract_features
from byol_nb.metrics import collapse_std, knn_top1
from byol_nb.models import Backbone, BYOLNetworks
from byol_nb.optim import build_optimizer, warmup_cosine


def byol_step(nets: BYOLNetworks, augment: TwoViewAugment, images: Tensor, use_predictor: bool = True,
              use_stop_grad: bool = True, seed: int | None = None) -> tuple[Tensor, Tensor]:
    """Forward pass of one BYOL step: returns (loss, online projections of both views).

    Without the predictor, view 1's projection must match view 2's target projection directly.
    Without the stop-gradient, the target branch is the online encoder itself and the gradient flows
    through both branches (SimSiam's ablation).
    """
    view1, view2 = augment(images, seed=seed)
    outputs = nets(torch.cat([view1.images, view2.images]))
    if not use_stop_grad:
        outputs = outputs._replace(target_projection=outputs.projection)
    return nets.instance_loss(outputs, use_predictor=use_predictor, stop_gradient=use_stop_grad), outputs.projection


def train_minimal(images: Tensor, steps: int, batch_size: int = 32, *, use_predictor: bool = True,
                  use_ema: bool = True, use_stop_grad: bool = True, tau_base: float = 0.99,
                  augment: AugmentConfig | None = None, optimizer: str = "sgd", lr: float = 0.05,
                  weight_decay: float = 1e-5, warmup_steps: int = 0, hidden_dim: int = 256, out_dim: int = 64,
                  backbone: str = "resnet18", seed: int = 0, monitor: tuple[Dataset, Dataset] | None = None,
                  monitor_every: int = 10, callback: Callable[[int, dict[str, list[float]]], None] | None = None,
                  device: str | torch.device = "cpu") -> tuple[BYOLNetworks, dict[str, list[float]]]:
    """Train BYOL for ``steps`` steps on a uint8 image tensor (N, 3, S, S); returns (nets, history).

    ``augment`` is the views' recipe (default: the paper's, at the images' size); ``optimizer`` one
    of ``byol_nb.optim``'s, with ``lr`` used as given (not scaled with the batch), after a linear
    warmup of ``warmup_steps`` then a cosine decay. ``use_ema=False`` sets tau = 0: after every step
    the target becomes an exact copy of the online network (a stop-gradient but no moving average).
    ``monitor=(bank, queries)``, two labeled datasets, scores the backbone with kNN before training,
    every ``monitor_every`` steps and at the end. ``callback(step, history)`` runs after each step.
    Everything runs on ``device``: the networks, the augmentation, each batch and the monitor's
    features (the images stay where they are; a batch is copied over when drawn).
    """
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 images (N, 3, S, S), got {images.dtype} {tuple(images.shape)}")
    if len(images) < 2:
        raise ValueError("need at least 2 images: BatchNorm cannot train on a batch of one")
    torch.manual_seed(seed)
    device = torch.device(device)
    nets = BYOLNetworks(Backbone(backbone), hidden_dim, out_dim).to(device)
    if device.type == "cpu":
        speed_up_for_cpu(nets)  # matrix-product convolutions on tiny maps; see cpu_speed.py
    views = TwoViewAugment(augment or AugmentConfig(images.shape[-1])).to(device)
    trained = nn.ModuleList([nets.online] + ([nets.predictor] if use_predictor else []))
    optimizer_ = build_optimizer(optimizer, trained, lr, weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer_, lambda step: warmup_cosine(step, warmup_steps, steps))
    generator = torch.Generator().manual_seed(seed)
    history: dict[str, list[float]] = {"loss": [], "collapse_std": [], "tau": []}
    if monitor is not None:
        history.update(knn_step=[], knn=[])

    def score(step: int) -> None:
        bank_x, bank_y = extract_features(nets.backbone, monitor[0], device=device)
        query_x, query_y = extract_features(nets.backbone, monitor[1], device=device)
        history["knn_step"].append(step)
        history["knn"].append(knn_top1(bank_x, bank_y, query_x, query_y))

    batch_size = min(batch_size, len(images))
    nets.train()
    if monitor is not None:
        score(0)
    for step in range(steps):
        index = torch.randperm(len(images), generator=generator)[:batch_size]
        loss, projection = byol_step(nets, views, images[index].to(device), use_predictor, use_stop_grad,
                                     seed=seed * 100_003 + step)
        optimizer_.zero_grad(set_to_none=True)
        loss.backward()
        optimizer_.step()
        schedule.step()
        tau = cosine_momentum(step, steps, tau_base) if use_ema else 0.0
        ema_update_(nets.target, nets.online, tau)
        history["loss"].append(loss.item())
        history["collapse_std"].append(collapse_std(projection.detach()).item())
        history["tau"].append(tau)
        if monitor is not None and ((step + 1) % monitor_every == 0 or step + 1 == steps):
            score(step + 1)
        if callback is not None:
            callback(step, history)
    return nets, history
