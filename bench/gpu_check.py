"""The GPU check: byol_nb's speed against its peers and across GPUs, host syncs per step, peak
memory, every method on 2 devices, LARS on the device and ddp_notebook from a notebook, in one command.

    python -m bench.gpu_check              # on a machine with one or more GPUs
    python -m bench.gpu_check --dry-run    # the same checks, tiny, on the CPU: tests the script itself

Prints one markdown table (check, setting, result, verdict) and one JSON line, and writes the JSON
to --out. A check that raises becomes a FAIL row with its error and the next check runs; the exit
status is 1 when any row failed. Verdicts: PASS or FAIL against a threshold; INFO for a number
without one (memory, 32 px speed, and every speed figure of the dry run: a shared CPU says nothing
about GPU targets); SKIP for what cannot run here (the 2-device checks on one GPU, a missing package).
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
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator
from unittest import mock

import torch
from PIL import Image
from torch import nn

from bench.peers import PEERS
from bench.run import REPO, RESULTS, cached_pixels, run_worker

PASS, FAIL, INFO, SKIP = "PASS", "FAIL", "INFO", "SKIP"
PEER_MODULES = {"byol-pytorch": "byol_pytorch", "lightly": "lightly"}
MIN_SPEEDUP = 1.5  # byol_nb over the faster peer, at 96 and 224 px
MIN_SCALING = 0.85  # all-GPU images/s over N x one-GPU images/s
MAX_LARS_ERROR = 1e-5  # relative to the update
TRAIN_TIMEOUT_S = 300
# Every method and variant as flags of python -m byol_nb.train (32 px; the small stem gives 4x4 maps).
METHODS = {
    "byol": [],
    "byol --local-views 1": ["--local-views", "1"],
    "pixpro --small-stem": ["--method", "pixpro", "--small-stem"],
    "pixpro --small-stem --instance-weight 0": ["--method", "pixpro", "--small-stem", "--instance-weight", "0"],
    "pixcontrast --small-stem": ["--method", "pixcontrast", "--small-stem"],
}
SYNC_METHODS = ("byol --local-views 1", "pixpro --small-stem", "pixcontrast --small-stem")
SYNC_STEPS, SYNC_LOG_EVERY = 8, 4  # within the first epoch of the 48 tiny images in batches of 4
# What reads a tensor's value on the host (tests/test_host_reads.py counts the same calls).
READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy")


@dataclass
class Row:
    check: str
    setting: str
    result: str
    verdict: str
    values: dict = field(default_factory=dict)  # the numbers behind ``result``, for the JSON


@dataclass
class Context:
    """What every check needs: the run's sizes, where its files go, and measurements kept for reuse."""

    dry_run: bool
    gpus: int  # 0: the CPU (dry run)
    steps: int
    peers: bool
    work: Path
    speeds: dict = field(default_factory=dict)

    @property
    def accelerator(self) -> str:
        return "gpu" if self.gpus else "cpu"

    @property
    def precision(self) -> str:
        return "bf16-mixed" if self.gpus else "32"

    @property
    def batch(self) -> int:
        return 8 if self.dry_run else 64

    @property
    def warmup(self) -> int:
        return 1 if self.dry_run else 5

    @property
    def sizes(self) -> list[int]:
        return [32] if self.dry_run else [32, 96, 224]

    @property
    def where(self) -> str:
        return f"{self.gpus} GPU(s)" if self.gpus else "CPU (dry run)"

    def speed(self, runner: str, size: int) -> dict:
        """bench.worker's speed task in a fresh process; kept, since peak memory reads byol_nb's run."""
        if (runner, size) not in self.speeds:
            spec = dict(task="speed", runner=runner, size=size, batch=self.batch, steps=self.steps,
                        warmup=self.warmup, workers=min(8, os.cpu_count() or 1),
                        pixels=str(cached_pixels(None, size)))
            self.speeds[runner, size] = run_worker(spec)
        return self.speeds[runner, size]

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

    def train(self, name: str, *flags: str, devices: int = 1) -> dict:
        """``python -m byol_nb.train`` in a subprocess (``--strategy ddp`` on several devices); its metrics.json.

        The run's folder is removed once read: the check needs only the metrics, and each run's
        checkpoints hold a few hundred MB."""
        out = self.work / "runs" / name
        shutil.rmtree(out, ignore_errors=True)
        command = [sys.executable, "-m", "byol_nb.train", "--accelerator", self.accelerator, "--precision",
                   self.precision, "--devices", str(devices), *(["--strategy", "ddp"] if devices > 1 else []),
                   "--no-progress", "--out", str(out), *flags]
        # CPU processes get one thread each, so that two of them share two cores without waiting.
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **({} if self.gpus else {"OMP_NUM_THREADS": "1"})}
        try:
            done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=TRAIN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{name}: no result after {TRAIN_TIMEOUT_S} s") from None
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


