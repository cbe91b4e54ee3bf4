"""BYOL's target network: an exponential moving average (EMA) of the online network.

After every optimizer step, ``xi <- tau xi + (1 - tau) theta`` for the target's parameters *and*
its BatchNorm running statistics, with ``tau`` rising from ``tau_base`` to 1 along a cosine over
the global optimizer step (so a resumed run continues the schedule where it stopped).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.swa_utils import get_ema_multi_avg_fn


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
    buffers (BatchNorm's batch counter) are copied. Both must have the same architecture.

    The floating-point tensors move together through PyTorch's own EMA of many tensors
    (:func:`torch.optim.swa_utils.get_ema_multi_avg_fn`, a multi-tensor ``lerp``): a few kernel
    launches for the whole network rather than one per tensor, with the same formula. PyTorch has
    no public multi-tensor copy, so the integer counters are still copied one by one.

    >>> online, target = nn.Linear(3, 2), nn.Linear(3, 2)
    >>> gap = online.weight - target.weight
    >>> ema_update_(target, online, tau=0.9)
    >>> torch.allclose(online.weight - target.weight, 0.9 * gap)  # it closed (1 - tau) of the gap
    True
    """
    target_params, online_params = list(target.parameters()), list(online.parameters())
    if len(target_params) != len(online_params):
        raise ValueError("target and online networks have different parameter lists")
    pairs = [*zip(target_params, online_params), *zip(target.buffers(), online.buffers())]
    floats = [(t, o) for t, o in pairs if t.is_floating_point()]
    get_ema_multi_avg_fn(tau)([t for t, _ in floats], [o for _, o in floats], None)
    for t, o in pairs:
        if not t.is_floating_point():
            t.copy_(o)
