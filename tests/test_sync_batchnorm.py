"""byol_nb.distributed.SyncBatchNorm on CPU: its autograd function and collectives, real gloo processes.

The fused kernels it calls exist only for CUDA. Here they are replaced by reference implementations
in plain torch ops that follow the CUDA kernels' semantics (aten/src/ATen/native/cuda/Normalization.cu
and Normalization.cuh), including the dtypes and layouts they accept and return. Two processes,
each holding half of a batch, must then give what one nn.BatchNorm gives on the whole batch. Two
broken kernel sets must fail the same comparison, and a counter of host synchronisations that
sees PyTorch's own filter of empty batches must see none here.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from byol_nb import distributed
from byol_nb.distributed import CPUSyncBatchNorm, FusedKernels, SyncBatchNorm, convert_sync_batchnorm
from tests.helpers import free_port

WORLD = 2
BATCH = 4  # per process


# ---- reference kernels: the CUDA kernels' semantics in plain torch ops ---------------------------

def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernels' accumulation type: fp32 for bf16, fp16 and fp32 inputs, fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _reduced_dims(x: Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _per_channel(values: Tensor, x: Tensor) -> Tensor:
    return values.view(1, -1, *[1] * (x.dim() - 2))


def batch_norm_stats(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """This process's mean and 1 / sqrt(biased variance + eps) per channel (0 where both are 0)."""
    values = x.to(_stat_dtype(x.dtype))
    var = values.var(_reduced_dims(x), correction=0)
    invstd = torch.where((var == 0) & (eps == 0), torch.zeros_like(var), (var + eps).rsqrt())
    return values.mean(_reduced_dims(x)), invstd


def batch_norm_gather_stats_with_counts(x: Tensor, means: Tensor, invstds: Tensor, running_mean: Tensor | None,
                                        running_var: Tensor | None, momentum: float, eps: float,
                                        counts: Tensor) -> tuple[Tensor, Tensor]:
    """The global mean and invstd from every process's (mean, invstd, count) rows; updates the running
    statistics in place: (1 - momentum) * running + momentum * batch, the variance unbiased."""
    assert counts.dtype == (running_mean if running_mean is not None else x).dtype, "the kernel reads counts so"
    assert means.dtype == invstds.dtype == _stat_dtype(counts.dtype)
    weights = counts.to(means.dtype).view(-1, 1)
    total = weights.sum(0)
    mean = (weights * means).sum(0) / total
    var = (weights * (invstds.reciprocal().square() - eps + (means - mean).square())).sum(0) / total
    if running_mean is not None:
        running_mean.copy_((1 - momentum) * running_mean + momentum * mean)
    if running_var is not None:
        running_var.copy_((1 - momentum) * running_var + momentum * var * total / (total - 1))
    return mean, (var + eps).rsqrt()


def batch_norm_elemt(x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, invstd: Tensor,
                     eps: float) -> Tensor:
    """weight * (x - mean) * invstd + bias, computed in the statistics' dtype, returned in x's dtype and layout."""
    y = (x.to(mean.dtype) - _per_channel(mean, x)) * _per_channel(invstd, x)
    if weight is not None:
        y = _per_channel(weight.to(mean.dtype), x) * y
    if bias is not None:
        y = y + _per_channel(bias.to(mean.dtype), x)
    return torch.empty_like(x).copy_(y)


def batch_norm_backward_reduce(grad_output: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None,
                               input_g: bool, weight_g: bool, bias_g: bool) -> tuple:
    """This process's sum(dy) and sum(dy * (x - mean)) per channel (for the input gradient), and the
    weight and bias gradients sum(dy * x_hat), sum(dy) in the weight's dtype; None where not asked."""
    assert mean.dtype == invstd.dtype
    dy = grad_output.to(mean.dtype)
    sum_dy = dy.sum(_reduced_dims(x))
    sum_dy_xmu = (dy * (x.to(mean.dtype) - _per_channel(mean, x))).sum(_reduced_dims(x))
    return (sum_dy if input_g else None, sum_dy_xmu if input_g else None,
            (sum_dy_xmu * invstd).to(weight.dtype) if weight_g else None,
            sum_dy.to(weight.dtype) if bias_g else None)


def batch_norm_backward_elemt(grad_output: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None,
                              sum_dy: Tensor, sum_dy_xmu: Tensor, counts: Tensor) -> Tensor:
    """(dy - sum_dy / N - (x - mean) * invstd^2 * sum_dy_xmu / N) * invstd * weight, with the sums over
    every process and N the sum of every process's count; in x's dtype and layout."""
    assert counts.dtype == torch.int32, "the kernel reads the counts as int"
    norm = 1 / counts.sum().to(mean.dtype)
    scale = invstd if weight is None else invstd * weight
    projection = invstd.square() * sum_dy_xmu * norm
    grad = (grad_output.to(mean.dtype) - _per_channel(sum_dy * norm, x)
            - (x.to(mean.dtype) - _per_channel(mean, x)) * _per_channel(projection, x)) * _per_channel(scale, x)
    return torch.empty_like(x).copy_(grad)