# ---- 1. throughput --------------------------------------------------------------------------------
def throughput(ctx: Context) -> Iterator[Row]:
    """Training images/s of byol_nb and its peers, same device, batch and steps; then byol_nb on
    every device against one, each through ``python -m byol_nb.train``, measured alike."""
    for size in ctx.sizes:
        stem = " (standard stem: bench.peers.Setup has no small-stem option)" if size == 32 else ""
        setting = f"{size} px{stem}, batch {ctx.batch}, 1 device of {ctx.where}, {ctx.steps} timed steps"
        try:
            speeds, notes = {}, []
            for name in PEERS:
                if name != "byol_nb" and not ctx.peers:
                    notes.append(f"{name} skipped (--peers)")
                elif name != "byol_nb" and importlib.util.find_spec(PEER_MODULES[name]) is None:
                    notes.append(f"{name} not installed")
                else:
                    speeds[name] = ctx.speed(name, size)["images_per_s"]
                    say(f"  {size:>3} px  {name:<13} {speeds[name]:8.1f} images/s")
        except Exception as error:  # a crashed peer leaves the other sizes and the scaling run to measure
            yield Row("throughput", setting, one_line(error), FAIL)
            continue
        peers = {name: value for name, value in speeds.items() if name != "byol_nb"}
        speedup = speeds["byol_nb"] / max(peers.values()) if peers else None
        parts = [f"byol_nb {speeds['byol_nb']:.0f} img/s"] + [
            f"{name} {value:.0f} (byol_nb {speeds['byol_nb'] / value:.2f}x)" for name, value in peers.items()]
        judged = bool(ctx.gpus) and size in (96, 224) and speedup is not None
        verdict = (PASS if speedup >= MIN_SPEEDUP else FAIL) if judged else INFO
        yield Row("throughput", setting, "; ".join(parts + notes), verdict,
                  {"images_per_s": speeds, "speedup_over_fastest_peer": speedup})
    yield from scaling(ctx)


def scaling(ctx: Context) -> Iterator[Row]:
    devices = ctx.gpus if ctx.gpus else 2
    size = ctx.sizes[-1]
    if devices < 2:
        yield Row("throughput", "all GPUs", "1 GPU: no scaling to measure", SKIP)
        return
    data = ctx.random_images(size, min(ctx.batch * devices * 4, 2048))
    steps = 5 * ctx.steps
    flags = ["--data", str(data), "--image-size", str(size), "--batch-size", str(ctx.batch),
             "--max-steps", str(steps), "--save-every-n-steps", str(steps)]
    one = ctx.train("scaling_1", *flags)["images_per_second"]
    say(f"  {size:>3} px  byol_nb on 1 device  {one:8.1f} images/s")
    every = ctx.train(f"scaling_{devices}", *flags, devices=devices)["images_per_second"]
    say(f"  {size:>3} px  byol_nb on {devices} devices {every:8.1f} images/s")
    efficiency = every / (devices * one)
    what = f"{devices} GPUs, ddp" if ctx.gpus else "2 CPU processes, gloo (no threshold on the CPU)"
    yield Row("throughput", f"byol_nb.train on {what}, {size} px, batch {ctx.batch} per process, {steps} steps",
              f"{every:.0f} img/s vs {one:.0f} on one: scaling {efficiency:.0%}",
              (PASS if efficiency >= MIN_SCALING else FAIL) if ctx.gpus else INFO,
              {"images_per_s_one": one, "images_per_s_all": every, "devices": devices, "efficiency": efficiency})


