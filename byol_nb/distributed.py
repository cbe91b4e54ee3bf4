"""What changes when training runs in several processes: the gradients of the global batch.

Data-parallel training (DDP) runs one process per device. Each computes the loss on its own slice
of the global batch and DDP *averages* the parameter gradients over processes. Three consequences:

* **Per-sample losses need nothing but synchronised BatchNorm.** BYOL's and PixPro's losses are
  means over this process's samples; the average of N equal-sized means is the mean over the
  global batch, so N processes with batch b give the gradients of one process with batch N x b,
  provided BatchNorm, the one layer that mixes samples, uses the global batch's statistics too.
* **Losses that compare samples need the global batch** (contrastive negatives, statistics over the
  batch). :func:`gather_with_grad` concatenates every process's tensor; its backward *sums* every
  process's gradient for this process's slice, because each process's loss depends on every
  slice. A backward that returns only its own slice of its own gradient drops the other
  processes' terms (the trap in several public implementations). A mean whose count differs from
  process to process (pixels with a positive pair) must divide by the global count:
  :func:`global_mean`.
* **BatchNorm normalises with per-process statistics** unless it is synchronised:
  :func:`convert_sync_batchnorm` (on by default with more than one process, ``--no-sync-bn`` to
  turn it off). On GPUs it is :class:`SyncBatchNorm`, PyTorch's fused kernels without the one
  host synchronisation per layer that PyTorch's own version makes. PyTorch's SyncBatchNorm refuses
  CPU tensors; :class:`CPUSyncBatchNorm` is the CPU (gloo) version, so CPU runs and tests are exact too.

How the processes are started, and the checks around it, are in :mod:`byol_nb.devices`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn


def world_size() -> int:
    """Number of processes in the default group; 1 when torch.distributed is not initialised."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's global rank; 0 when torch.distributed is not initialised."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@torch.no_grad()
def gather(x: Tensor) -> Tensor:
    """Concatenate ``x`` from every process along dim 0 (process 0's rows first), with no gradient:
    for tensors that need none (the target network's keys, a monitor). The identity in one process."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return gather(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        # grad is d(this process's loss)/d(every slice). Summed over processes, slice r is
        # d(sum of all losses)/d(x_r): exactly what process r needs. Cloned: all_reduce is in place.
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        size = grad.shape[0] // world_size()
        return grad[rank() * size:(rank() + 1) * size]


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from every process along dim 0 (process 0's rows first), differentiably.

    Every process must call it at the same point with the same shape (DDP's sampler with
    ``drop_last`` gives equal batches). The identity in a single process:

    >>> x = torch.ones(2, 3, requires_grad=True)
    >>> gather_with_grad(x) is x
    True

    With N processes the result has N x 2 rows, and the gradient of row block r returns to process
    r summed over every process's loss (lesson 04 checks it in two real processes).
    """
    return _GatherWithGrad.apply(x) if world_size() > 1 else x


