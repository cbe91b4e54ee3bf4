"""Losses. This file holds BYOL's instance loss; PixPro's pixel losses live beside it."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from byol_nb.distributed import global_mean, rank


def byol_loss(prediction: Tensor, target: Tensor, stop_gradient: bool = True) -> Tensor:
    """Per-sample ``2 - 2 cos(q, z')`` (B,). The target is detached here: it is a stop-gradient
    (``stop_gradient=False`` only for lesson 02's ablation, where the loss then collapses).

    Computed in float32 at least: under bf16 autocast the heads' outputs are bf16, and a cosine in
    bf16 keeps about three significant digits, while near convergence the loss and its gradient
    live in the third digit (cos 0.995 and 0.999 are one bf16 step apart).
    """
    dtype = torch.promote_types(prediction.dtype, torch.float32)
    target = target.detach() if stop_gradient else target
    return 2 - 2 * F.cosine_similarity(prediction.to(dtype), target.to(dtype), dim=-1)


def symmetric_byol_loss(p1: Tensor, p2: Tensor, z1: Tensor, z2: Tensor) -> Tensor:
    """BYOL's loss: view 1 predicts view 2's target projection *plus* the reverse, batch-averaged.

    The two directions are summed, as in the paper, not averaged (averaging halves the gradient
    and silently changes the effective learning rate). Per-sample, so it needs no cross-device
    gather: DDP's gradient averaging gives the global-batch mean (exactly so when BatchNorm, which
    couples the samples of a batch, is synchronised too).

    >>> z = torch.randn(8, 256)
    >>> round(float(symmetric_byol_loss(z, z, z, z)), 4)  # each prediction on its target: 2 - 2 cos = 0
    0.0
    >>> round(float(symmetric_byol_loss(z, z, -z, -z)), 4)  # opposite: 4 in each direction, summed
    8.0
    """
    return (byol_loss(p1, z2) + byol_loss(p2, z1)).mean()


def multi_crop_byol_loss(p1: Tensor, p2: Tensor, z1: Tensor, z2: Tensor, local: Sequence[Tensor],
                         stop_gradient: bool = True) -> Tensor:
    """BYOL's loss with multi-crop views: each local view's prediction also predicts both main
    views' target projections (the target sees only the main views, as in DINO and SwAV).

    Every (prediction, target) pair weighs the same, and the sum is divided by ``1 + len(local)``
    (the main pair counts once, each local view once): with no local views this is
    :func:`symmetric_byol_loss` exactly, and with them the loss keeps its scale.
    """
    total = byol_loss(p1, z2, stop_gradient) + byol_loss(p2, z1, stop_gradient)
    for prediction in local:
        total = total + byol_loss(prediction, z1, stop_gradient) + byol_loss(prediction, z2, stop_gradient)
    return total.mean() / (1 + len(local))


# ---- PixPro: pixel-level losses -----------------------------------------------------------------
#
# Feature-map cells are numbered row-major: cell ``r * W + c`` is row ``r`` (top to bottom), column
# ``c`` (left to right) of an (H, W) map, i.e. ``rearrange(fmap, "b c h w -> b c (h w)")``. Every
# mask and pixel loss below uses that order.

def _cell_centres(boxes: Tensor, flips: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
    """Centres (x, y), each (B, H*W), of a view's feature-map cells in original-image coordinates,
    and each cell's diagonal (B, 1, 1), in the official code's arithmetic order.

    A flip swaps the box's x0 and x1 (as the official ``RandomHorizontalFlipCoord`` does), which makes
    the bin width negative: column 0 of a mirrored view then sits at the box's right edge.
    """
    height, width = size
    x0, y0, x1, y1 = boxes.unbind(1)
    x_start, x_end = torch.where(flips, x1, x0), torch.where(flips, x0, x1)
    bin_w = ((x_end - x_start) / width).view(-1, 1, 1)
    bin_h = ((y1 - y0) / height).view(-1, 1, 1)
    cols = torch.arange(width, dtype=boxes.dtype, device=boxes.device).view(1, 1, -1)
    rows = torch.arange(height, dtype=boxes.dtype, device=boxes.device).view(1, -1, 1)
    centre_x = ((cols + 0.5) * bin_w + x_start.view(-1, 1, 1)).expand(-1, height, width)
    centre_y = ((rows + 0.5) * bin_h + y0.view(-1, 1, 1)).expand(-1, height, width)
    diagonal = torch.sqrt(bin_w**2 + bin_h**2)
    cells = "b h w -> b (h w)"
    return rearrange(centre_x, cells), rearrange(centre_y, cells), diagonal


def cell_distances(boxes1: Tensor, flips1: Tensor, boxes2: Tensor, flips2: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, H*W, H*W): ``[b, i, j]`` is the distance between cell ``i`` of view 1 and cell ``j`` of
    view 2 of sample ``b``, measured where they lie in the original image, in cell diagonals.

    As in the official code (zdaxie/PixPro, ``regression_loss``): each cell's centre is placed in the
    original image's normalised coordinates through that sample's crop box (a flip reverses x), and
    the distance between every pair of centres is divided by the *larger* of the two views' cell
    diagonals. Boxes are (B, 4) ``(x0, y0, x1, y1)`` in [0, 1] and flips (B,) bool, as
    :class:`byol_nb.augment.View` carries them; ``size`` is the feature map's (H, W).
    """
    if boxes1.shape != boxes2.shape or boxes1.ndim != 2 or boxes1.shape[1] != 4:
        raise ValueError(f"boxes must both be (batch, 4); got {tuple(boxes1.shape)} and {tuple(boxes2.shape)}")
    x1, y1, diag1 = _cell_centres(boxes1, flips1.bool(), size)
    x2, y2, diag2 = _cell_centres(boxes2, flips2.bool(), size)
    distance = torch.sqrt((x1.unsqueeze(2) - x2.unsqueeze(1)) ** 2 + (y1.unsqueeze(2) - y2.unsqueeze(1)) ** 2)
    return distance / torch.max(diag1, diag2)


def positive_pixel_mask(boxes1: Tensor, flips1: Tensor, boxes2: Tensor, flips2: Tensor,
                        size: tuple[int, int], threshold: float = 0.7) -> Tensor:
    """PixPro's positive pairs: (B, H*W, H*W) bool, ``[b, i, j]`` True when cell ``i`` of view 1 and
    cell ``j`` of view 2 of sample ``b`` lie closer than ``threshold`` cell diagonals (0.7 in the
    paper) in the original image (:func:`cell_distances`).

    The mask is per sample: it must come from *this* step's boxes, never be shared across a batch.

    >>> whole, plain, mirrored = torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([False]), torch.tensor([True])
    >>> same = positive_pixel_mask(whole, plain, whole, plain, size=(4, 4))
    >>> torch.equal(same[0], torch.eye(16, dtype=torch.bool))  # one view twice: each cell pairs with itself
    True
    >>> positive_pixel_mask(whole, plain, whole, mirrored, size=(4, 4))[0, 0].nonzero().flatten().tolist()
    [3]

    The top-left cell (0) of a view is the top-right cell (3) of its mirror image.
    """
    return cell_distances(boxes1, flips1, boxes2, flips2, size) < threshold


def pixpro_loss(prediction: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """One direction of PixPro's pixel loss: ``-2 x`` the batch mean of each image's mean cosine
    between the propagated online pixels ``prediction`` and the target pixels of the other view
    ``target`` (both (B, C, H, W)) over its positive pairs ``mask`` (B, H*W, H*W).

    An image without a positive pair (the crops do not overlap) contributes 0 and still counts in
    the batch mean, as in the official code; no division by zero. The target is detached.
    """
    with torch.autocast(prediction.device.type, enabled=False):  # a bf16 product would round every cosine
        p = F.normalize(rearrange(prediction.float(), "b c h w -> b c (h w)"), dim=1)
        t = F.normalize(rearrange(target.detach().float(), "b c h w -> b c (h w)"), dim=1)
        cosine = torch.einsum("bci,bcj->bij", p, t)  # [b, i, j] = cos(p_i, t_j)
    weights = mask.to(cosine.dtype)
    per_image = (cosine * weights).sum((1, 2)) / weights.sum((1, 2)).clamp_min(1)
    return -2 * per_image.mean()


def symmetric_pixpro_loss(y1: Tensor, y2: Tensor, t1: Tensor, t2: Tensor, mask: Tensor) -> Tensor:
    """PixPro's pixel loss: PPM(view 1) against target(view 2) *plus* the reverse direction.

    ``mask`` is view 1 -> view 2 (from :func:`positive_pixel_mask`); the reverse direction's mask is
    its transpose, since the normalised distance is symmetric.
    """
    return pixpro_loss(y1, t2, mask) + pixpro_loss(y2, t1, mask.transpose(1, 2))


def pixel_contrast_loss(queries: Tensor, keys: Tensor, distance: Tensor, temperature: float = 0.3,
                        all_keys: Tensor | None = None, positive_below: float = 0.7,
                        negative_above: float = 1.0, offset: int | None = None) -> Tensor:
    """PixContrast (InfoNCE over pixels), one direction, averaged over query pixels with a positive.

    For query pixel ``i`` of image ``b`` (online, view 1), with ``d = distance[b, i, j]`` to key
    pixel ``j`` of the same image's other view (:func:`cell_distances`): the positives are the keys
    with ``d < positive_below``; the negatives are those with ``d > negative_above`` and every key
    pixel of every other image; keys in between are neither (as in the official code, whose
    ``--pixpro-pos-ratio`` and ``--pixpro-neg-ratio`` default to 0.7 and 1.0)::

        loss_i = -log( sum_{j positive} e^{cos(q_i, k_j) / T} / sum_{k positive or negative} e^{cos(q_i, k) / T} )

    ``queries``/``keys`` are this process's (B, C, H, W) tensors and ``distance`` (B, H*W, H*W) is
    local too. ``all_keys`` (M, C, H, W), gathered from every process and *including* this one's
    keys (from row ``offset``, by default ``rank x B`` as :func:`byol_nb.distributed.gather_with_grad`
    stacks them), only widens the set of negatives. Keys are detached (they come from the target
    network). Query pixels without any positive are left out of the mean, whose count is global
    across processes (:func:`byol_nb.distributed.global_mean`); a batch with none gives 0.
    """
    batch, cells = queries.shape[0], distance.shape[-1]
    if all_keys is None:
        all_keys, offset = keys, 0
    elif offset is None:
        offset = rank() * batch
    positive = rearrange(distance < positive_below, "b i j -> b i 1 j")
    neutral = rearrange(distance <= negative_above, "b i j -> b i 1 j") & ~positive
    # own[b, 0, m, 0]: image m of the key bank is image b itself (its other view)
    bank_images = torch.arange(len(all_keys), device=queries.device)
    own = rearrange(bank_images == torch.arange(batch, device=queries.device).unsqueeze(1) + offset,
                    "b m -> b 1 m 1")
    with torch.autocast(queries.device.type, enabled=False):  # logits and logsumexp in fp32, also under bf16
        q = F.normalize(rearrange(queries.float(), "b c h w -> b (h w) c"), dim=-1)
        bank = F.normalize(rearrange(all_keys.detach().float(), "m c h w -> (m h w) c"), dim=-1)
        logits = rearrange(q @ bank.T / temperature, "b i (m j) -> b i m j", j=cells)  # cos(q_bi, k_mj) / T
        # A large finite fill keeps rows without positives finite in the forward *and* backward pass.
        fill = torch.finfo(q.dtype).min
        log_numerator = rearrange(logits.masked_fill(~(own & positive), fill), "b i m j -> b i (m j)").logsumexp(-1)
        log_denominator = rearrange(logits.masked_fill(own & neutral, fill), "b i m j -> b i (m j)").logsumexp(-1)
    has_positive = (distance < positive_below).any(-1)
    per_pixel = torch.where(has_positive, log_denominator - log_numerator, torch.zeros_like(log_numerator))
    # The number of query pixels with a positive differs between processes: divide by the global count.
    return global_mean(per_pixel.sum(), has_positive.sum())


def symmetric_pixel_contrast_loss(q1: Tensor, q2: Tensor, k1: Tensor, k2: Tensor, distance: Tensor,
                                  temperature: float = 0.3, all_k1: Tensor | None = None,
                                  all_k2: Tensor | None = None, positive_below: float = 0.7,
                                  negative_above: float = 1.0, offset: int | None = None) -> Tensor:
    """Pixel contrast in both directions (view 1 queries against view 2 keys, and the reverse), summed.
    ``distance`` is view 1 -> view 2 (:func:`cell_distances`); the reverse uses its transpose."""
    return (pixel_contrast_loss(q1, k2, distance, temperature, all_k2, positive_below, negative_above, offset)
            + pixel_contrast_loss(q2, k1, distance.transpose(1, 2), temperature, all_k1, positive_below,
                                  negative_above, offset))