# ---- 2. host syncs per step -----------------------------------------------------------------------
@contextlib.contextmanager
def host_waits(cuda: bool) -> Iterator[Callable[[], int]]:
    """A counter of the times the host waits for the device: on CUDA the synchronisations that
    torch's sync debug mode reports; on the CPU, which never waits, the calls that would read a
    device value on the host (each one a synchronisation on a GPU)."""
    if cuda:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield lambda: sum("synchronizing CUDA operation" in str(w.message) for w in caught)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return
    reads = [0]

    def counted(original: Callable) -> Callable:
        def read(self, *args, **kwargs):
            reads[0] += 1
            return original(self, *args, **kwargs)
        return read

    originals = {name: getattr(torch.Tensor, name) for name in READS}
    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, counted(original))
        yield lambda: reads[0]
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def host_syncs(ctx: Context) -> Iterator[Row]:
    """A step that waits for the device leaves the GPU idle while the host catches up: only the
    logging steps may read values. ``byol_nb.train.main`` in this process, counted per step."""
    import pytorch_lightning as pl

    from byol_nb import train

    class StepMarks(pl.Callback):
        def __init__(self, count: Callable[[], int]) -> None:
            self.count, self.marks = count, []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
            self.marks.append(self.count())

    shapes, build_trainer, worst, blind = ctx.shapes(), train.build_trainer, {}, []
    for index, name in enumerate(SYNC_METHODS):
        out = ctx.work / "runs" / f"syncs_{index}"
        shutil.rmtree(out, ignore_errors=True)
        with host_waits(ctx.gpus > 0) as count, contextlib.redirect_stdout(io.StringIO()):  # its own report
            marks = StepMarks(count)
            with mock.patch.object(train, "build_trainer", lambda args, callbacks, logger: build_trainer(
                    args, [*callbacks, marks], logger)):
                train.main(["--data", str(shapes / "train"), "--image-size", "32", "--batch-size", "4",
                            "--proj-hidden", "32", "--max-steps", str(SYNC_STEPS), "--log-every-n-steps",
                            str(SYNC_LOG_EVERY), "--accelerator", ctx.accelerator, "--precision", ctx.precision,
                            "--no-progress", "--out", str(out), *METHODS[name]])
        shutil.rmtree(out)  # only the step marks are needed
        per_step = [b - a for a, b in zip(marks.marks, marks.marks[1:])]  # step k, up to the start of k + 1
        worst[name] = max(n for k, n in enumerate(per_step) if k > 0 and (k + 1) % SYNC_LOG_EVERY)
        # The logging steps read the loss: a counter that saw nothing there counts nothing at all.
        if not all(n for k, n in enumerate(per_step) if (k + 1) % SYNC_LOG_EVERY == 0):
            blind.append(name)
        say(f"  {name:<26} per step {per_step}")
    what = "CUDA syncs (set_sync_debug_mode)" if ctx.gpus else "host reads of tensor values (CPU)"
    result = "; ".join(f"{name}: {n}" for name, n in worst.items())
    yield Row("host syncs", f"{what} per non-logging step; {SYNC_STEPS} steps, batch 4, 32 px, "
                            f"logging every {SYNC_LOG_EVERY}",
              result + (f"; no sync seen on logging steps of {', '.join(blind)}: the count is broken" if blind else ""),
              PASS if max(worst.values()) == 0 and not blind else FAIL,
              {"per_method": worst, "max_per_steady_step": max(worst.values())})


