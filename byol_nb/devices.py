"""Where a run trains: its devices and precision, how its processes are started, and the checks
that stop a launch which would otherwise hang or fail deep inside a worker.

A multi-device run has one process per device, started by a *launcher*: Lightning's own (a
``--strategy ddp`` script re-runs itself once per extra device), torchrun, SLURM's srun, or a fork
of the running process (``ddp_notebook``). This module makes each path safe:

* **Fork safety.** A forked process cannot use CUDA once its parent initialised it. Nothing here
  initialises CUDA in the launching process (devices are counted through NVML, the GPU's bf16
  support is asked in a separate process, and ``import byol_nb`` makes ``torch.cuda.is_available()``
  ask NVML too), :func:`check_fork_safe` stops a fork after CUDA with the remedy, and each forked
  worker checks again (:func:`check_worker_can_use_cuda`). CUDA counts as initialised once the
  process has loaded the CUDA driver (:func:`cuda_driver_loaded`), which ``is_available()`` without
  NVML does while ``torch.cuda.is_initialized()`` stays False.
* **Process counts that fit the machine** (:func:`check_devices`): more processes than GPUs, or
  than CPU cores, stop before anything starts instead of hanging.
* **No orphans.** A process-group timeout (``--dist-timeout``) bounds every wait for another
  process, the launching process stops its workers when it fails (:func:`stop_workers`), and a
  worker whose launching process died stops too (:func:`stop_with_launcher`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from pytorch_lightning.strategies import DDPStrategy

_IMPORTED_BY_PID = os.getpid()
# Whether CUDA was initialised in the process that forked this one (set in the parent right before
# a fork, inherited by the child): a forked worker reads it to fail with the remedy.
_CUDA_INITIALISED_AT_FORK = False


def cuda_driver_loaded(maps: Path = Path("/proc/self/maps")) -> bool:
    """Whether this process has loaded the CUDA driver library (``libcuda.so``): the state a fork
    cannot survive. ``torch.cuda.is_available()`` without NVML loads and initialises the driver
    but leaves ``torch.cuda.is_initialized()`` False, so torch's own flag misses it. Linux only
    (the memory map of the process); elsewhere, torch's flag alone."""
    try:
        return torch.cuda.is_initialized() or "libcuda.so" in maps.read_text()
    except OSError:
        return torch.cuda.is_initialized()


def _note_cuda_state_before_fork() -> None:
    global _CUDA_INITIALISED_AT_FORK
    _CUDA_INITIALISED_AT_FORK = cuda_driver_loaded()


os.register_at_fork(before=_note_cuda_state_before_fork)


class ForkAfterCudaError(RuntimeError):
    """A forking strategy was asked for in a process where CUDA is already initialised."""


def _fork_remedy(call: str) -> str:
    return (f"{call} forks its worker processes, but CUDA is already initialised in the launching process "
            f"(an earlier torch.cuda call, or a model or tensor moved to the GPU) and a forked process cannot "
            f"use CUDA again. Restart the kernel and start training before anything touches the GPU, or train "
            f"in a separate process: byol_nb.launch(devices=N, ...) in a notebook, or python -m byol_nb.train "
            f"--devices N --strategy ddp in a terminal.")


def interactive() -> bool:
    """Whether this is an interactive session (a notebook kernel, a REPL), decided as Lightning does:
    there Lightning's ``strategy="auto"`` forks when it runs on several GPUs."""
    return hasattr(sys, "ps1") or bool(sys.flags.interactive)


def forks(strategy: object, accelerator: str = "auto", devices: int | str = 1) -> bool:
    """Whether ``strategy`` starts its workers by forking this process: ``ddp_notebook`` and
    ``ddp_fork``, and ``auto`` in an interactive session on several GPUs."""
    if isinstance(strategy, str):
        if strategy == "auto":
            several = devices == "auto" or int(devices) > 1
            return interactive() and accelerator != "cpu" and several and torch.cuda.device_count() > 1
        return "notebook" in strategy or "fork" in strategy
    return getattr(strategy, "_start_method", None) in ("fork", "forkserver")


