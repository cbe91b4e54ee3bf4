"""Multi-process correctness on CPU with the gloo backend: real processes, no mocks.

Gradient equivalence: N processes with batch b must give the parameter gradients of one process
with batch N x b on the same samples. Each check also runs a broken variant and asserts that it
*fails*, so the check can catch the trap it is about.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

import byol_nb
from byol_nb.config import TrainConfig
from byol_nb.datamodule import SSLDataModule
from byol_nb.devices import check_fork_safe, resolve_topology
from byol_nb.distributed import convert_sync_batchnorm, gather_with_grad, global_mean, rank, world_size
from byol_nb.module import BYOLModule
from tests.helpers import TORCHRUN, free_port, run_env, train_flags

WORLD = 2
BATCH = 4  # per process


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
    """The broken gather of several public implementations: backward returns only this process's
    slice of *its own* gradient, dropping the other processes' terms."""

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


def _sync_bn_worker(process: int, out: str, bf16: bool = False) -> None:
    torch.manual_seed(0)
    bn = convert_sync_batchnorm(nn.BatchNorm2d(3, momentum=0.3))
    x = samples()[0].requires_grad_()
    half = x[process * BATCH:(process + 1) * BATCH]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # as under --precision bf16-mixed
        y = bn(half.bfloat16() if bf16 else half)
    (y.float() * torch.arange(1.0, 4.0).view(1, 3, 1, 1)).square().sum().backward()
    if process == 0:
        torch.save({"x_grad": x.grad, "running_mean": bn.running_mean, "running_var": bn.running_var,
                    "dtype": y.dtype}, out)


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


def test_sync_batchnorm_on_cpu_keeps_fp32_statistics_under_bf16_autocast(tmp_path: Path) -> None:
    """bf16 activations (the default on AMX CPUs): statistics and running buffers stay fp32 and
    close to fp32 BatchNorm on the whole batch; the output keeps the input's dtype."""
    run_processes(_sync_bn_worker, str(tmp_path / "bn.pt"), True)
    got = torch.load(tmp_path / "bn.pt")
    bn = nn.BatchNorm2d(3, momentum=0.3)
    bn(samples()[0])
    assert got["dtype"] == torch.bfloat16 and got["running_mean"].dtype == torch.float32
    torch.testing.assert_close(got["running_mean"], bn.running_mean, rtol=0.02, atol=0.01)
    torch.testing.assert_close(got["running_var"], bn.running_var, rtol=0.02, atol=0.01)


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


