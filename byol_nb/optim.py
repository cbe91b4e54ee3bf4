"""Optimizers and the learning-rate schedule.

The learning rate is given per 256 images and scaled with the *global* batch (all processes and
nodes), so a run keeps its dynamics when it moves to more GPUs. The schedule is per optimizer step:
linear warmup, then cosine decay to zero.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

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

    The trust ratio stays on the parameters' device: the step never waits for a value to reach the
    host.

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
            for w in group["params"]:
                if w.grad is None:
                    continue
                d = w.grad.add(w, alpha=group["weight_decay"])
                if group["lars"]:
                    w_norm, d_norm = torch.linalg.vector_norm(w), torch.linalg.vector_norm(d)
                    trust = torch.where((w_norm > 0) & (d_norm > 0), group["trust_coefficient"] * w_norm / d_norm, 1.0)
                    if group["clip"]:
                        trust = (trust / group["lr"]).clamp(max=1.0)
                    d.mul_(trust)
                state = self.state[w]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(w)
                b = state["momentum_buffer"]
                b.mul_(group["momentum"]).add_(d)
                w.add_(b, alpha=-group["lr"])
        return loss


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
