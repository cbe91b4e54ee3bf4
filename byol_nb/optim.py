"""Optimizers and the learning-rate schedule.

The learning rate is given per 256 images and scaled with the *global* batch (all processes and
nodes), so a run keeps its dynamics when it moves to more GPUs. The schedule is per optimizer step:
linear warmup, then cosine decay to zero.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor, nn
from torch.optim.sgd import sgd

from byol_nb.config import OPTIMIZERS


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as BYOL uses it: SGD with momentum whose update of each weight tensor
    ``w`` is rescaled by the trust ratio ``eta ||w|| / ||g + wd w||``::

        d = g + wd w
        d = d * eta ||w|| / ||d||        (the ratio is 1 where either norm is 0)
        b = m b + d
        w = w - lr b

    Parameter groups with ``lars=False`` skip the rescaling: :func:`parameter_groups` puts biases
    and normalisation layers there, without weight decay, as in the paper.

    ``clip=True`` is solo-learn's variant (its CIFAR BYOL recipe uses it with ``eta = 0.02``): the
    ratio becomes ``min(ratio / lr, 1)`` with ``lr`` the group's rate at this step, so a layer's own
    rate ``lr * ratio`` never exceeds the global one: while ``lr`` is small (early in warmup), the
    layers whose ratio exceeds it move as under plain SGD. solo-learn divides by
    ``||g|| + wd ||w||`` rather than ``||g + wd w||``; by the triangle inequality its denominator is
    the larger, so its ratio is the smaller, by a relative amount of at most about
    ``2 wd ||w|| / ||g||`` (none when ``g`` and ``w`` point the same way). It also skips decay and
    ratio where ``g`` is zero, so such a weight stays put, while here (``wd > 0``) its update is
    ``eta w``. The paper's denominator stays here, with or without the clip.

    The trust ratios of a group are computed together (:func:`lars_updates`) and the momentum step
    is PyTorch's multi-tensor SGD (:func:`torch.optim.sgd.sgd`): on a GPU, a few kernel launches for
    a whole group rather than several per tensor. Nothing is read back to the host.

    >>> w = torch.nn.Parameter(torch.ones(2, 2, dtype=torch.float64))  # ||w|| = 2
    >>> w.grad = torch.full((2, 2), 3.0, dtype=torch.float64)  # ||g|| = 6: ratio 0.02 * 2 / 6 = 1/150
    >>> LARS([w], lr=0.001, momentum=0.0, trust_coefficient=0.02).step()
    >>> round(1 - w[0, 0].item(), 8)  # lr * ratio * g = 0.001 * 3 / 150
    2e-05
    >>> w = torch.nn.Parameter(torch.ones(2, 2, dtype=torch.float64))
    >>> w.grad = torch.full((2, 2), 3.0, dtype=torch.float64)
    >>> LARS([w], lr=0.001, momentum=0.0, trust_coefficient=0.02, clip=True).step()
    >>> round(1 - w[0, 0].item(), 6)  # ratio / lr = 6.7, clipped to 1: plain SGD, lr * g
    0.003
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, clip: bool = False) -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, clip=clip, lars=True)
        super().__init__(params, defaults)

    def __setstate__(self, state: dict) -> None:
        """Loading a state dict replaces the groups with the saved ones: a checkpoint from before
        ``clip`` existed gets the paper's LARS."""
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("clip", False)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            weights = [w for w in group["params"] if w.grad is not None]
            if not weights:
                continue
            if group["lars"]:
                updates = lars_updates(weights, group["weight_decay"], group["trust_coefficient"],
                                       group["lr"] if group["clip"] else None)
                decay = 0.0  # already in the updates
            else:
                updates, decay = [w.grad for w in weights], group["weight_decay"]
            self._momentum_step(weights, updates, group, decay)
        return loss

    def _momentum_step(self, weights: list[Tensor], updates: list[Tensor], group: dict, decay: float) -> None:
        """``b = m b + (d + decay w)``, ``w = w - lr b``: PyTorch's SGD on the updates ``d``, its
        momentum buffers kept in this optimizer's state (a new one starts as ``d``)."""
        buffers = [self.state[w].get("momentum_buffer") for w in weights]
        sgd(weights, updates, buffers, foreach=True, weight_decay=decay, momentum=group["momentum"],
            lr=group["lr"], dampening=0.0, nesterov=False, maximize=False)
        for w, b in zip(weights, buffers):
            if b is not None:
                self.state[w]["momentum_buffer"] = b


def lars_updates(weights: list[Tensor], weight_decay: float, trust_coefficient: float,
                 clip_lr: float | None = None) -> list[Tensor]:
    """``d = (g + wd w) * ratio`` for each weight, ``ratio = eta ||w|| / ||g + wd w||`` (1 where a
    norm is 0: a zero weight moves by its plain update rather than staying at zero for ever), or
    ``min(ratio / clip_lr, 1)`` with ``clip_lr``.

    The ratios of all the weights are computed as one vector, in a few kernel launches rather than
    several per weight; each ``d``'s norm is taken as soon as ``d`` is made, while it is in cache."""
    updates, w_norms, d_norms = [], [], []
    for w in weights:
        d = w.grad.add(w, alpha=weight_decay)
        updates.append(d)
        w_norms.append(torch.linalg.vector_norm(w))
        d_norms.append(torch.linalg.vector_norm(d))
    w_norm, d_norm = torch.stack(w_norms), torch.stack(d_norms)
    ratios = torch.where((w_norm > 0) & (d_norm > 0), trust_coefficient * w_norm / d_norm, 1.0)
    if clip_lr is not None:
        ratios = (ratios / clip_lr).clamp(max=1.0)
    for d, ratio in zip(updates, ratios.unbind()):
        d.mul_(ratio)
    return updates


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weights of linear and conv layers decay; biases and normalisation parameters (1-D) do not."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [dict(params=decay, weight_decay=weight_decay),
            dict(params=no_decay, weight_decay=0.0, lars=False)]


def build_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float, trust_coefficient: float = 0.001,
                    clip: bool = False) -> torch.optim.Optimizer:
    """LARS (BYOL's), SGD with momentum or AdamW over ``model``'s trainable parameters.
    ``trust_coefficient`` and ``clip`` are LARS's (see :class:`LARS`); the other two ignore them."""
    groups = parameter_groups(model, weight_decay)
    if name == "lars":
        return LARS(groups, lr=lr, weight_decay=weight_decay, trust_coefficient=trust_coefficient, clip=clip)
    for group in groups:
        group.pop("lars", None)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}: choose one of {', '.join(OPTIMIZERS)}")


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate multiplier at ``step``: linear warmup to 1, then cosine decay to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