REFERENCE = FusedKernels(batch_norm_stats, batch_norm_gather_stats_with_counts, batch_norm_elemt,
                         batch_norm_backward_reduce, batch_norm_backward_elemt)


def _local_statistics(x, means, invstds, running_mean, running_var, momentum, eps, counts):
    """Broken: this process's row only, as BatchNorm without synchronisation."""
    row = slice(dist.get_rank(), dist.get_rank() + 1)
    return batch_norm_gather_stats_with_counts(x, means[row], invstds[row], running_mean, running_var, momentum,
                                               eps, counts)


def _local_count(grad_output, x, mean, invstd, weight, sum_dy, sum_dy_xmu, counts):
    """Broken: divides the global sums by this process's count."""
    return batch_norm_backward_elemt(grad_output, x, mean, invstd, weight, sum_dy, sum_dy_xmu,
                                     counts[dist.get_rank():dist.get_rank() + 1])


KERNELS = {"reference": REFERENCE,
           "local_statistics": dataclasses.replace(REFERENCE, batch_norm_gather_stats_with_counts=_local_statistics),
           "local_count": dataclasses.replace(REFERENCE, batch_norm_backward_elemt=_local_count)}


# ---- counting host synchronisations ----------------------------------------------------------

READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy")
SYNCING = {"aten.nonzero", "aten._local_scalar_dense", "aten.masked_select", "aten.is_nonzero", "aten.equal",
           "aten.unique_consecutive", "aten._unique", "aten._unique2", "aten.unique_dim"}
BOOL_INDEXED = {"aten.index", "aten.index_put", "aten.index_put_"}  # sync on CUDA when an index is a mask