def check_fork_safe(strategy: object, call: str = "trainer.fit", accelerator: str = "auto",
                    devices: int | str = 1) -> None:
    """Raise :class:`ForkAfterCudaError` at once if ``strategy`` forks and this process holds CUDA.

    Without it the failure comes from deep inside each worker ("Cannot re-initialize CUDA in forked
    subprocess"), after the fork. Call it right before ``trainer.fit`` in a notebook
    (``python -m byol_nb.train`` does).
    """
    if forks(strategy, accelerator, devices) and cuda_driver_loaded():
        name = strategy if isinstance(strategy, str) else type(strategy).__name__
        raise ForkAfterCudaError(_fork_remedy(f"{call} with strategy={name!r}"))


def check_worker_can_use_cuda() -> None:
    """In a worker process: raise :class:`ForkAfterCudaError` with the remedy, before it touches the
    GPU, when it was forked from a process that had initialised CUDA."""
    if os.getpid() != _IMPORTED_BY_PID and _CUDA_INITIALISED_AT_FORK:
        raise ForkAfterCudaError(_fork_remedy("this training run"))


def use_fast_gpu_kernels() -> None:
    """In a process that trains on a GPU: let cuDNN time its convolution algorithms once per input
    shape and keep the fastest (every step here has the same shapes), and let float32 matrix
    products that stay in float32 under bf16 autocast (the pixel-contrast logits, the kNN
    similarities) use TF32 tensor cores, whose 10-bit mantissa these scores do not need."""
    torch.backends.cudnn.benchmark = True
    torch.set_float32_matmul_precision("high")


def limit_threads_after_fork() -> None:
    """In a process forked after this module was imported (ddp_notebook's workers), use one CPU
    thread. The OpenMP thread pool of the parent does not survive fork: the child's first parallel
    CPU operation would wait forever for threads that do not exist. (DataLoader workers do the
    same.) Processes started fresh (ddp, torchrun, srun) are left alone."""
    if os.getpid() != _IMPORTED_BY_PID:
        torch.set_num_threads(1)


# ---- devices and precision ----------------------------------------------------------------------

def cpu_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a SLURM or container limit)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_devices(devices: int | str, accelerator: str) -> None:
    """Raise ValueError, naming the fix, when ``devices`` processes per node do not fit this machine:
    more than its GPUs, or (training on the CPU) more than its CPU cores, where the processes
    would share cores, run many times slower and time out in their collective operations."""
    if devices == "auto":
        return
    count, gpus = int(devices), torch.cuda.device_count()  # device_count asks NVML: CUDA stays uninitialised
    if accelerator == "gpu" and gpus == 0:
        raise ValueError("--accelerator gpu but this machine shows no GPU (torch.cuda.device_count() is 0): "
                         "use --accelerator cpu, or check the driver and CUDA_VISIBLE_DEVICES")
    if accelerator != "cpu" and gpus > 0:
        if count > gpus:
            raise ValueError(f"--devices {count} but this machine has {gpus} GPU(s): use --devices {gpus} or fewer "
                             f"(per node)")
        return
    cores = cpu_cores()
    if count > cores:
        raise ValueError(f"--devices {count} starts {count} CPU processes, but this process may use {cores} CPU "
                         f"core(s): use --devices {cores} or fewer (processes sharing a core wait for each other "
                         f"in every step)")


def uses_gpu(accelerator: str) -> bool:
    return accelerator == "gpu" or (accelerator == "auto" and torch.cuda.device_count() > 0)


def gpu_supports_bf16() -> bool:
    """Whether the GPU computes in bf16, asked without initialising CUDA in this process (which a
    later fork could not survive): in a short-lived Python process, unless CUDA is already up here."""
    if torch.cuda.is_initialized():
        return torch.cuda.is_bf16_supported()
    probe = "import torch; print(int(torch.cuda.is_bf16_supported()))"
    try:
        result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0 and result.stdout.strip() == "1"


