"""CPU speed-ups, applied by the training entry point (``python -m byol_nb.train``) when it trains
on the CPU. Nothing in the lessons depends on them: a first read can skip this file.

**Convolutions on tiny feature maps as one matrix multiply.** On small images a ResNet's last
stages see feature maps of 2x2 or 1x1 cells (32 px images: layer3 and layer4). There oneDNN's
convolution kernels, which torch uses on CPUs, are far from the machine's speed, and the weight
gradient worst of all. Written as "gather the k x k patches, multiply by the weight matrix"
(im2col), the forward, the input gradient and the weight gradient are each one dense matrix
multiply, and the gathered patches are tiny because the maps are.

:class:`MatmulConv2d` is an ``nn.Conv2d`` (same parameters, same state dict, same results up to
float rounding) that takes the matmul path only when the output has at most ``MAX_MATMUL_CELLS``
cells; :func:`speed_up_for_cpu` swaps it into a network. Larger maps keep oneDNN's kernels, which
win there. Saved backbones hold only the weights, so ``byol_nb.load_backbone`` always returns
plain torchvision modules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Output cells (Ho x Wo) up to which the matmul path beats oneDNN's kernels on ResNet-18's
# convolutions; from 4x4 outputs on, oneDNN's kernels are faster (bench/conv_layers.py measures it).
MAX_MATMUL_CELLS = 4


def _output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Cells along one axis of a convolution's output (dilation 1)."""
    return (size + 2 * padding - kernel) // stride + 1


def _useful_taps(size: int, kernel: int, stride: int, padding: int) -> tuple[int, int, int, int]:
    """Along one axis: the kernel taps that ever touch the input, and the padding they still need.

    Returns ``(first tap, last tap + 1, padding before, padding after)``. On a 1x1 map a 3x3
    convolution with padding 1 only ever multiplies its centre tap with data (the other eight see
    zeros), so it is a plain matrix product with that tap: 9x less work and no patches to gather.
    """
    out = _output_size(size, kernel, stride, padding)
    first = max(0, padding - stride * (out - 1))
    last = min(kernel - 1, size - 1 + padding)
    before = padding - first
    after = max(0, (out - 1) * stride - before + (last - first) - (size - 1))
    return first, last + 1, before, after


def patch_matmul_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple[int, int],
                        padding: tuple[int, int]) -> Tensor:
    """``F.conv2d(x, weight, bias, stride, padding)`` for groups 1 and dilation 1, as im2col + matmul.

    Kernel taps that only ever see padding are dropped first (:func:`_useful_taps`). Patches and
    weight are both laid out channels-last, ``(kh, kw, C)`` per row: each row of the patch matrix
    is one output cell, the weight of a channels_last convolution is used where it lies in memory
    (a view, not a copy), and its gradient comes back channels_last, so autograd stores it as is
    instead of copying it into the parameter's layout. The result is a channels_last tensor.
    """
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))  # gather half as many bytes
    (h0, h1, top, bottom), (w0, w1, left, right) = (
        _useful_taps(size, kernel, step, pad)
        for size, kernel, step, pad in zip(x.shape[-2:], weight.shape[-2:], stride, padding))
    taps = _Taps.apply(weight, (h0, h1, w0, w1))  # (O, kh, kw, C)
    out_channels, kh, kw, in_channels = taps.shape
    cells = x.permute(0, 2, 3, 1)  # (B, H, W, C)
    if top or bottom or left or right:
        cells = F.pad(cells, (0, 0, left, right, top, bottom))
    patches = cells.unfold(1, kh, stride[0]).unfold(2, kw, stride[1])  # (B, Ho, Wo, C, kh, kw), a view
    batch, out_h, out_w = patches.shape[:3]
    rows = patches.permute(0, 1, 2, 4, 5, 3).reshape(batch * out_h * out_w, kh * kw * in_channels)
    out = F.linear(rows, taps.reshape(out_channels, kh * kw * in_channels), bias)
    return out.view(batch, out_h, out_w, out_channels).permute(0, 3, 1, 2)


class _Taps(torch.autograd.Function):
    """The kernel taps ``weight[:, :, h0:h1, w0:w1]`` as (O, kh, kw, C), a view of a channels_last
    weight, whose gradient is a fresh tensor laid out like the weight, as a convolution's is.

    Through plain views (permute, slice) the gradient would reach the weight as a view of another
    tensor; autograd then sums two uses of a layer (the main and the multi-crop views) out of place,
    into a tensor whose strides differ from the weight's where its sides are 1 (a 1x1 kernel), and
    DDP copies every such gradient into its bucket, with a warning."""

    @staticmethod
    def forward(ctx, weight: Tensor, box: tuple[int, int, int, int]) -> Tensor:  # type: ignore[override]
        h0, h1, w0, w1 = box
        ctx.box, ctx.shape, ctx.strides = box, weight.shape, weight.stride()
        return weight.permute(0, 2, 3, 1)[:, h0:h1, w0:w1]

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        h0, h1, w0, w1 = ctx.box
        weight_grad = grad.new_empty_strided(ctx.shape, ctx.strides).zero_()
        weight_grad.permute(0, 2, 3, 1)[:, h0:h1, w0:w1] = grad
        return weight_grad, None


class MatmulConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` that computes small outputs (at most ``MAX_MATMUL_CELLS`` cells) by matmul
    on the CPU; on any other device it is ``nn.Conv2d``."""

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu":
            return super().forward(x)
        out_h, out_w = (_output_size(size, kernel, step, pad)
                        for size, kernel, step, pad in zip(x.shape[-2:], self.kernel_size, self.stride, self.padding))
        if out_h * out_w > MAX_MATMUL_CELLS:
            return super().forward(x)
        return patch_matmul_conv2d(x, self.weight, self.bias, self.stride, self.padding)

    @classmethod
    def supports(cls, conv: nn.Module) -> bool:
        """Plain convolutions only: no groups, no dilation, zero padding given as numbers."""
        return (type(conv) is nn.Conv2d and conv.groups == 1 and conv.dilation == (1, 1)
                and conv.padding_mode == "zeros" and not isinstance(conv.padding, str))


def speed_up_for_cpu(network: nn.Module, enable: bool = True) -> nn.Module:
    """Turn every plain ``nn.Conv2d`` of ``network`` into a :class:`MatmulConv2d`, in place
    (``enable=False``: back to ``nn.Conv2d``, to compare the two).

    The class is swapped on the existing modules, so parameters, buffers, hooks and state-dict
    keys stay what they were (checkpoints load both ways). Returns ``network`` for chaining.
    """
    for module in network.modules():
        if enable and MatmulConv2d.supports(module):
            module.__class__ = MatmulConv2d
        elif not enable and type(module) is MatmulConv2d:
            module.__class__ = nn.Conv2d
    return network