def _syncs_on_cuda(func, args: tuple, kwargs: dict) -> bool:
    """Whether this aten op waits for the GPU: its result's size or a Python value depends on device data."""
    name = str(func.overloadpacket)
    if name in SYNCING:
        return True
    if name in BOOL_INDEXED:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(isinstance(i, Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)
    return name == "aten.repeat_interleave" and kwargs.get("output_size") is None


class _AtenOps(TorchDispatchMode):
    def __init__(self, seen: dict[str, list[str]]) -> None:
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.seen["ops"].append(str(func))
        if _syncs_on_cuda(func, args, kwargs):
            self.seen["syncs"].append(str(func))
        return func(*args, **kwargs)


@contextlib.contextmanager
def host_syncs() -> Iterator[dict[str, list[str]]]:
    """Records every aten op run inside (``ops``) and those that synchronise on CUDA, with every
    Python read of a tensor's value (``syncs``)."""
    seen: dict[str, list[str]] = {"ops": [], "syncs": []}
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def counted(name: str, original):
        def read(self, *args, **kwargs):
            seen["syncs"].append(f"Tensor.{name}")
            return original(self, *args, **kwargs)
        return read

    for name, original in originals.items():
        setattr(torch.Tensor, name, counted(name, original))
    try:
        with _AtenOps(seen):
            yield seen
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def test_the_counter_sees_the_filter_of_empty_batches_in_pytorchs_syncbatchnorm() -> None:
    """The two lines PyTorch's SyncBatchNorm runs in every layer, and a value read: all counted."""
    count_all = torch.full((WORLD, 1), float(BATCH))
    with host_syncs() as seen:
        mask = count_all.squeeze(-1) >= 1
        count_all = count_all[mask]
    assert seen["syncs"] == ["aten.index.Tensor"]
    with host_syncs() as seen:
        assert count_all.sum() > 0
    assert seen["syncs"] and seen["syncs"][0] == "Tensor.__bool__"


# ---- two processes against one nn.BatchNorm on the whole batch --------------------------------

@dataclasses.dataclass(frozen=True)
class Case:
    layer: type = nn.BatchNorm2d
    shape: tuple[int, ...] = (WORLD * BATCH, 3, 5, 5)
    bf16: bool = False  # bf16 inputs under CPU autocast, as with --precision bf16-mixed
    channels_last: bool = False
    momentum: float | None = 0.1
    affine: bool = True
    train: bool = True


CASES = {
    "fp32": Case(),
    "bf16": Case(bf16=True),
    "channels_last": Case(channels_last=True),
    "bf16_channels_last": Case(bf16=True, channels_last=True),
    "batchnorm1d": Case(nn.BatchNorm1d, (WORLD * BATCH, 6)),  # the MLP heads: (N, C)
    "batchnorm1d_sequence": Case(nn.BatchNorm1d, (WORLD * BATCH, 4, 7)),
    "no_affine": Case(affine=False),
    "target_momentum_0": Case(momentum=0.0),  # the BYOL target network's layers
    "cumulative_average": Case(momentum=None),
    "eval": Case(train=False),
}
RUNS = {**{name: (name, "reference") for name in CASES},
        "local_statistics": ("fp32", "local_statistics"), "local_count": ("fp32", "local_count")}


def make_layer(case: Case) -> nn.Module:
    """A BatchNorm layer with parameters and running statistics away from their initial values."""
    torch.manual_seed(0)
    layer = case.layer(case.shape[1], momentum=case.momentum, affine=case.affine)
    with torch.no_grad():
        if case.affine:
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.normal_()
        layer.running_mean.normal_()
        layer.running_var.uniform_(0.5, 2.0)
    return layer.train(case.train)


def batch(case: Case) -> tuple[Tensor, Tensor]:
    """The global batch and the per-element loss weights: the same in every process."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(case.shape, generator=generator) * 2 + 1
    if case.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.randn(case.shape, generator=generator)


def run_on_half(case: Case, process: int) -> dict:
    """Forward and backward of this process's half through SyncBatchNorm; the loss is linear in the
    output, and the processes' losses sum to the one-process loss on the whole batch."""
    layer = convert_sync_batchnorm(make_layer(case), cpu=False)
    x, loss_weights = batch(case)
    x.requires_grad_()
    rows = slice(process * BATCH, (process + 1) * BATCH)
    with host_syncs() as forward, torch.autocast("cpu", dtype=torch.bfloat16, enabled=case.bf16):
        y = layer(x[rows].bfloat16() if case.bf16 else x[rows])
    saved = [None if t is None else t.dtype for t in y.grad_fn.saved_tensors] if case.train else []
    with host_syncs() as backward:
        (y.float() * loss_weights[rows]).sum().backward()
    return {"type": type(layer).__name__, "y": y.detach(), "y_dtype": y.dtype, "saved_dtypes": saved,
            "y_channels_last": y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous(),
            "x_grad": x.grad[rows], "weight_grad": layer.weight.grad if case.affine else None,
            "bias_grad": layer.bias.grad if case.affine else None,
            "running_mean": layer.running_mean, "running_var": layer.running_var,
            "batches": layer.num_batches_tracked, "forward": forward, "backward": backward}


def _worker(process: int, port: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=process, world_size=WORLD)
    try:
        results = {}
        for run, (case, kernels) in RUNS.items():
            distributed.kernels = KERNELS[kernels]  # this forked process's copy of the module
            results[run] = run_on_half(CASES[case], process)
        torch.save(results, Path(folder) / f"rank{process}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Every run of RUNS in one pair of forked processes: each process's results."""
    folder = tmp_path_factory.mktemp("syncbn")
    mp.start_processes(_worker, args=(free_port(), str(folder)), nprocs=WORLD, start_method="fork")
    return [torch.load(folder / f"rank{process}.pt") for process in range(WORLD)]


def one_process(case: Case) -> dict:
    """nn.BatchNorm on the whole batch in fp32: what the processes together must give."""
    layer = make_layer(case)
    x, loss_weights = batch(case)
    x.requires_grad_()
    y = layer(x)
    (y * loss_weights).sum().backward()
    return {"y": y.detach(), "x_grad": x.grad, "weight_grad": layer.weight.grad if case.affine else None,
            "bias_grad": layer.bias.grad if case.affine else None, "running_mean": layer.running_mean,
            "running_var": layer.running_var, "batches": layer.num_batches_tracked}


def assert_like_one_process(ranks: list[dict], case: Case) -> None:
    want = one_process(case)
    tolerance = {"rtol": 0.03, "atol": 0.03} if case.bf16 else {"rtol": 1e-4, "atol": 1e-5}

    def close(got: Tensor, key: str) -> None:
        torch.testing.assert_close(got, want[key], **tolerance, msg=lambda message: f"{key}: {message}")

    close(torch.cat([r["y"].float() for r in ranks]), "y")
    # each process's input gradient includes the other process's loss, through the shared statistics
    close(torch.cat([r["x_grad"] for r in ranks]), "x_grad")
    if case.affine:  # local sums, which DDP's all-reduce adds up (and divides by the process count)
        close(sum(r["weight_grad"] for r in ranks), "weight_grad")
        close(sum(r["bias_grad"] for r in ranks), "bias_grad")
    for r in ranks:  # the statistics stay fp32 whatever the activations' dtype
        close(r["running_mean"], "running_mean")
        close(r["running_var"], "running_var")
        assert r["batches"] == want["batches"]


@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_match_batchnorm_on_the_whole_batch(runs: list[dict], name: str) -> None:
    case = CASES[name]
    ranks = [r[name] for r in runs]
    assert_like_one_process(ranks, case)
    for r in ranks:
        assert r["type"] == "SyncBatchNorm"
        assert r["y_dtype"] == (torch.bfloat16 if case.bf16 else torch.float32)
        assert r["y_channels_last"] == case.channels_last
        assert r["running_mean"].dtype == r["running_var"].dtype == torch.float32
        if case.train:  # x, weight, mean, invstd, counts
            assert r["saved_dtypes"][2:] == [torch.float32, torch.float32, torch.int32]


def test_the_target_networks_layers_keep_their_running_statistics(runs: list[dict]) -> None:
    initial = make_layer(CASES["target_momentum_0"])
    for r in runs:
        assert torch.equal(r["target_momentum_0"]["running_mean"], initial.running_mean)
        assert torch.equal(r["target_momentum_0"]["running_var"], initial.running_var)


@pytest.mark.parametrize("broken", ["local_statistics", "local_count"])
def test_broken_kernels_fail_the_same_comparison(runs: list[dict], broken: str) -> None:
    """Each process's statistics alone, or the global sums divided by its own count: caught."""
    with pytest.raises(AssertionError):
        assert_like_one_process([r[broken] for r in runs], CASES["fp32"])


# momentum=None reads the step count on the host, as PyTorch's SyncBatchNorm does
@pytest.mark.parametrize("name", [name for name, case in CASES.items() if case.train and case.momentum is not None])
def test_forward_and_backward_synchronise_with_no_host_read(runs: list[dict], name: str) -> None:
    for r in runs:
        forward, backward = r[name]["forward"], r[name]["backward"]
        assert forward["syncs"] == [] and backward["syncs"] == []
        # the counter was on: it saw the collectives of both passes
        assert any("allgather" in op for op in forward["ops"]), forward["ops"]
        assert any("allreduce" in op for op in backward["ops"]), backward["ops"]


# ---- without a process group, and the conversion --------------------------------------------

def test_without_a_process_group_it_is_batchnorm() -> None:
    case = Case()
    layer = convert_sync_batchnorm(make_layer(case), cpu=False)
    assert isinstance(layer, SyncBatchNorm) and not dist.is_initialized()
    x, _ = batch(case)
    torch.testing.assert_close(layer(x), make_layer(case)(x))


def test_an_empty_batch_raises_before_any_collective() -> None:
    weight, bias = torch.ones(3), torch.zeros(3)
    with pytest.raises(ValueError, match="non-empty batch"):
        distributed._SyncBatchNormFunction.apply(torch.empty(0, 3), weight, bias, torch.zeros(3), torch.ones(3),
                                                 1e-5, 0.1, None, WORLD)


def byol_like_pair() -> tuple[nn.Module, nn.Module]:
    """An online network and its BYOL target: a deep copy without gradients, BatchNorm momentum 0."""
    torch.manual_seed(0)
    online = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, eps=1e-3), nn.ReLU(), nn.Flatten(),
                           nn.Linear(4 * 6 * 6, 8), nn.BatchNorm1d(8, affine=False), nn.ReLU(),
                           nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8, track_running_stats=False)))
    target = copy.deepcopy(online).requires_grad_(False)
    for module in target.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = 0.0
    online[1].eval()
    return online, target


