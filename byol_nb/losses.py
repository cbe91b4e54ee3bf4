"""Losses. This file holds BYOL's instance loss; PixPro's pixel losses live beside it."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def byol_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """Per-sample ``2 - 2 cos(q, z')`` (B,). The target is detached here: it is a stop-gradient."""
    return 2 - 2 * F.cosine_similarity(prediction, target.detach(), dim=-1)


def symmetric_byol_loss(p1: Tensor, p2: Tensor, z1: Tensor, z2: Tensor) -> Tensor:
    """BYOL's loss: view 1 predicts view 2's target projection *plus* the reverse, batch-averaged.

    The two directions are summed, as in the paper, not averaged (averaging halves the gradient
    and silently changes the effective learning rate). Per-sample, so it needs no cross-device
    gather: DDP's gradient averaging already gives the global-batch mean.
    """
    return (byol_loss(p1, z2) + byol_loss(p2, z1)).mean()
