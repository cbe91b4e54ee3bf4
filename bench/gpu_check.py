"""The GPU check: what the first run on a GPU machine must prove, in one command.

    python -m bench.gpu_check              # on a machine with one or more GPUs (--budget-s 440 by default)
    python -m bench.gpu_check --dry-run    # the same checks, small, on the CPU: tests the script itself

On a GPU machine with no internet it runs on the machine's own python3, after the wheels that
``make gpu-wheels`` collects are installed beside it: ``make gpu-check PY=python3``, or the one line
for the device tool in BENCHMARKS.md ("The GPU check"). The checks, cheapest and most decisive first,
so that a tight budget cuts what matters least:

1. **SyncBN kernels**: the fused kernels that ``byol_nb.distributed.SyncBatchNorm`` calls, driven
   over two halves of a batch as two processes would (in one process: NCCL refuses two ranks on one
   GPU), against ``nn.BatchNorm`` on the whole batch, in bf16 with channels_last and in fp32; and
   the CPU reference kernels of tests/test_sync_batchnorm.py against the CUDA kernels, call by call.
2. **LARS on the device** against its formula in float64.
3. **Host syncs** per steady training step, every method, on both data paths: a folder (batches
   with photo boxes) and tensors without boxes (``--data cifar10``'s path).
4. **Speed** at the cifar10 preset's shape: steady images/s, the full step over the ideal step
   (forward and backward alone), peak memory. No peer library is needed.
5. **ddp_notebook** from a notebook kernel.
6. **Real photos**: about three minutes of training on the CIFAR-10 subset, kNN against the same
   network at random initialisation.
7. **Peers**: byol_nb against byol-pytorch and lightly, where they are installed.
8. **Two devices**: every method, and the scaling over devices (SKIP on one GPU).

Prints one markdown table (check, setting, result, verdict) and one JSON line, and writes the JSON
to --out. A check that raises becomes a FAIL row with its error and the next check runs; a check
that the budget leaves no time for becomes a SKIP row; the exit status is 1 when any row failed.
Verdicts: PASS or FAIL against a threshold; INFO for a number without one (memory, images/s, and
every speed and quality figure of the dry run: a shared CPU says nothing about GPU targets); SKIP for
what cannot run here (the 2-device checks on one GPU, a missing package, no time left).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator
from unittest import mock

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from bench.peers import PEERS
from bench.run import REPO, RESULTS, SUBSET, SUBSET_TARS, cached_pixels, find_subset, run_worker

PASS, FAIL, INFO, SKIP = "PASS", "FAIL", "INFO", "SKIP"
PEER_MODULES = {"byol-pytorch": "byol_pytorch", "lightly": "lightly"}
MIN_SPEEDUP = 1.5  # byol_nb over the faster peer, at 96 and 224 px
MIN_SCALING = 0.85  # all-GPU images/s over N x one-GPU images/s
MAX_LARS_ERROR = 1e-5  # relative to the update
# The full training step over the ideal step (the networks' forward, loss and backward on views made
# once). The rest of a step is the augmentation, LARS, the EMA and Lightning's loop: on a GPU that
# runs ahead of the host they may add at most half the model's own time.
MAX_STEP_OVER_IDEAL = 1.5
MIN_KNN_GAIN = 10.0  # kNN top-1 points of the real-photo run over its network at random initialisation
# Largest difference to nn.BatchNorm on the whole batch, over the largest value compared (bf16 keeps
# 8 significant bits: its outputs are rounded to 2**-9 of their size).
SYNC_BN_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2}
DEFAULT_BUDGET_S = 440  # on a GPU: with the wheels' install the command ends within 8 minutes
TRAIN_TIMEOUT_S = 300
WORKER_TIMEOUT_S = 240
PHOTO_TRAIN_S = 150  # the real-photo run's training, sized from the speed check's step time
PHOTO_OVERHEAD_S = 90  # its start, decoding, monitor pass and final kNN scores (on the CPU), besides training
PHOTO_FALLBACK_STEPS = 2000  # its length when the speed check gave no step time
# Every method and variant as flags of python -m byol_nb.train (32 px; the small stem gives 4x4 maps).
METHODS = {
    "byol": [],
    "byol --local-views 1": ["--local-views", "1"],
    "pixpro --small-stem": ["--method", "pixpro", "--small-stem"],
    "pixpro --small-stem --instance-weight 0": ["--method", "pixpro", "--small-stem", "--instance-weight", "0"],
    "pixcontrast --small-stem": ["--method", "pixcontrast", "--small-stem"],
}
SYNC_METHODS = ("byol", "byol --local-views 1", "pixpro --small-stem", "pixcontrast --small-stem")
# The dry run's 2-process rows: the instance path with a second online forward, and the pixel gathers.
DRY_RUN_METHODS = ("byol --local-views 1", "pixcontrast --small-stem")
SYNC_STEPS, SYNC_LOG_EVERY = 8, 4  # within the first epoch of 48 images in batches of 4
PRESET_WARMUP_SHARE = 10 / 200  # the cifar10 preset's warmup: 10 of its 200 epochs


@dataclass
class Row:
    check: str
    setting: str
    result: str
    verdict: str
    values: dict = field(default_factory=dict)  # the numbers behind ``result``, for the JSON


@dataclass
class Context:
    """What every check needs: the run's sizes, its budget, where its files go, and measurements
    kept for later checks (the real-photo run is sized from the speed check's step time)."""

    dry_run: bool
    gpus: int  # 0: the CPU (dry run)
    steps: int
    peers: bool
    work: Path
    budget_s: float | None = None
    started: float = field(default_factory=time.perf_counter)
    measured: dict = field(default_factory=dict)

    @property
    def accelerator(self) -> str:
        return "gpu" if self.gpus else "cpu"

    @property
    def precision(self) -> str:
        return "bf16-mixed" if self.gpus else "32"

    @property
    def warmup(self) -> int:
        """Steps left out of every speed figure: the first ones load CUDA modules and fill the allocator."""
        return 1 if self.dry_run else 10

    @property
    def where(self) -> str:
        return f"{self.gpus} GPU(s)" if self.gpus else "CPU (dry run)"

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def left(self) -> float:
        return float("inf") if self.budget_s is None else self.budget_s - self.elapsed()

    def worker(self, key: str, spec: dict) -> dict:
        """bench.worker's ``spec`` in a fresh process, kept under ``key``; stopped when the budget ends."""
        if key not in self.measured:
            spec = {"workers": min(8, os.cpu_count() or 1), **spec}
            self.measured[key] = run_worker(spec, timeout=min(WORKER_TIMEOUT_S, self.left()))
        return self.measured[key]

    def shapes(self) -> Path:
        from byol_nb.shapes import generate_shapes

        return generate_shapes(self.work / "shapes", train_per_class=8, test_per_class=4, size=32)

    def random_images(self, size: int, count: int) -> Path:
        """bench.run's random pixels as PNG files: ``--data`` takes a folder."""
        folder = self.work / f"random_{size}px_{count}"
        if not folder.is_dir():
            folder.mkdir(parents=True)
            pixels = torch.load(cached_pixels(None, size), weights_only=True)["pixels"][:count]
            for i, image in enumerate(pixels):
                Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:05d}.png", compress_level=1)
        return folder

    def train(self, name: str, *flags: str, devices: int = 1, timeout: float = TRAIN_TIMEOUT_S) -> dict:
        """``python -m byol_nb.train`` in a subprocess (``--strategy ddp`` on several devices), stopped
        after ``timeout`` seconds or when the budget ends; its metrics.json.

        The run's folder is removed once read: the check needs only the metrics, and each run's
        checkpoints hold a few hundred MB."""
        out = self.work / "runs" / name
        shutil.rmtree(out, ignore_errors=True)
        command = [sys.executable, "-m", "byol_nb.train", "--accelerator", self.accelerator, "--precision",
                   self.precision, "--devices", str(devices), *(["--strategy", "ddp"] if devices > 1 else []),
                   "--no-progress", "--out", str(out), *flags]
        # CPU processes get one thread each, so that two of them share two cores without waiting.
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **({} if self.gpus else {"OMP_NUM_THREADS": "1"})}
        timeout = min(timeout, self.left())
        try:
            done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{name}: no result after {timeout:.0f} s") from None
        if done.returncode != 0:
            raise RuntimeError(f"{name}: exit status {done.returncode}: {root_cause(done.stderr or done.stdout)}")
        metrics = json.loads((out / "metrics.json").read_text())
        shutil.rmtree(out)
        return metrics


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


