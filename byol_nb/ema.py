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


class EMAUpdate:
    """The EMA step for one (target, online) pair of networks, listed once and applied every step.

    Floating-point parameters and buffers (BN running mean/var) are averaged with one fused
    ``torch._foreach_lerp_``; integer buffers (BN's batch counter) are copied. Target parameters in
    ``skip`` are left alone: the optimizer already moved them (:func:`target_pairs`).

    Listing the tensors walks both module trees, 0.6 ms for ResNet-18 and its heads against 0.05 ms
    for the update itself, so a training run lists them once: the parameters and buffers stay the
    same tensor objects for a whole fit (checkpoints load into them in place).
    """

    def __init__(self, target: nn.Module, online: nn.Module, skip: Iterable[Tensor] = ()) -> None:
        target_params, online_params = list(target.parameters()), list(online.parameters())
        if len(target_params) != len(online_params):
            raise ValueError("target and online networks have different parameter lists")
        skipped = {id(t) for t in skip}
        buffer_pairs = list(zip(target.buffers(), online.buffers()))
        averaged = [(t, o) for t, o in zip(target_params, online_params) if id(t) not in skipped]
        averaged += [(t, o) for t, o in buffer_pairs if t.is_floating_point()]
        copied = [(t, o) for t, o in buffer_pairs if not t.is_floating_point()]
        self.averaged = ([t for t, _ in averaged], [o.detach() for _, o in averaged])
        self.copied = ([t for t, _ in copied], [o for _, o in copied])

    @torch.no_grad()
    def apply_(self, tau: float) -> None:
        """``target <- tau target + (1 - tau) online`` for the averaged tensors; copy the rest."""
        if self.averaged[0]:
            torch._foreach_lerp_(*self.averaged, 1 - tau)
        if self.copied[0]:
            torch._foreach_copy_(*self.copied)


def ema_update_(target: nn.Module, online: nn.Module, tau: float, skip: Iterable[Tensor] = ()) -> None:
    """Move ``target`` towards ``online`` in place (:class:`EMAUpdate`); both must have the same architecture."""
    EMAUpdate(target, online, skip).apply_(tau)


def target_pairs(target: nn.Module, online: nn.Module, optimizer: torch.optim.Optimizer) -> dict[Tensor, Tensor]:
    """Each parameter ``optimizer`` updates, mapped to its copy in ``target``: what an optimizer that
    can carry the EMA (``LARS.step(follow=...)``) moves right after each update, while the fresh
    weights are in cache, so that :class:`EMAUpdate` (with ``skip``) need not read them again."""
    copies = {id(o): t for o, t in zip(online.parameters(), target.parameters())}
    return {p: copies[id(p)] for group in optimizer.param_groups for p in group["params"] if id(p) in copies}
