"""Multi-process correctness on CPU with the gloo backend: real processes, no mocks.

Gradient equivalence: N processes with batch b must give the parameter gradients of one process
with batch N x b on the same samples. Each check also runs a broken variant and asserts that it
*fails*, so the check can catch the trap it is about.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from byol_nb.distributed import (ForkAfterCudaError, check_fork_safe, convert_sync_batchnorm, gather_with_grad,
                                 global_mean, rank, resolve_topology, world_size)

WORLD = 2
BATCH = 4  # per process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(fn, *args) -> None:
    """Run ``fn(rank, *args)`` in WORLD forked processes joined by a gloo group; errors propagate."""
    mp.start_processes(_init_and_run, args=(free_port(), fn, args), nprocs=WORLD, start_method="fork")


def _init_and_run(process: int, port: int, fn, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=process, world_size=WORLD)
    try:
        fn(process, *args)
    finally:
        dist.destroy_process_group()


# ---- what is compared ------------------------------------------------------------------------


def make_net(seed: int = 0) -> nn.Module:
    """Conv + BatchNorm + MLP with BatchNorm: BN makes the per-process statistics matter."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 8))


def samples() -> Tensor:
    """The global batch (WORLD x BATCH images, two views stacked): the same in every process."""
    return torch.randn(2, WORLD * BATCH, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def info_nce(queries: Tensor, keys: Tensor, all_keys: Tensor, temperature: float = 0.3) -> Tensor:
    """Contrastive loss whose negatives (all_keys) carry gradients: the case a gather must get right.
    Query i's positive is key i of this process; rows of all_keys from this process come first
    at offset ``rank * len(keys)``."""
    q, everything = F.normalize(queries, dim=1), F.normalize(all_keys, dim=1)
    logits = q @ everything.T / temperature
    target = torch.arange(len(queries)) + rank() * len(keys)
    return F.cross_entropy(logits, target)


class OwnSliceGather(torch.autograd.Function):
    """The broken gather (trap 4): backward returns only this process's slice of *its own* gradient."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        size = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * size:(dist.get_rank() + 1) * size]


def contrastive_grads(views: Tensor, gather, sync_bn: bool) -> dict[str, Tensor]:
    """Parameter gradients of a symmetric InfoNCE step on this process's slice of ``views``."""
    net = make_net()
    if sync_bn:
        convert_sync_batchnorm(net)  # CPU version
    if world_size() > 1:
        net = DistributedDataParallel(net)
    lo, hi = rank() * len(views[0]) // world_size(), (rank() + 1) * len(views[0]) // world_size()
    out = net(torch.cat([views[0, lo:hi], views[1, lo:hi]]))
    z1, z2 = out.chunk(2)
    loss = info_nce(z1, z2, gather(z2)) + info_nce(z2, z1, gather(z1))
    loss.backward()
    module = net.module if world_size() > 1 else net
    return {name: p.grad.clone() for name, p in module.named_parameters()}


def _contrastive_worker(process: int, out: str, gather_name: str, sync_bn: bool) -> None:
    gather = {"gather_with_grad": gather_with_grad, "own_slice": OwnSliceGather.apply}[gather_name]
    grads = contrastive_grads(samples(), gather, sync_bn)
    if process == 0:
        torch.save(grads, out)


def assert_same_grads(got: dict[str, Tensor], want: dict[str, Tensor]) -> None:
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=2e-5, msg=lambda m: f"{name}: {m}")


def reference_grads() -> dict[str, Tensor]:
    """One process, the whole global batch, plain BatchNorm."""
    return contrastive_grads(samples(), lambda x: x, sync_bn=False)


def test_gather_with_grad_two_processes_match_one_process_with_twice_the_batch(tmp_path: Path) -> None:
    run_processes(_contrastive_worker, str(tmp_path / "g.pt"), "gather_with_grad", True)
    assert_same_grads(torch.load(tmp_path / "g.pt"), reference_grads())


def test_gather_that_returns_only_its_own_slice_fails_the_same_check(tmp_path: Path) -> None:
    run_processes(_contrastive_worker, str(tmp_path / "g.pt"), "own_slice", True)
    with pytest.raises(AssertionError):
        assert_same_grads(torch.load(tmp_path / "g.pt"), reference_grads())