# A traceback's last line, as each process of a run prints it: "[rank1]: NameError: name ..."
EXCEPTION = re.compile(r"(\[rank\d+\]:\s*)?[A-Za-z_][\w.]*(Error|Exception)\b")


def root_cause(output: str) -> str:
    """The first exception line of a failed run (under DDP the other processes fail after it, with
    connection errors), else its last line (byol_nb's one-line ``error:`` messages)."""
    return next((line.strip()[:300] for line in output.splitlines() if EXCEPTION.match(line.strip())),
                last_line(output))


def say(message: str) -> None:
    print(message, flush=True)


def worst_error(got: Tensor, want: Tensor) -> float:
    """The largest difference over the largest magnitude compared (0 for two zero tensors); NaN wins."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    scale = want.abs().max().clamp_min(1e-30)
    return float(torch.nan_to_num((got - want).abs().max() / scale, nan=float("inf")))


# ---- 1. SyncBatchNorm's fused kernels ---------------------------------------------------------------
@dataclass(frozen=True)
class BatchNormCase:
    shape: tuple[int, ...]
    dtype: torch.dtype
    channels_last: bool

    @property
    def name(self) -> str:
        layout = "(N, C)" if len(self.shape) == 2 else "channels_last" if self.channels_last else "NCHW"
        return f"{str(self.dtype).removeprefix('torch.')} {layout}"


SYNC_BN_CASES = (
    BatchNormCase((128, 64, 8, 8), torch.bfloat16, True),  # a convolution's output under bf16-mixed
    BatchNormCase((128, 64, 8, 8), torch.float32, False),
    BatchNormCase((128, 512), torch.bfloat16, False),  # a projector's hidden layer
)
SYNC_BN_MOMENTUM, SYNC_BN_EPS = 0.1, 1e-5


def batchnorm_inputs(case: BatchNormCase, device: torch.device) -> dict[str, Tensor]:
    """A batch away from zero mean and unit variance, the loss's weights per element (the output's
    gradient), and parameters and running statistics away from their initial values."""
    generator = torch.Generator().manual_seed(0)
    channels = case.shape[1]
    x = (torch.randn(case.shape, generator=generator) * 3 + 1).to(device, case.dtype)
    dy = torch.randn(case.shape, generator=generator).to(device, case.dtype)
    if case.channels_last:
        x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
    return {"x": x, "dy": dy, "weight": (torch.rand(channels, generator=generator) + 0.5).to(device),
            "bias": torch.randn(channels, generator=generator).to(device),
            "running_mean": torch.randn(channels, generator=generator).to(device),
            "running_var": (torch.rand(channels, generator=generator) + 0.5).to(device)}


def two_halves(kernels, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """SyncBatchNorm's forward and backward over two processes, each holding half of the batch, in
    one process: ``byol_nb.distributed._SyncBatchNormFunction``'s calls of ``kernels`` in its order,
    with its dtypes and layouts, the all-gather as a stack of the halves' rows and the all-reduce
    as a sum. Returns the whole batch's output and input gradient, the summed weight and bias
    gradients (DDP's all-reduce) and each process's running statistics."""
    x, dy, weight, bias = inputs["x"], inputs["dy"], inputs["weight"], inputs["bias"]
    halves, grads = x.chunk(2), dy.chunk(2)
    channels = x.shape[1]
    rows = []
    for half in halves:
        mean, invstd = kernels.batch_norm_stats(half, SYNC_BN_EPS)
        rows.append(torch.cat([mean, invstd, mean.new_full((1,), half.numel() // channels)]))
    means, invstds, counts = torch.stack(rows).split(channels, dim=1)
    counts = counts.view(-1)
    out: dict[str, list[Tensor]] = {"y": [], "x_grad": [], "weight_grad": [], "bias_grad": [], "running_mean": [],
                                    "running_var": []}
    saved = []
    for half in halves:
        running_mean, running_var = inputs["running_mean"].clone(), inputs["running_var"].clone()
        mean, invstd = kernels.batch_norm_gather_stats_with_counts(
            half, means, invstds, running_mean, running_var, SYNC_BN_MOMENTUM, SYNC_BN_EPS,
            counts.to(running_mean.dtype))
        out["y"].append(kernels.batch_norm_elemt(half, weight, bias, mean, invstd, SYNC_BN_EPS))
        out["running_mean"].append(running_mean)
        out["running_var"].append(running_var)
        saved.append((mean, invstd))
    sums = []
    for half, grad, (mean, invstd) in zip(halves, grads, saved):
        sum_dy, sum_dy_xmu, weight_grad, bias_grad = kernels.batch_norm_backward_reduce(
            grad, half, mean, invstd, weight, True, True, True)
        sums.append(torch.cat([sum_dy, sum_dy_xmu]))
        out["weight_grad"].append(weight_grad)
        out["bias_grad"].append(bias_grad)
    sum_dy, sum_dy_xmu = torch.stack(sums).sum(0).split(channels)
    for half, grad, (mean, invstd) in zip(halves, grads, saved):
        out["x_grad"].append(kernels.batch_norm_backward_elemt(grad, half, mean, invstd, weight.to(mean.dtype), sum_dy,
                                                               sum_dy_xmu, counts.to(torch.int32)))
    return {"y": torch.cat(out["y"]), "x_grad": torch.cat(out["x_grad"]), "weight_grad": sum(out["weight_grad"]),
            "bias_grad": sum(out["bias_grad"]), "y_halves": out["y"], "x_grad_halves": out["x_grad"],
            **{f"{key}_{process}": value for key in ("running_mean", "running_var")
               for process, value in enumerate(out[key])}}


def one_batchnorm(inputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """What the two halves must give: ``nn.BatchNorm`` in fp32 on the whole batch (the same values)."""
    x = inputs["x"].float().requires_grad_()
    layer = (nn.BatchNorm2d if x.dim() == 4 else nn.BatchNorm1d)(x.shape[1], SYNC_BN_EPS, SYNC_BN_MOMENTUM).to(x.device)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(layer, name).copy_(inputs[name])
    y = layer(x)
    y.backward(inputs["dy"].float())
    return {"y": y.detach(), "x_grad": x.grad, "weight_grad": layer.weight.grad, "bias_grad": layer.bias.grad,
            "running_mean": layer.running_mean, "running_var": layer.running_var}


def against_batchnorm(got: dict[str, Tensor], want: dict[str, Tensor]) -> tuple[str, float]:
    """The compared quantity furthest from BatchNorm's, and its relative error."""
    errors = {key: worst_error(got[key], want[key]) for key in ("y", "x_grad", "weight_grad", "bias_grad")}
    for process in (0, 1):
        errors.update({f"{key} of process {process}": worst_error(got[f"{key}_{process}"], want[key])
                       for key in ("running_mean", "running_var")})
    return max(errors.items(), key=lambda item: item[1])


def layout_and_dtype(got: dict[str, Tensor], x: Tensor) -> list[str]:
    """What SyncBatchNorm promises beyond values: the output and input gradient of each process keep
    its input's dtype and memory format (tests/test_sync_batchnorm.py asserts it of the reference kernels)."""
    problems = []
    for key in ("y_halves", "x_grad_halves"):
        for tensor in got[key]:
            if tensor.dtype != x.dtype:
                problems.append(f"{key.removesuffix('_halves')} in {tensor.dtype}, input in {x.dtype}")
            if x.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last) != x.is_contiguous(
                    memory_format=torch.channels_last):
                problems.append(f"{key.removesuffix('_halves')} lost the input's memory format")
    return sorted(set(problems))


