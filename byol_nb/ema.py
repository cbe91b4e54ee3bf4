"""The target network's update: an exponential moving average with a cosine momentum schedule.

    xi <- tau * xi + (1 - tau) * theta          (parameters *and* BatchNorm buffers)
    tau_k = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2

``k`` is the *global optimizer step*, stored in every checkpoint, so a resumed run continues the
schedule where it stopped instead of restarting at ``tau_base``.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor, nn


def cosine_momentum(step: int, total_steps: int, base: float = 0.996) -> float:
    """tau at global step ``step`` of ``total_steps``: ``base`` at 0, rising to 1 at the end."""
    if total_steps <= 0:
        return base
    progress = min(max(step / total_steps, 0.0), 1.0)
    return 1 - (1 - base) * (math.cos(math.pi * progress) + 1) / 2


@torch.no_grad()
def ema_update_(target: nn.Module, online: nn.Module, tau: float, skip: Iterable[Tensor] = ()) -> None:
    """Move ``target`` towards ``online`` in place; both must have the same architecture.

    Floating-point parameters and buffers (BN running mean/var) are averaged with one fused
    ``torch._foreach_lerp_`` per group; integer buffers (BN's batch counter) are copied. Target
    parameters in ``skip`` are left alone: the optimizer already moved them (:func:`target_pairs`).
    """
    target_params, online_params = list(target.parameters()), list(online.parameters())
    if len(target_params) != len(online_params):
        raise ValueError("target and online networks have different parameter lists")
    skipped = {id(t) for t in skip}
    buffer_pairs = list(zip(target.buffers(), online.buffers()))
    pairs = [(t, o) for t, o in zip(target_params, online_params) if id(t) not in skipped]
    pairs += [(t, o) for t, o in buffer_pairs if t.is_floating_point()]
    if pairs:
        torch._foreach_lerp_([t for t, _ in pairs], [o.detach() for _, o in pairs], 1 - tau)
    for t, o in buffer_pairs:
        if not t.is_floating_point():
            t.copy_(o)


def target_pairs(target: nn.Module, online: nn.Module, optimizer: torch.optim.Optimizer) -> dict[Tensor, Tensor]:
    """Each parameter ``optimizer`` updates, mapped to its copy in ``target``: what an optimizer that
    can carry the EMA (``LARS.step(follow=...)``) moves right after each update, while the fresh
    weights are in cache, so that :func:`ema_update_` (with ``skip``) need not read them again."""
    copies = {id(o): t for o, t in zip(online.parameters(), target.parameters())}
    return {p: copies[id(p)] for group in optimizer.param_groups for p in group["params"] if id(p) in copies}