def global_mean(total: Tensor, count: Tensor) -> Tensor:
    """``total / count`` where both are summed over processes, scaled for DDP's gradient average.

    Returns ``total * N / sum(count)``: the N processes' values average to the global mean, so DDP's
    averaged gradients equal one process's on the whole batch even when counts differ per process.
    ``count`` carries no gradient; a global count of 0 is treated as 1.
    """
    count = count.detach().to(total.dtype)
    if world_size() > 1:
        count = count.clone()
        dist.all_reduce(count, op=dist.ReduceOp.SUM)
        return total * world_size() / count.clamp_min(1)
    return total / count.clamp_min(1)


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm synchronised over processes on CPU (gloo), which PyTorch's SyncBatchNorm refuses
    ("expected input tensor to be on GPU"; DDP also rejects it in CPU modules).

    In training with several processes the batch statistics are combined from every process's
    count, mean and variance (the parallel-variance formula) through :func:`gather_with_grad`, so
    gradients flow into the other processes' inputs as with PyTorch's SyncBatchNorm on GPUs. In
    one process or in eval mode it is plain BatchNorm. Same parameters and buffers as BatchNorm.
    """

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (batch, channels, ...), got {x.dim()}D")

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and world_size() > 1):
            return super().forward(x)
        self._check_input_dim(x)
        channels = x.shape[1]
        dims = [0, *range(2, x.dim())]
        out_dtype, x = x.dtype, x.float()  # statistics in fp32 under bf16 autocast (bf16 counts only to 256 exactly)
        local = torch.cat([x.mean(dims), x.var(dims, unbiased=False), x.new_full((1,), x.numel() // channels)])
        stats = gather_with_grad(local.unsqueeze(0))  # (processes, 2C + 1)
        means, variances, counts = stats[:, :channels], stats[:, channels:-1], stats[:, -1:].detach()
        total = counts.sum()
        mean = (counts * means).sum(0) / total
        var = (counts * (variances + (means - mean) ** 2)).sum(0) / total
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean, factor)
                self.running_var.lerp_(var * total / (total - 1).clamp_min(1), factor)
        shape = [1, channels] + [1] * (x.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        y = y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y
        return y.to(out_dtype)  # like BatchNorm: the output keeps the input's dtype

    @classmethod
    def from_batchnorm(cls, bn: nn.modules.batchnorm._BatchNorm) -> "CPUSyncBatchNorm":
        """The same layer (shared parameters, copied buffers, same momentum and mode), synchronised."""
        layer = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        if bn.affine:
            layer.weight, layer.bias = bn.weight, bn.bias
        if bn.track_running_stats:
            layer.running_mean, layer.running_var = bn.running_mean, bn.running_var
            layer.num_batches_tracked = bn.num_batches_tracked
        return layer.train(bn.training)


@dataclass(frozen=True)
class FusedKernels:
    """The five fused BatchNorm kernels :class:`SyncBatchNorm` calls, named as in ``torch``.

    They exist only for CUDA tensors. Tests replace the module-level :data:`kernels` with
    implementations in plain torch ops that follow the CUDA kernels' semantics, so the autograd
    function around them, and its collectives, run on CPU processes joined by gloo.
    """

    batch_norm_stats: Callable = torch.batch_norm_stats
    batch_norm_gather_stats_with_counts: Callable = torch.batch_norm_gather_stats_with_counts
    batch_norm_elemt: Callable = torch.batch_norm_elemt
    batch_norm_backward_reduce: Callable = torch.batch_norm_backward_reduce
    batch_norm_backward_elemt: Callable = torch.batch_norm_backward_elemt


kernels = FusedKernels()


def _keep_channels_last(x: Tensor) -> Tensor:
    """``x`` unchanged if it is channels-last (2D or 3D), else contiguous: the layouts the kernels take."""
    if x.is_contiguous(memory_format=torch.channels_last) or x.is_contiguous(memory_format=torch.channels_last_3d):
        return x
    return x.contiguous()


def _all_gather_rows(row: Tensor, group: dist.ProcessGroup, processes: int) -> Tensor:
    """``row`` of every process stacked as a ``(processes, len(row))`` tensor (gloo lacks the one-tensor gather)."""
    if dist.get_backend(group) == "gloo":
        rows = [torch.empty_like(row) for _ in range(processes)]
        dist.all_gather(rows, row, group)
        return torch.stack(rows)
    rows = row.new_empty(processes * row.numel())
    dist.all_gather_into_tensor(rows, row, group)
    return rows.view(processes, -1)


class _SyncBatchNormFunction(torch.autograd.Function):
    """PyTorch's ``torch.nn.modules._functions.SyncBatchNorm`` without its filter of empty batches."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
                running_var: Tensor | None, eps: float, momentum: float, group: dist.ProcessGroup,
                processes: int) -> Tensor:
        x = _keep_channels_last(x)
        weight = weight.contiguous() if weight is not None else None
        if x.numel() == 0:  # a shape, known on the host: checking it reads nothing from the device
            raise ValueError("SyncBatchNorm got an empty batch; every process needs an equal, non-empty batch "
                             "(a sampler with drop_last)")
        channels = x.shape[1]
        mean, invstd = kernels.batch_norm_stats(x, eps)  # fp32 for bf16 and fp32 inputs
        count = mean.new_full((1,), x.numel() // channels)  # from the shape: no host-to-device copy
        means, invstds, counts = _all_gather_rows(torch.cat([mean, invstd, count]), group, processes).split(
            channels, dim=1)
        counts = counts.view(-1)
        mean, invstd = kernels.batch_norm_gather_stats_with_counts(
            x, means, invstds, running_mean, running_var, momentum, eps,
            counts.to(running_mean.dtype) if running_mean is not None else counts)
        ctx.save_for_backward(x, weight, mean, invstd, counts.to(torch.int32))
        ctx.group = group
        return kernels.batch_norm_elemt(x, weight, bias, mean, invstd, eps)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple:  # type: ignore[override]
        grad_output = _keep_channels_last(grad_output)
        x, weight, mean, invstd, counts = ctx.saved_tensors
        needs_input, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        sum_dy, sum_dy_xmu, grad_weight, grad_bias = kernels.batch_norm_backward_reduce(
            grad_output, x, mean, invstd, weight, needs_input, needs_weight, needs_bias)
        grad_input = None
        if needs_input:
            # Every process's loss depends on this process's inputs through the shared statistics:
            # the sums over the global batch carry those terms. The weight and bias gradients are
            # local sums, which DDP's all-reduce combines.
            sums = torch.cat([sum_dy, sum_dy_xmu])
            dist.all_reduce(sums, dist.ReduceOp.SUM, ctx.group)
            sum_dy, sum_dy_xmu = sums.split(len(mean))
            weight = weight.to(mean.dtype) if weight is not None else None
            grad_input = kernels.batch_norm_backward_elemt(grad_output, x, mean, invstd, weight, sum_dy,
                                                           sum_dy_xmu, counts)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None  # None where not asked for


class SyncBatchNorm(nn.SyncBatchNorm):
    """PyTorch's SyncBatchNorm for GPUs without a GPU-to-host synchronisation in every layer.

    PyTorch's version drops the statistics of processes with an empty batch through boolean
    indexing (``count_all[mask]``), whose result size depends on device values: the host waits
    for the GPU in every BatchNorm layer of every step, so it cannot queue work ahead. This
    version keeps PyTorch's fused kernels and collectives and leaves that filter out.

    Assumption: every process has an equal, non-empty batch, as DDP's sampler with ``drop_last``
    gives. A process with an empty batch would send a count of zero, which the kernel combining
    the statistics divides by (NaN statistics in every process). Such a process raises instead:
    its shape says so without reading the device; the other processes then wait in the gather
    until it times out or the launcher ends the job. ``momentum=None`` (a cumulative average) reads the step count
    on the host, as in PyTorch. Eval mode, a single process or no process group: plain BatchNorm.
    """

    def forward(self, x: Tensor) -> Tensor:
        synchronised = self.training and dist.is_available() and dist.is_initialized()
        group = (self.process_group or dist.group.WORLD) if synchronised else None
        if not (synchronised and dist.get_world_size(group) > 1):
            return super().forward(x)
        self._check_input_dim(x)
        self._check_non_zero_input_channels(x)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        running_mean, running_var = (self.running_mean, self.running_var) if self.track_running_stats else (None, None)
        return _SyncBatchNormFunction.apply(x, self.weight, self.bias, running_mean, running_var, self.eps, momentum,
                                            group, dist.get_world_size(group))

    @classmethod
    def from_batchnorm(cls, bn: nn.modules.batchnorm._BatchNorm) -> "SyncBatchNorm":
        """The same layer (shared parameters and buffers, same momentum and mode), synchronised."""
        layer = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        if bn.affine:
            layer.weight, layer.bias = bn.weight, bn.bias
        if bn.track_running_stats:
            layer.running_mean, layer.running_var = bn.running_mean, bn.running_var
            layer.num_batches_tracked = bn.num_batches_tracked
        return layer.train(bn.training)


def convert_sync_batchnorm(module: nn.Module, cpu: bool = True) -> nn.Module:
    """Replace every BatchNorm layer of ``module`` by a synchronised one that keeps its parameters,
    buffers and momentum (the target network's momentum 0 included): :class:`CPUSyncBatchNorm` for
    CPU training, :class:`SyncBatchNorm` (fused CUDA kernels) otherwise. Children are replaced in
    place; the return value matters only when ``module`` itself is a BatchNorm layer.

    Call it before the optimizer and the DDP wrapper exist (BYOLModule does, in ``setup``).
    """
    layer = CPUSyncBatchNorm if cpu else SyncBatchNorm
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, layer):
        return layer.from_batchnorm(module)
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, cpu))
    return module