class ComparedKernels:
    """The CUDA kernels, each call also made with the reference kernels on copies of the same
    arguments: records, per kernel, the largest relative difference of every output (and of the
    running statistics it updates in place) and any difference of dtype or memory format; returns
    the CUDA results, so that the pipeline runs on them."""

    def __init__(self, real, reference) -> None:
        self.real, self.reference = real, reference
        self.errors: dict[str, float] = {}
        self.mismatches: set[str] = set()

    def __getattr__(self, name: str) -> Callable:
        def call(*args):
            copies = [a.clone(memory_format=torch.preserve_format) if isinstance(a, Tensor) else a for a in args]
            want, got = getattr(self.real, name)(*args), getattr(self.reference, name)(*copies)
            outputs = list(zip(want if isinstance(want, tuple) else (want,), got if isinstance(got, tuple) else (got,)))
            for real, reference in outputs:
                if (real is None) != (reference is None):
                    self.mismatches.add(f"{name}: an output is None in one of them only")
                elif real is not None and (real.dtype, real.stride()) != (reference.dtype, reference.stride()):
                    self.mismatches.add(f"{name}: {reference.dtype} {reference.stride()} vs CUDA's "
                                        f"{real.dtype} {real.stride()}")
            in_place = [(a, c) for a, c in zip(args, copies) if isinstance(a, Tensor)]  # the running statistics
            for real, reference in [pair for pair in outputs if pair[0] is not None] + in_place:
                self.errors[name] = max(self.errors.get(name, 0.0), worst_error(reference, real))
            return want
        return call