def cpu_has_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU computes in bf16 natively (AMX or AVX512-BF16 instructions, as Linux lists
    them); on other systems, False."""
    try:
        flags = set(cpuinfo.read_text().split())
    except OSError:
        return False
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def resolve_precision(precision: str, accelerator: str) -> str:
    """``auto``: bf16-mixed on GPUs that support it and on CPUs with bf16 instructions, 32-true
    otherwise (bf16 without such instructions is emulated, slower than fp32). Others: as given."""
    if precision != "auto":
        return precision
    native = gpu_supports_bf16() if uses_gpu(accelerator) else cpu_has_bf16()
    return "bf16-mixed" if native else "32-true"


# ---- processes ----------------------------------------------------------------------------------

def resolve_topology(devices: str, num_nodes: int) -> tuple[int | str, int]:
    """(devices per node, nodes) for the Trainer: from torchrun when it started this process
    (``--nproc-per-node``, ``--nnodes``), otherwise from ``--devices`` and ``--num-nodes``.

    Raises ValueError when explicit flags disagree with torchrun, naming both.
    """
    requested: int | str = devices if devices == "auto" else int(devices)
    if not TorchElasticEnvironment.detect():
        return requested, num_nodes
    per_node = int(os.environ["LOCAL_WORLD_SIZE"])
    nodes = int(os.environ["WORLD_SIZE"]) // per_node
    if requested not in ("auto", 1, per_node) or num_nodes not in (1, nodes):
        raise ValueError(f"--devices {devices} --num-nodes {num_nodes} disagree with torchrun's "
                         f"--nproc-per-node {per_node} --nnodes {nodes}: leave --devices and --num-nodes "
                         f"out under torchrun, they come from torchrun")
    return per_node, nodes


# How each strategy name starts its processes (DDPStrategy's start_method).
_START_METHODS = {"ddp": "popen", "ddp_spawn": "spawn", "ddp_notebook": "fork", "ddp_fork": "fork"}


def build_strategy(name: str, processes: int, timeout_s: int, accelerator: str = "auto") -> str | DDPStrategy:
    """The Trainer's strategy: for several processes, DDP with a process-group timeout of
    ``timeout_s`` seconds (Lightning's default is 30 minutes, for which a crashed or hung process
    would hold every other process and its GPU); otherwise ``name`` unchanged."""
    if name == "auto":
        if processes <= 1:
            return name
        name = "ddp_fork" if forks("auto", accelerator, processes) else "ddp"
    if name not in _START_METHODS:
        return name
    return DDPStrategy(start_method=_START_METHODS[name], timeout=timedelta(seconds=timeout_s))


def launched_by_lightning() -> bool:
    """Whether Lightning's script launcher started this process as a worker (local rank 1 and up of
    a ``--strategy ddp`` run), rather than torchrun, SLURM or the user."""
    local_rank = os.environ.get("LOCAL_RANK", "0")
    return local_rank != "0" and not TorchElasticEnvironment.detect() and not SLURMEnvironment.detect()


def stop_with_launcher(poll_s: float = 2.0) -> None:
    """Exit this process (status 1) soon after the process that launched it dies.

    Lightning's script launcher runs rank 0 in the launching process and the other ranks as its
    children. If rank 0 is killed (out of memory, SIGKILL), nothing tells them: under NCCL they would
    wait in their next collective operation until the process-group timeout, holding their GPUs.
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        print(f"byol_nb: the launching process {parent} (rank 0) is gone; stopping this worker "
              f"(pid {os.getpid()})", file=sys.stderr, flush=True)
        os._exit(1)

    threading.Thread(target=watch, name="byol_nb-stop-with-launcher", daemon=True).start()


def stop_workers(trainer: pl.Trainer) -> None:
    """Kill the worker processes this process launched (Lightning's script launcher), at once: called
    when rank 0 fails, so that the others do not wait for it until the process-group timeout."""
    kill = getattr(trainer.strategy.launcher, "kill", None)
    if kill is not None:
        kill(signal.SIGKILL)
