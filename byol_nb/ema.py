"""BYOL's target network: an exponential moving average (EMA) of the online network.

After every optimizer step, ``xi <- tau xi + (1 - tau) theta`` for the target's parameters *and*
its BatchNorm running statistics, with ``tau`` rising from ``tau_base`` to 1 along a cosine over
the global optimizer step (so a resumed run continues the schedule where it stopped).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def cosine_momentum(step: int, total_steps: int, base: float = 0.996) -> float:
    """tau at global step ``step`` of ``total_steps``: ``base`` at 0, rising to 1 at the end."""
    if total_steps <= 0:
        return base
    progress = min(max(step / total_steps, 0.0), 1.0)
    return 1 - (1 - base) * (math.cos(math.pi * progress) + 1) / 2


@torch.no_grad()
def ema_update_(target: nn.Module, online: nn.Module, tau: float) -> None:
    """Move ``target`` towards ``online`` in place: ``target <- tau target + (1 - tau) online`` for
    every parameter and floating-point buffer (BatchNorm's running mean and variance); integer
    buffers (BatchNorm's batch counter) are copied. Both must have the same architecture."""
    target_params, online_params = list(target.parameters()), list(online.parameters())
    if len(target_params) != len(online_params):
        raise ValueError("target and online networks have different parameter lists")
    for t, o in zip(target_params, online_params):
        t.lerp_(o, 1 - tau)
    for t, o in zip(target.buffers(), online.buffers()):
        if t.is_floating_point():
            t.lerp_(o, 1 - tau)
        else:
            t.copy_(o)