def sync_batchnorm(ctx: Context) -> Iterator[Row]:
    """On a GPU: the CUDA kernels over two halves against BatchNorm on the whole batch, and the CPU
    reference kernels against them call by call. On the CPU: the reference kernels over two halves
    (the CUDA kernels exist only for CUDA tensors)."""
    from byol_nb.distributed import FusedKernels
    from tests.test_sync_batchnorm import REFERENCE

    device = torch.device("cuda" if ctx.gpus else "cpu")
    compared = ComparedKernels(FusedKernels(), REFERENCE) if ctx.gpus else None
    results, values, failed = [], {}, False
    for case in SYNC_BN_CASES:
        inputs = batchnorm_inputs(case, device)
        got = two_halves(compared or REFERENCE, inputs)
        key, error = against_batchnorm(got, one_batchnorm(inputs))
        problems = layout_and_dtype(got, inputs["x"])
        failed |= error > SYNC_BN_TOLERANCE[case.dtype] or bool(problems)
        values[case.name] = {"worst": key, "relative_error": error, "problems": problems}
        results.append(f"{case.name}: {error:.1e} ({key})" + "".join(f"; {p}" for p in problems))
    kernels = "CUDA kernels" if ctx.gpus else "CPU reference kernels (tests/test_sync_batchnorm.py)"
    yield Row("SyncBN kernels", f"{kernels} over two halves of a batch, as 2 processes (gather and all-reduce as a "
                                f"stack and a sum), vs nn.BatchNorm fp32 on the whole batch: y, input/weight/bias "
                                f"grads, each process's running stats; worst relative error",
              "; ".join(results), FAIL if failed else PASS, values)
    if compared is None:
        yield Row("SyncBN reference kernels", "the CPU tests' reference kernels vs torch's CUDA kernels",
                  "needs CUDA: torch's fused batch-norm kernels have no CPU implementation", SKIP)
        return
    worst = max(compared.errors.values())
    yield Row("SyncBN reference kernels", "tests/test_sync_batchnorm.py's reference kernels vs torch's CUDA kernels, "
                                          "each call on copies of the same arguments, over the cases above",
              "; ".join(f"{name}: {error:.1e}" for name, error in compared.errors.items())
              + "".join(f"; {m}" for m in sorted(compared.mismatches)),
              PASS if worst <= SYNC_BN_TOLERANCE[torch.bfloat16] and not compared.mismatches else FAIL,
              {"relative_error": compared.errors, "mismatches": sorted(compared.mismatches)})


# ---- 2. LARS on the device --------------------------------------------------------------------------
def lars_update(ctx: Context) -> Iterator[Row]:
    """byol_nb.optim.LARS on the device against its per-tensor formula in float64 on the CPU, with a
    zero weight (trust ratio 1) and a zero weight without gradient (both norms 0)."""
    from byol_nb.optim import LARS, parameter_groups

    device = torch.device("cuda" if ctx.gpus else "cpu")
    lr, momentum, weight_decay, eta, steps = 20.0, 0.9, 1e-2, 1e-3, 5
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.Linear(128, 32), nn.Linear(32, 8))
    nn.init.zeros_(model[2].weight)
    nn.init.zeros_(model[3].weight)
    still = model[3].weight  # gets zero gradients: ||w|| = ||d|| = 0 on every step
    model.to(device)
    optimizer = LARS(parameter_groups(model, weight_decay), lr=lr, momentum=momentum, weight_decay=weight_decay,
                     trust_coefficient=eta)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    # (weight, momentum buffer, starting weight, lars) per tensor, in float64 on the CPU
    ref = [(p.detach().cpu().double(), torch.zeros(p.shape, dtype=torch.float64), p.detach().cpu().double(),
            group["lars"]) for group in optimizer.param_groups for p in group["params"]]
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        for p, (w, b, _, lars) in zip(params, ref):
            g = torch.zeros(p.shape) if p is still else torch.randn(p.shape, generator=generator)
            p.grad = g.to(device)
            d = g.double() + (weight_decay * w if lars else 0)  # no decay and no adaptation without lars
            if lars:
                w_norm, d_norm = w.norm(), d.norm()
                d = d * (eta * w_norm / d_norm if w_norm > 0 and d_norm > 0 else 1.0)
            b.mul_(momentum).add_(d)
            w.sub_(lr * b)
        optimizer.step()
    # per tensor, as tensors: a NaN must win the max, not vanish in Python's max()
    diff = torch.stack([(p.detach().cpu().double() - w).abs().max() for p, (w, _, _, _) in zip(params, ref)])
    moved = torch.stack([(w - w0).abs().max() for w, _, w0, _ in ref])
    abs_diff, relative = float(diff.max()), float((diff / moved.clamp_min(1e-30)).max())
    yield Row("LARS on device", f"{device.type} float32 vs float64 CPU formula; parameter_groups of a small model, "
                                f"lr {lr}, momentum {momentum}, wd {weight_decay}, eta {eta}, {steps} steps",
              f"max abs diff {abs_diff:.2e}; {relative:.2e} of the update",
              PASS if relative < MAX_LARS_ERROR else FAIL, {"max_abs_diff": abs_diff, "max_relative": relative})


# ---- 3. host syncs per step -------------------------------------------------------------------------
SYNC_WARNING = "synchronizing CUDA operation"  # what torch.cuda.set_sync_debug_mode("warn") says


def caller() -> str:
    """``folder/file.py:line`` of the innermost frame outside torch, the warnings module and this
    file: the line that asked for the sync."""
    for frame in reversed(traceback.extract_stack()):
        if f"{os.sep}torch{os.sep}" not in frame.filename and frame.filename not in (__file__, warnings.__file__):
            path = Path(frame.filename)
            return f"{path.parent.name}/{path.name}:{frame.lineno}"
    return "?"


@contextlib.contextmanager
def host_waits(cuda: bool) -> Iterator[list[str]]:
    """The list of the times the host waits for the device while it is active. On CUDA: the
    synchronisations that torch's sync debug mode reports, each as the line that asked for it. On the
    CPU, which never waits: tests/host_syncs.py's counter of the calls that wait on a GPU (a tensor
    built from host data for a device, an aten op whose result depends on device values, a Python
    read of a tensor's value), the one the CPU tests use, each by kind."""
    if not cuda:
        from tests.host_syncs import counting_host_syncs

        with counting_host_syncs() as seen:
            yield seen
        return
    seen: list[str] = []
    with warnings.catch_warnings():
        warnings.filterwarnings("always", f".*{SYNC_WARNING}")
        shown = warnings.showwarning

        def record(message, category, filename, lineno, file=None, line=None):
            if SYNC_WARNING in str(message):
                seen.append(caller())
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield seen
        finally:
            torch.cuda.set_sync_debug_mode("default")