def test_without_sync_bn_the_gradients_differ(tmp_path: Path) -> None:
    """Why SyncBN is on by default: per-process BN statistics change the gradients."""
    run_processes(_contrastive_worker, str(tmp_path / "g.pt"), "gather_with_grad", False)
    with pytest.raises(AssertionError):
        assert_same_grads(torch.load(tmp_path / "g.pt"), reference_grads())


def _sync_bn_worker(process: int, out: str) -> None:
    torch.manual_seed(0)
    bn = convert_sync_batchnorm(nn.BatchNorm2d(3, momentum=0.3))
    x = samples()[0].requires_grad_()
    half = x[process * BATCH:(process + 1) * BATCH]
    (bn(half) * torch.arange(1.0, 4.0).view(1, 3, 1, 1)).square().sum().backward()
    if process == 0:
        torch.save({"x_grad": x.grad, "running_mean": bn.running_mean, "running_var": bn.running_var}, out)


def test_sync_batchnorm_on_cpu_matches_batchnorm_on_the_whole_batch(tmp_path: Path) -> None:
    run_processes(_sync_bn_worker, str(tmp_path / "bn.pt"))
    got = torch.load(tmp_path / "bn.pt")
    bn = nn.BatchNorm2d(3, momentum=0.3)
    x = samples()[0].requires_grad_()
    (bn(x) * torch.arange(1.0, 4.0).view(1, 3, 1, 1)).square().sum().backward()
    torch.testing.assert_close(got["running_mean"], bn.running_mean)
    torch.testing.assert_close(got["running_var"], bn.running_var)
    # process 0's input gradient, which includes process 1's loss through the shared statistics
    torch.testing.assert_close(got["x_grad"][:BATCH], x.grad[:BATCH], rtol=1e-4, atol=1e-5)


def _global_mean_worker(process: int, out: str) -> None:
    weight = torch.tensor(2.0, requires_grad=True)
    values = [torch.arange(1.0, 4.0), torch.arange(1.0, 2.0)][process]  # 3 items here, 1 there
    loss = global_mean((weight * values).sum(), torch.tensor(len(values)))
    loss.backward()
    grad = weight.grad.clone()
    dist.all_reduce(grad)  # what DDP does: average over processes
    if process == 0:
        torch.save(grad / WORLD, out)


def test_global_mean_gives_the_global_batch_mean_when_counts_differ(tmp_path: Path) -> None:
    run_processes(_global_mean_worker, str(tmp_path / "m.pt"))
    assert torch.load(tmp_path / "m.pt").item() == pytest.approx((1 + 2 + 3 + 1) / 4)


def test_single_process_helpers_are_the_identity() -> None:
    x = torch.randn(3, 2)
    assert gather_with_grad(x) is x and world_size() == 1 and rank() == 0
    assert global_mean(torch.tensor(6.0), torch.tensor(3)).item() == 2.0


def test_fork_guard_names_the_call_and_the_remedy(monkeypatch: pytest.MonkeyPatch) -> None:
    check_fork_safe("ddp_notebook")  # no CUDA here: nothing to say
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)  # the state after a torch.cuda call
    with pytest.raises(ForkAfterCudaError) as error:
        check_fork_safe("ddp_notebook")
    message = str(error.value)
    assert "trainer.fit" in message and "ddp_notebook" in message
    assert "Restart the kernel" in message and "byol_nb.launch" in message
    check_fork_safe("ddp")  # new interpreters (subprocess launcher) are not affected


def test_topology_comes_from_torchrun_when_it_started_us(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_topology("2", 1) == (2, 1)
    for name, value in {"RANK": "3", "GROUP_RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                        "WORLD_SIZE": "4", "TORCHELASTIC_RUN_ID": "test", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1234"}.items():
        monkeypatch.setenv(name, value)
    assert resolve_topology("1", 1) == (2, 2)
    with pytest.raises(ValueError, match="nproc-per-node 2"):
        resolve_topology("3", 1)