@pytest.mark.parametrize("cpu", [False, True])
def test_conversion_keeps_parameters_buffers_momentum_and_mode(cpu: bool) -> None:
    for net in byol_like_pair():
        before = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        parameters, buffers = list(net.parameters()), list(net.buffers())
        assert convert_sync_batchnorm(net, cpu=cpu) is net
        after = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert [type(m) for m in after] == [CPUSyncBatchNorm if cpu else SyncBatchNorm] * len(before)
        assert all(a is b for a, b in zip(net.parameters(), parameters, strict=True))
        assert all(a is b for a, b in zip(net.buffers(), buffers, strict=True))
        for old, new in zip(before, after):
            for attribute in ("num_features", "eps", "momentum", "affine", "track_running_stats", "training"):
                assert getattr(new, attribute) == getattr(old, attribute), attribute
            assert [p.requires_grad for p in new.parameters()] == [p.requires_grad for p in old.parameters()]


def test_a_batchnorm_layer_itself_is_returned_converted() -> None:
    bn = nn.BatchNorm1d(5, momentum=0.0)
    layer = convert_sync_batchnorm(bn, cpu=False)
    assert type(layer) is SyncBatchNorm and layer.weight is bn.weight and layer.running_var is bn.running_var
    assert layer.momentum == 0.0