@contextlib.contextmanager
def cifar_shaped_tensors(ctx: Context) -> Iterator[list[str]]:
    """``--data cifar10`` served from random CIFAR-shaped uint8 images held as a ``TensorImages``
    (48 to train on, 24 to score), through the real DataModule, downloading nothing: its batches
    carry no photo boxes, as torchvision's sets give them."""
    from byol_nb import datamodule
    from byol_nb.datasets import TensorImages

    rng = np.random.default_rng(0)

    def open_dataset(source: str, image_size: int, download: bool = True, whole_photos: bool = False):
        count = 48 if source.endswith(":train") else 24
        images = rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
        return TensorImages(images, [i % 10 for i in range(count)], image_size, [str(c) for c in range(10)])

    with mock.patch.multiple(datamodule, open_dataset=open_dataset, download=lambda name: None,
                             is_downloaded=lambda name: False):
        yield ["--data", "cifar10"]


@contextlib.contextmanager
def shapes_folder(ctx: Context) -> Iterator[list[str]]:
    """The built-in shapes as a folder of PNG files: its batches carry each photo's box."""
    yield ["--data", str(ctx.shapes() / "train")]


def host_syncs(ctx: Context) -> Iterator[Row]:
    """A step that waits for the device leaves the GPU idle while the host catches up: only the
    logging steps may read values. ``byol_nb.train.main`` in this process, counted per step, for
    every method on both data paths."""
    import pytorch_lightning as pl

    from byol_nb import train

    class StepMarks(pl.Callback):
        def __init__(self, seen: list[str]) -> None:
            self.seen, self.marks = seen, []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
            self.marks.append(len(self.seen))

    paths = {"shapes folder (batches with photo boxes)": shapes_folder,
             "CIFAR-shaped tensors without boxes (--data cifar10's path, TensorImages)": cifar_shaped_tensors}
    what = ("CUDA syncs (set_sync_debug_mode)" if ctx.gpus else
            "would-be syncs (CPU: host-data tensors for a device, value-dependent aten ops, value reads)")
    build_trainer, quiet = train.build_trainer, io.StringIO()
    for path, data in paths.items():
        worst, where, blind, errors = {}, {}, [], {}
        for index, name in enumerate(SYNC_METHODS):
            out = ctx.work / "runs" / f"syncs_{index}"
            shutil.rmtree(out, ignore_errors=True)
            try:
                with data(ctx) as flags, host_waits(ctx.gpus > 0) as seen, contextlib.redirect_stdout(quiet), \
                        contextlib.redirect_stderr(quiet):  # its own report and Lightning's
                    marks = StepMarks(seen)
                    with mock.patch.object(train, "build_trainer", lambda args, callbacks, logger: build_trainer(
                            args, [*callbacks, marks], logger)):
                        train.main([*flags, "--image-size", "32", "--batch-size", "4", "--proj-hidden", "32",
                                    "--max-steps", str(SYNC_STEPS), "--log-every-n-steps", str(SYNC_LOG_EVERY),
                                    "--accelerator", ctx.accelerator, "--precision", ctx.precision, "--no-progress",
                                    "--out", str(out), *METHODS[name]])
            except Exception as error:  # one method's failure must not hide the others'
                errors[name] = one_line(error)
                continue
            finally:
                shutil.rmtree(out, ignore_errors=True)  # only the step marks are needed
            per_step = [seen[a:b] for a, b in zip(marks.marks, marks.marks[1:])]  # step k up to the start of k + 1
            steady = [events for k, events in enumerate(per_step) if k > 0 and (k + 1) % SYNC_LOG_EVERY]
            worst[name] = max(len(events) for events in steady)
            where[name] = Counter(event for events in steady for event in events).most_common(3)
            # The logging steps read the loss: a counter that saw nothing there counts nothing at all.
            if not all(events for k, events in enumerate(per_step) if (k + 1) % SYNC_LOG_EVERY == 0):
                blind.append(name)
            say(f"  {name:<26} per step {[len(events) for events in per_step]}")
        parts = [f"{name}: {n}" + (" (" + ", ".join(f"{e} x{c}" for e, c in where[name]) + ")" if n else "")
                 for name, n in worst.items()]
        parts += [f"{name}: {error}" for name, error in errors.items()]
        if blind:
            parts.append(f"no sync seen on logging steps of {', '.join(blind)}: the count is broken")
        yield Row("host syncs", f"{path}; {what} per non-logging step; {SYNC_STEPS} steps, batch 4, 32 px, "
                                f"logging every {SYNC_LOG_EVERY}",
                  "; ".join(parts), PASS if worst and max(worst.values()) == 0 and not blind and not errors else FAIL,
                  {"per_method": worst, "where": {name: dict(w) for name, w in where.items()}, "errors": errors,
                   "max_per_steady_step": max(worst.values(), default=None)})


# ---- 4. speed at the cifar10 preset -----------------------------------------------------------------
def preset_spec(ctx: Context, task: str) -> dict:
    """bench.worker's run of byol_nb on the cifar10 preset's recipe (``--data cifar10``: 32 px, small
    stem, 4096 hidden, batch 256; the dry run: batch 8, 64 hidden), on random pixels."""
    return dict(task=task, runner="byol_nb", size=32, batch=8 if ctx.dry_run else 256,
                steps=ctx.steps * (2 if task == "paired" else 1), warmup=ctx.warmup,
                flags=["--data", "cifar10", *(["--proj-hidden", "64"] if ctx.dry_run else [])],
                pixels=str(cached_pixels(None, 32)))