def test_topology_comes_from_torchrun_when_it_started_us(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_topology("2", 1) == (2, 1)
    for name, value in {"RANK": "3", "GROUP_RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                        "WORLD_SIZE": "4", "TORCHELASTIC_RUN_ID": "test", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1234"}.items():
        monkeypatch.setenv(name, value)
    assert resolve_topology("1", 1) == (2, 2)
    with pytest.raises(ValueError, match="nproc-per-node 2"):
        resolve_topology("3", 1)


# ---- launch paths: real 2-process training runs ------------------------------------------------

def assert_run_like_one_process(out: Path, reference: dict, world: int = WORLD) -> dict:
    """A checkpoint, and metrics.json with the keys of a one-process run."""
    assert (out / "last.ckpt").is_file() and (out / "backbone.pt").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == set(reference) and set(metrics["config"]) == set(reference["config"])
    assert metrics["world_size"] == world and metrics["global_step"] == reference["global_step"]
    return metrics


@pytest.fixture(scope="module")
def one_process_metrics(tiny_shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("one")
    subprocess.run([sys.executable, "-m", "byol_nb.train", *train_flags(tiny_shapes, out)], env=run_env(),
                   check=True, capture_output=True, timeout=300)
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.slow
def test_lightning_launcher_through_byol_nb_launch(tiny_shapes: Path, tmp_path: Path, one_process_metrics: dict,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """byol_nb.launch -> python -m byol_nb.train --devices 2 --strategy ddp (Lightning's launcher)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    flags = train_flags(tiny_shapes, tmp_path)
    options = {flag[2:].replace("-", "_"): value for flag, value in zip(flags[::2], flags[1::2])
               if flag not in ("--no-progress", "--out")}
    shown = io.StringIO()
    metrics = byol_nb.launch(tmp_path, stream=shown, no_progress=True, devices=2, strategy="ddp", **options)
    assert metrics == json.loads((tmp_path / "metrics.json").read_text())
    assert_run_like_one_process(tmp_path, one_process_metrics)
    assert "finished 3 steps" in shown.getvalue()
    # one local view through the same layers as the main views: every gradient keeps its weight's layout
    assert "Grad strides do not match bucket view strides" not in (tmp_path / "launch.log").read_text()
    # the kernel's side never imports torch, so it can never hold CUDA
    check = "import sys, byol_nb; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", check], check=True, timeout=60)


@pytest.mark.slow
def test_torchrun_two_processes(tiny_shapes: Path, tmp_path: Path, one_process_metrics: dict) -> None:
    command = [str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "byol_nb.train",
               *train_flags(tiny_shapes, tmp_path)]
    result = subprocess.run(command, env=run_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_run_like_one_process(tmp_path, one_process_metrics)


@pytest.mark.slow
def test_two_nodes_on_loopback_train_together(tiny_shapes: Path, tmp_path: Path, one_process_metrics: dict) -> None:
    """Two torchrun invocations (--nnodes 2, node ranks 0 and 1, 127.0.0.1) form one job; only
    global rank 0 (on node 0) writes checkpoints and metrics."""
    port = free_port()
    nodes = [subprocess.Popen([str(TORCHRUN), "--nnodes=2", "--nproc_per_node=1", f"--node_rank={node}",
                               "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "byol_nb.train",
                               *train_flags(tiny_shapes, tmp_path / f"node{node}")],
                              env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for node in (0, 1)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert_run_like_one_process(tmp_path / "node0", one_process_metrics)
    assert not list((tmp_path / "node1").glob("*.ckpt")) and not (tmp_path / "node1" / "metrics.json").exists()


class Recorder(pl.Callback):
    """Writes, from every training process, what it saw: sample fingerprints per epoch, the
    BatchNorm class in use and the learning rate per step."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.seen, self.lrs = folder, {}, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        images = batch[0]
        self.seen.setdefault(trainer.current_epoch, []).extend(hash(i.numpy().tobytes()) for i in images)
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_end(self, trainer, pl_module) -> None:
        bn = type(pl_module.backbone.body[1]).__name__
        torch.save({"seen": self.seen, "bn": bn, "lrs": self.lrs, "world": trainer.world_size},
                   self.folder / f"rank{trainer.global_rank}.pt")


def fit_in_process(shapes: Path, out: Path, devices: int, batch: int, steps: int, **trainer_args) -> None:
    """What a notebook cell does: build the module and the data module, then Trainer.fit."""
    config = TrainConfig(image_size=32, batch_size=batch, proj_hidden=64)
    datamodule = SSLDataModule(str(shapes / "train"), None, 32, batch)
    trainer = pl.Trainer(accelerator="cpu", devices=devices, max_steps=steps, callbacks=[Recorder(out)],
                         default_root_dir=out, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, **trainer_args)
    trainer.fit(BYOLModule(config), datamodule=datamodule)


@pytest.mark.slow
def test_ddp_notebook_fork_two_processes(tiny_shapes: Path, tmp_path: Path) -> None:
    """Trainer(strategy="ddp_notebook", devices=2) from a running Python process, as in a notebook:
    SyncBatchNorm is on, each process sees different images, each epoch is reshuffled, and the
    learning rate follows the global batch (the same as one process with twice the batch)."""
    check_fork_safe("ddp_notebook")
    steps = 2 * 48 // (WORLD * BATCH * 2)  # two epochs of 48 images, batch 8 per process
    fit_in_process(tiny_shapes, tmp_path / "ddp", devices=2, batch=8, steps=steps, strategy="ddp_notebook")
    fit_in_process(tiny_shapes, tmp_path / "one", devices=1, batch=16, steps=steps)
    ranks = [torch.load(tmp_path / "ddp" / f"rank{r}.pt") for r in range(WORLD)]
    one = torch.load(tmp_path / "one" / "rank0.pt")
    assert [r["bn"] for r in ranks] == ["CPUSyncBatchNorm"] * WORLD and one["bn"] == "BatchNorm2d"
    for epoch in (0, 1):
        assert not set(ranks[0]["seen"][epoch]) & set(ranks[1]["seen"][epoch])
    assert ranks[0]["seen"][0] != ranks[0]["seen"][1]
    assert ranks[0]["lrs"] == pytest.approx(one["lrs"])
    assert list((tmp_path / "ddp").rglob("*.ckpt")), "rank 0 wrote no checkpoint"