# ---- 3. peak memory -------------------------------------------------------------------------------
def peak_memory(ctx: Context) -> Iterator[Row]:
    """byol_nb's own training run at the largest size; bench.worker.PeakMemory measures it."""
    size = ctx.sizes[-1]
    peak = ctx.speed("byol_nb", size)["peak_mb"]
    what = ("torch.cuda.max_memory_allocated" if ctx.gpus else
            "resident memory above the worker's start, process and DataLoader workers (psutil, every 10 ms)")
    yield Row("peak memory", f"byol_nb training, {size} px, batch {ctx.batch}: {what}", f"{peak:.0f} MB", INFO,
              {"peak_mb": peak})


# ---- 4. every method on 2 devices -----------------------------------------------------------------
def every_method(ctx: Context) -> Iterator[Row]:
    """The multi-GPU code path of each method: Lightning's launcher, DDP, SyncBatchNorm, the gathers."""
    if ctx.gpus == 1:
        yield Row("2-device methods", "every method on 2 GPUs", "1 GPU: needs 2", SKIP)
        return
    how = "2 GPUs, NCCL, SyncBN, bf16-mixed, channels_last" if ctx.gpus else "2 CPU processes, gloo, SyncBN, fp32"
    shapes = ctx.shapes()
    for index, (name, flags) in enumerate(METHODS.items()):
        try:
            metrics = ctx.train(f"method_{index}",
                                "--data", str(shapes / "train"), "--val-data", str(shapes / "test"), "--image-size",
                                "32", "--batch-size", "8", "--proj-hidden", "64", "--max-steps", "3", *flags, devices=2)
        except Exception as error:  # one method's failure must not hide the others'
            yield Row("2-device methods", f"{name}; {how}", one_line(error), FAIL)
            continue
        ok = metrics["world_size"] == 2 and metrics["global_step"] == 3 and metrics["config"]["sync_bn"]
        say(f"  {name:<40} world_size {metrics['world_size']}, {metrics['global_step']} steps")
        yield Row("2-device methods", f"{name}; {how}",
                  f"exit 0, world_size {metrics['world_size']}, {metrics['global_step']} steps, "
                  f"loss {metrics['final_loss']}", PASS if ok else FAIL,
                  {key: metrics[key] for key in ("world_size", "global_step", "final_loss")})


# ---- 5. LARS on the device ------------------------------------------------------------------------
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


# ---- 6. ddp_notebook from a notebook --------------------------------------------------------------
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
        nbclient.NotebookClient(notebook, km=kernel, timeout=TRAIN_TIMEOUT_S, allow_errors=True,
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


CHECKS: dict[str, Callable[[Context], Iterator[Row]]] = {
    "throughput": throughput,
    "host syncs": host_syncs,
    "peak memory": peak_memory,
    "2-device methods": every_method,
    "LARS on device": lars_update,
    "ddp_notebook": notebook_ddp,
}


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
                   help="the same checks at tiny sizes on the CPU (GPUs hidden): 32 px, batch 8, peers skipped")
    p.add_argument("--peers", action="store_true", help="with --dry-run: measure the installed peers too")
    p.add_argument("--steps", type=int, default=None, help="timed steps per throughput run (default: 30; 3 dry)")
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
    ctx = Context(args.dry_run, gpus, args.steps or (3 if args.dry_run else 30), args.peers or not args.dry_run, work)
    started, rows = time.perf_counter(), []
    for index, (name, check) in enumerate(CHECKS.items(), 1):
        say(f"[{index}/{len(CHECKS)}] {name} ({time.perf_counter() - started:.0f} s)")
        try:
            for row in check(ctx):
                rows.append(row)
                say(f"  -> {row.verdict}: {row.result}")
        except Exception as error:  # reported as a row; the next check runs
            rows.append(Row(name, "", one_line(error), FAIL))
            say(f"  -> FAIL: {rows[-1].result}")
    report = {"dry_run": args.dry_run, "device": torch.cuda.get_device_name() if gpus else "CPU", "gpus": gpus,
              "wall_s": round(time.perf_counter() - started, 1), "failed": sum(r.verdict == FAIL for r in rows),
              "rows": [asdict(r) for r in rows]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print("\n" + table(rows) + "\n")
    print(json.dumps(report))
    say(f"{report['wall_s']:.0f} s; {report['failed']} failed; written to {args.out}")
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