def speed(ctx: Context) -> Iterator[Row]:
    """Steady images/s at the cifar10 preset's shape (the median step after the warm-up steps, timed
    in bench.worker, each step waited for); the full step over the ideal step, in alternating blocks
    of one process (bench.peers.paired_ratio); peak memory of the speed run."""
    spec = preset_spec(ctx, "speed")
    shape = f"cifar10 preset: 32 px, small stem, {'64' if ctx.dry_run else '4096'} hidden, batch {spec['batch']}"
    timed = f"median of {spec['steps']} steps after {spec['warmup']} warm-up"
    try:
        result = ctx.worker("preset speed", spec)
        step_s = spec["batch"] / result["images_per_s"]
        say(f"  {result['images_per_s']:8.1f} images/s, step {1000 * step_s:.1f} ms")
        yield Row("speed", f"byol_nb, {shape}, 1 device of {ctx.where}; {timed}",
                  f"{result['images_per_s']:.0f} img/s (step {1000 * step_s:.1f} ms)", INFO,
                  {"images_per_s": result["images_per_s"], "step_s": step_s})
        peak = result["peak_mb"]
        what = ("torch.cuda.max_memory_allocated" if ctx.gpus else
                "resident memory above the worker's start, process and DataLoader workers (psutil, every 10 ms)")
        yield Row("peak memory", f"the speed run above: {what}",
                  "psutil not installed" if peak is None else f"{peak:.0f} MB", SKIP if peak is None else INFO,
                  {"peak_mb": peak})
    except Exception as error:  # the ratio below is measured apart
        yield Row("speed", f"byol_nb, {shape}", one_line(error), FAIL)
    paired = ctx.worker("preset paired", preset_spec(ctx, "paired"))
    ratio = paired["ratio"]
    say(f"  step / ideal step {ratio:.2f}x")
    yield Row("step / ideal step", f"byol_nb's full step over forward, loss and backward alone on views made once, "
                                   f"{shape}, alternating blocks in one process, {ctx.where}",
              f"{ratio:.2f}x (threshold {MAX_STEP_OVER_IDEAL}x on a GPU)",
              (PASS if ratio <= MAX_STEP_OVER_IDEAL else FAIL) if ctx.gpus else INFO,
              {"ratio": ratio, "full_s": paired["full_s"], "ideal_s": paired["ideal_s"]})


# ---- 5. ddp_notebook from a notebook ----------------------------------------------------------------
NOTEBOOK_CELL = """\
import pytorch_lightning as pl

from byol_nb.config import TrainConfig
from byol_nb.datamodule import SSLDataModule
from byol_nb.devices import check_fork_safe
from byol_nb.module import BYOLModule

check_fork_safe("ddp_notebook")  # nothing in this kernel has touched CUDA
config = TrainConfig(image_size=32, batch_size=8, proj_hidden=64)
datamodule = SSLDataModule.from_config(config, {data!r})
trainer = pl.Trainer(accelerator={accelerator!r}, devices={devices}, strategy="ddp_notebook", precision={precision!r},
                     max_steps=2, logger=False, enable_checkpointing=False, enable_model_summary=False,
                     enable_progress_bar=False, limit_val_batches=0)
trainer.fit(BYOLModule(config), datamodule=datamodule)
print(f"world_size {{trainer.world_size}}, loss {{float(trainer.callback_metrics['train/loss']):.4f}}")
"""


def notebook_ddp(ctx: Context) -> Iterator[Row]:
    """Lesson 05's second path: Lightning forks the kernel once per device; fails if anything in the
    kernel initialised CUDA first, or if a forked worker cannot train."""
    try:
        import nbclient
        import nbformat
        from jupyter_client.manager import KernelManager
    except ImportError as error:
        yield Row("ddp_notebook", "a notebook executed with nbclient", f"{error.name} not installed", SKIP)
        return
    devices = min(ctx.gpus, 2) or 2
    source = NOTEBOOK_CELL.format(data=str(ctx.shapes() / "train"), accelerator=ctx.accelerator, devices=devices,
                                  precision=ctx.precision)
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)])
    # Kernel sockets as files in a private folder, as tests/test_notebooks.py starts its kernels.
    kernel = KernelManager(kernel_name="python3", transport="ipc", ip=str(ctx.work / "kernel"))
    try:
        nbclient.NotebookClient(notebook, km=kernel, timeout=min(TRAIN_TIMEOUT_S, ctx.left()), allow_errors=True,
                                resources={"metadata": {"path": str(REPO)}}).execute()
    finally:  # nbclient stops only the kernels it started itself
        if kernel.has_kernel:
            kernel.shutdown_kernel(now=True)
    outputs = notebook.cells[0].outputs
    errors = [f"{o.ename}: {last_line(o.evalue)}" for o in outputs if o.output_type == "error"]
    printed = last_line("".join(o.get("text", "") for o in outputs if o.get("name") == "stdout"))
    where = f"{devices} GPU(s), bf16-mixed" if ctx.gpus else "2 CPU processes, gloo, fp32"
    yield Row("ddp_notebook", f"Trainer(strategy='ddp_notebook') in a Jupyter kernel, {where}, 2 steps",
              errors[0] if errors else printed, FAIL if errors else PASS, {"errors": errors})


# ---- 6. real photos ---------------------------------------------------------------------------------
def cifar10_recipe() -> list[str]:
    """The cifar10 preset's recipe as flags for a folder of photos, which gets no preset; the run's
    length and warmup are its own."""
    from byol_nb.cli import DATA_DEFAULTS, command_line

    recipe = DATA_DEFAULTS["cifar10"]
    return command_line(**{name: value for name, value in recipe.items() if name not in ("warmup_epochs", "max_epochs")})


def photo_steps(ctx: Context) -> tuple[int, str]:
    """The real-photo run's length: ``PHOTO_TRAIN_S`` (less when the budget is short) at the speed
    check's step time, and how it was chosen."""
    train_s = min(PHOTO_TRAIN_S, ctx.left() - PHOTO_OVERHEAD_S)
    measured = ctx.measured.get("preset speed")
    if measured is None:
        return PHOTO_FALLBACK_STEPS, "the speed check gave no step time"
    step_s = measured["batch"] / measured["images_per_s"]
    return max(1, int(train_s / step_s)), f"{train_s:.0f} s at the speed check's {1000 * step_s:.1f} ms per step"


def real_photos(ctx: Context) -> Iterator[Row]:
    """Does training learn? The cifar10 preset's recipe on the CIFAR-10 subset's folders (10,000
    training and 2,000 test photos), scored by the run's own kNN top-1 against the same network at
    its random initialisation (``knn_top1`` and ``knn_top1_random_init`` of metrics.json)."""
    if not find_subset():
        yield Row("real photos", "the CIFAR-10 subset", f"not found: no {SUBSET} and none of "
                                                       f"{', '.join(map(str, SUBSET_TARS))}", SKIP)
        return
    if ctx.dry_run:
        steps, why = 3, "dry run"
        flags = ["--batch-size", "32", "--proj-hidden", "64", "--warmup-steps", "1"]
        recipe = "batch 32, 64 hidden, standard stem (the small stem's final kNN scoring is minutes on a CPU)"
    else:
        steps, why = photo_steps(ctx)
        flags = [*cifar10_recipe(), "--warmup-steps", str(max(1, round(steps * PRESET_WARMUP_SHARE)))]
        recipe = "the cifar10 preset's recipe (" + " ".join(flags) + ")"
    say(f"  {steps} steps ({why})")
    metrics = ctx.train("photos", "--data", str(SUBSET / "train"), "--val-data", str(SUBSET / "test"), *flags,
                        "--max-steps", str(steps), "--save-every-n-steps", str(steps + 1),
                        "--knn-every-n-epochs", str(steps), timeout=TRAIN_TIMEOUT_S + PHOTO_TRAIN_S)
    trained, random_init = metrics["knn_top1"], metrics["knn_top1_random_init"]
    gain = trained - random_init
    yield Row("real photos", f"python -m byol_nb.train on the CIFAR-10 subset's folders, {recipe}, {steps} steps "
                             f"({why}), {ctx.where}; kNN top-1 on its 2,000 test photos",
              f"{trained:.1f}% trained vs {random_init:.1f}% at random initialisation: {gain:+.1f} points in "
              f"{metrics['wall_time_s']:.0f} s ({metrics['images_per_second']:.0f} img/s; threshold +{MIN_KNN_GAIN:.0f}"
              f" on a GPU)", (PASS if gain >= MIN_KNN_GAIN else FAIL) if ctx.gpus else INFO,
              {key: metrics[key] for key in ("knn_top1", "knn_top1_random_init", "global_step", "wall_time_s",
                                             "images_per_second", "final_loss")})


# ---- 7. the peers -----------------------------------------------------------------------------------
def peers(ctx: Context) -> Iterator[Row]:
    """Training images/s of byol_nb and its peers, same device, batch and steps (bench.peers: the
    standard stem, 1024 hidden), where a peer is installed."""
    names = [name for name in PEERS if name != "byol_nb"]
    missing = [name for name in names if importlib.util.find_spec(PEER_MODULES[name]) is None]
    if not ctx.peers or len(missing) == len(names):
        yield Row("peers", "byol_nb vs " + ", ".join(names),
                  "not measured (--peers)" if not ctx.peers else "none installed", SKIP)
        return
    batch = 8 if ctx.dry_run else 64
    for size in [32] if ctx.dry_run else [96, 224]:
        setting = f"{size} px, batch {batch}, 1 device of {ctx.where}, median of {ctx.steps} steps after {ctx.warmup}"
        try:
            speeds = {}
            for name in [n for n in PEERS if n not in missing]:
                spec = dict(task="speed", runner=name, size=size, batch=batch, steps=ctx.steps, warmup=ctx.warmup,
                            pixels=str(cached_pixels(None, size)))
                speeds[name] = ctx.worker(f"{name} {size}", spec)["images_per_s"]
                say(f"  {size:>3} px  {name:<13} {speeds[name]:8.1f} images/s")
        except Exception as error:  # a crashed peer leaves the other size to measure
            yield Row("peers", setting, one_line(error), FAIL)
            continue
        others = {name: value for name, value in speeds.items() if name != "byol_nb"}
        speedup = speeds["byol_nb"] / max(others.values())
        parts = [f"byol_nb {speeds['byol_nb']:.0f} img/s"] + [
            f"{name} {value:.0f} (byol_nb {speeds['byol_nb'] / value:.2f}x)" for name, value in others.items()]
        yield Row("peers", setting, "; ".join(parts + [f"{name} not installed" for name in missing]),
                  (PASS if speedup >= MIN_SPEEDUP else FAIL) if ctx.gpus else INFO,
                  {"images_per_s": speeds, "speedup_over_fastest_peer": speedup})


# ---- 8. two devices ---------------------------------------------------------------------------------
def every_method(ctx: Context) -> Iterator[Row]:
    """The multi-GPU code path of each method: Lightning's launcher, DDP, SyncBN, the gathers."""
    if ctx.gpus == 1:
        yield Row("2-device methods", "every method on 2 GPUs", "1 GPU: needs 2", SKIP)
        return
    how = "2 GPUs, NCCL, SyncBN, bf16-mixed, channels_last" if ctx.gpus else "2 CPU processes, gloo, SyncBN, fp32"
    shapes = ctx.shapes()
    for index, name in enumerate(DRY_RUN_METHODS if ctx.dry_run else METHODS):
        try:
            metrics = ctx.train(f"method_{index}",
                                "--data", str(shapes / "train"), "--val-data", str(shapes / "test"), "--image-size",
                                "32", "--batch-size", "8", "--proj-hidden", "64", "--max-steps", "3", *METHODS[name],
                                devices=2)
        except Exception as error:  # one method's failure must not hide the others'
            yield Row("2-device methods", f"{name}; {how}", one_line(error), FAIL)
            continue
        ok = metrics["world_size"] == 2 and metrics["global_step"] == 3 and metrics["config"]["sync_bn"]
        say(f"  {name:<40} world_size {metrics['world_size']}, {metrics['global_step']} steps")
        yield Row("2-device methods", f"{name}; {how}",
                  f"exit 0, world_size {metrics['world_size']}, {metrics['global_step']} steps, "
                  f"loss {metrics['final_loss']}", PASS if ok else FAIL,
                  {key: metrics[key] for key in ("world_size", "global_step", "final_loss")})


def scaling(ctx: Context) -> Iterator[Row]:
    """byol_nb.train on every device against one, measured alike (ThroughputMonitor: every step)."""
    devices = ctx.gpus if ctx.gpus else 2
    if devices < 2:
        yield Row("scaling", "all GPUs", "1 GPU: no scaling to measure", SKIP)
        return
    size, batch = (32, 8) if ctx.dry_run else (224, 64)
    data = ctx.random_images(size, min(batch * devices * 4, 2048))
    steps = 5 * ctx.steps
    flags = ["--data", str(data), "--image-size", str(size), "--batch-size", str(batch),
             "--max-steps", str(steps), "--save-every-n-steps", str(steps + 1)]
    one = ctx.train("scaling_1", *flags)["images_per_second"]
    say(f"  {size:>3} px  byol_nb on 1 device  {one:8.1f} images/s")
    every = ctx.train(f"scaling_{devices}", *flags, devices=devices)["images_per_second"]
    say(f"  {size:>3} px  byol_nb on {devices} devices {every:8.1f} images/s")
    efficiency = every / (devices * one)
    what = f"{devices} GPUs, ddp" if ctx.gpus else "2 CPU processes, gloo (no threshold on the CPU)"
    yield Row("scaling", f"byol_nb.train on {what}, {size} px, batch {batch} per process, {steps} steps",
              f"{every:.0f} img/s vs {one:.0f} on one: scaling {efficiency:.0%}",
              (PASS if efficiency >= MIN_SCALING else FAIL) if ctx.gpus else INFO,
              {"images_per_s_one": one, "images_per_s_all": every, "devices": devices, "efficiency": efficiency})


@dataclass(frozen=True)
class Check:
    """One check, and the seconds it is expected to take here (a planning figure for ``--budget-s``:
    a check is started only when that many are left; BENCHMARKS.md records what runs took)."""

    name: str
    run: Callable[[Context], Iterator[Row]]
    seconds: Callable[[Context], float]


def photo_seconds(ctx: Context) -> float:
    return PHOTO_OVERHEAD_S + (0 if ctx.dry_run else 60)  # at least a minute of training, else no verdict


def two_device_seconds(ctx: Context) -> float:
    return 0 if ctx.gpus == 1 else 40 * len(DRY_RUN_METHODS if ctx.dry_run else METHODS)


CHECKS = [
    Check("SyncBN kernels", sync_batchnorm, lambda ctx: 15),
    Check("LARS on device", lars_update, lambda ctx: 5),
    Check("host syncs", host_syncs, lambda ctx: 90),
    Check("speed", speed, lambda ctx: 75),
    Check("ddp_notebook", notebook_ddp, lambda ctx: 45),
    Check("real photos", real_photos, photo_seconds),
    Check("peers", peers, lambda ctx: 0 if not ctx.peers else 150),
    Check("2-device methods", every_method, two_device_seconds),
    Check("scaling", scaling, lambda ctx: 0 if ctx.gpus == 1 else 60),
]


def one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {root_cause(str(error))}"


def table(rows: list[Row]) -> str:
    cell = lambda text: str(text).replace("|", "\\|")  # noqa: E731
    lines = ["| check | setting | result | verdict |", "|---|---|---|---|"]
    lines += [f"| {cell(r.check)} | {cell(r.setting)} | {cell(r.result)} | {r.verdict} |" for r in rows]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true",
                   help="the same checks at tiny sizes on the CPU (GPUs hidden), peers skipped")
    p.add_argument("--peers", action="store_true", help="with --dry-run: measure the installed peers too")
    p.add_argument("--steps", type=int, default=None, help="timed steps per speed run (default: 30; 3 dry)")
    p.add_argument("--budget-s", type=float, default=None,
                   help=f"start no check that would end past this many seconds; its row says SKIP (default: "
                        f"{DEFAULT_BUDGET_S} on a GPU, none in the dry run)")
    p.add_argument("--out", type=Path, default=RESULTS / "gpu_check.json",
                   help="the JSON report (default: bench/results/gpu_check.json); work files go beside it")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the CPU's run, here and in every subprocess
    gpus = torch.cuda.device_count()  # through NVML: CUDA stays uninitialised
    if not gpus and not args.dry_run:
        raise SystemExit("error: no GPU visible (torch.cuda.device_count() is 0): run with --dry-run on the CPU")
    work = args.out.parent / f"{args.out.stem}_work"
    work.mkdir(parents=True, exist_ok=True)
    budget = args.budget_s if args.budget_s is not None else (None if args.dry_run else DEFAULT_BUDGET_S)
    ctx = Context(args.dry_run, gpus, args.steps or (3 if args.dry_run else 30), args.peers or not args.dry_run, work,
                  budget)
    rows, took = [], {}
    for index, check in enumerate(CHECKS, 1):
        need = check.seconds(ctx)
        say(f"[{index}/{len(CHECKS)}] {check.name} ({ctx.elapsed():.0f} s)")
        if need > ctx.left():
            rows.append(Row(check.name, "", f"not started: {max(0, ctx.left()):.0f} s of --budget-s {budget:.0f} "
                                            f"left, it needs about {need:.0f} s", SKIP))
            say(f"  -> SKIP: {rows[-1].result}")
            continue
        begun = ctx.elapsed()
        try:
            for row in check.run(ctx):
                rows.append(row)
                say(f"  -> {row.verdict}: {row.result}")
        except Exception as error:  # reported as a row; the next check runs
            rows.append(Row(check.name, "", one_line(error), FAIL))
            say(f"  -> FAIL: {rows[-1].result}")
        took[check.name] = round(ctx.elapsed() - begun, 1)
    report = {"dry_run": args.dry_run, "device": torch.cuda.get_device_name() if gpus else "CPU", "gpus": gpus,
              "torch": torch.__version__, "budget_s": budget, "wall_s": round(ctx.elapsed(), 1), "check_s": took,
              "failed": sum(r.verdict == FAIL for r in rows), "rows": [asdict(r) for r in rows]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print("\n" + table(rows) + "\n")
    print(json.dumps(report))
    say(f"{report['wall_s']:.0f} s ({', '.join(f'{name} {s:.0f}' for name, s in took.items())}); "
        f"{report['failed']} failed; written to {args.out}")
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
