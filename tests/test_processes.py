"""Multi-process runs that never fail silently: every method trains under DDP, the fork guard has
no holes, process counts fit the machine, and a crashed process ends the whole job at once."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import byol_nb
from byol_nb import cli, devices, train
from byol_nb.config import TrainConfig
from byol_nb.devices import ForkAfterCudaError, check_fork_safe, forks
from byol_nb.launch import LaunchError
from byol_nb.module import BYOLModule
from tests.helpers import TORCHRUN, run_env, train_flags

# Every method and variant, as flags of python -m byol_nb.train (32 px, small stem: 4x4 maps).
METHODS = {
    "byol": [],
    "byol, local views": ["--local-views", "1"],
    "pixpro": ["--method", "pixpro", "--small-stem"],
    "pixpro, pixel loss only": ["--method", "pixpro", "--small-stem", "--instance-weight", "0"],
    "pixcontrast": ["--method", "pixcontrast", "--small-stem"],
}


def config_of(flags: list[str]) -> TrainConfig:
    args = cli.build_parser().check(["--data", "some/photos", *flags])
    return dataclasses.replace(cli.config_from_args(args), proj_hidden=32, proj_dim=16)


@pytest.mark.parametrize("method", METHODS)
def test_every_parameter_that_requires_grad_gets_a_gradient(method):
    """DDP waits for a gradient of every parameter that requires one: a module built but unused by
    a method (pixel contrast's PPM, once) makes the second step of a multi-process run fail."""
    torch.manual_seed(0)
    module = BYOLModule(config_of(METHODS[method]))
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    view1, view2 = module.augment(images, seed=0)
    outputs = module.nets(torch.cat([view1.images, view2.images]))
    loss, _ = module.nets.loss(outputs, view1, view2, module.config, module.local_projections(images))
    loss.backward()
    missing = [name for name, p in module.nets.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    assert any(p.requires_grad for p in module.nets.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_in_two_processes_with_sync_batchnorm(method, tiny_shapes, tmp_path):
    """The same code path as several GPUs: Lightning's launcher, DDP, SyncBatchNorm (gloo on CPU)."""
    command = [sys.executable, "-m", "byol_nb.train", "--devices", "2", "--strategy", "ddp", "--image-size", "32",
               *train_flags(tiny_shapes, tmp_path, steps=4, local_views=0), *METHODS[method]]
    result = subprocess.run(command, env=run_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["global_step"] == 4 and metrics["config"]["sync_bn"]


# ---- the fork guard ------------------------------------------------------------------------------

def test_fork_guard_names_the_call_and_the_remedy(monkeypatch):
    check_fork_safe("ddp_notebook")  # no CUDA here: nothing to say
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)  # the state after a torch.cuda call
    with pytest.raises(ForkAfterCudaError) as error:
        check_fork_safe("ddp_notebook")
    message = str(error.value)
    assert "trainer.fit" in message and "ddp_notebook" in message
    assert "Restart the kernel" in message and "byol_nb.launch" in message
    check_fork_safe("ddp")  # new interpreters (subprocess launcher) are not affected


def test_a_loaded_cuda_driver_counts_as_initialised_cuda(monkeypatch, tmp_path):
    """torch.cuda.is_available() without NVML loads and initialises the CUDA driver but leaves
    torch.cuda.is_initialized() False: the fork guard reads the process's memory map instead."""
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert not devices.cuda_driver_loaded(maps)
    maps.write_text(maps.read_text() + "7f02-7f03 r-xp 00000000 08:01 2 /usr/lib/x86_64-linux-gnu/libcuda.so.1\n")
    assert devices.cuda_driver_loaded(maps) and not torch.cuda.is_initialized()
    real = devices.cuda_driver_loaded
    monkeypatch.setattr(devices, "cuda_driver_loaded", lambda: real(maps))
    with pytest.raises(ForkAfterCudaError):
        check_fork_safe("ddp_notebook")


def test_importing_byol_nb_makes_cuda_availability_ask_nvml():
    """So that lesson 00's torch.cuda.is_available() leaves the kernel able to fork (torch reads the
    variable at each call); a value the user set is kept."""
    code = "import os, byol_nb; print(os.environ['PYTORCH_NVML_BASED_CUDA_CHECK'])"
    env = {k: v for k, v in run_env().items() if k != "PYTORCH_NVML_BASED_CUDA_CHECK"}
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout.strip() == "1"
    kept = subprocess.run([sys.executable, "-c", code], env={**env, "PYTORCH_NVML_BASED_CUDA_CHECK": "0"},
                          capture_output=True, text=True).stdout.strip()
    assert kept == "0"


def test_auto_in_an_interactive_session_with_several_gpus_is_a_fork(monkeypatch):
    """Lightning turns strategy="auto" into ddp_fork in a notebook on several GPUs."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert not forks("auto", "auto", 2)  # a script: Lightning launches new interpreters
    monkeypatch.setattr(sys, "ps1", ">>> ", raising=False)
    assert forks("auto", "auto", 2) and forks("auto", "gpu", "auto")
    assert not forks("auto", "auto", 1) and not forks("auto", "cpu", 2)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(ForkAfterCudaError):
        check_fork_safe("auto", devices=2)


def test_the_launching_process_never_initialises_cuda(monkeypatch, tmp_path):
    """On a GPU machine (simulated), deciding the precision and the strategy must not initialise
    CUDA before ddp_notebook forks: the GPU's bf16 support is asked in another process. Deciding it
    here with torch.cuda.is_bf16_supported() (which initialises CUDA) after the fork guard, as
    before, would fork a process that holds CUDA."""
    initialised = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: bool(initialised))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: initialised.append(1) or True)
    asked = []
    monkeypatch.setattr(subprocess, "run", lambda command, **k: asked.append(command) or SimpleNamespace(
        returncode=0, stdout="1\n"))
    built = {}
    monkeypatch.setattr(train.pl, "Trainer", lambda **kwargs: built.update(kwargs))
    args = train.parse_args(["--out", str(tmp_path), "--accelerator", "gpu", "--devices", "2",
                             "--strategy", "ddp_notebook"])
    train.build_trainer(args, [], logger=False)
    assert not initialised, "CUDA was initialised in the launching process"
    assert built["precision"] == "bf16-mixed" and "is_bf16_supported" in asked[0][-1]
    assert built["strategy"]._start_method == "fork"


def test_a_worker_forked_after_cuda_fails_with_the_remedy(monkeypatch):
    """Each forked worker checks again, before it touches the GPU: the state of the parent at the
    fork is recorded (os.register_at_fork) and read in the child."""
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)  # a parent that used the GPU
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # the forked worker
        os.close(read)
        try:
            devices.check_worker_can_use_cuda()
            os.write(write, b"no error")
        except ForkAfterCudaError as error:
            os.write(write, str(error).encode())
        os._exit(0)
    os.close(write)
    message = os.read(read, 4096).decode()
    os.waitpid(child, 0)
    assert "Restart the kernel" in message and "byol_nb.launch" in message
    devices.check_worker_can_use_cuda()  # the launching process itself is not a forked worker


@pytest.mark.slow
def test_script_refuses_ddp_notebook_after_cuda_at_once(tiny_shapes, tmp_path):
    """The state of a kernel that already used the GPU, simulated: torch.cuda reports initialised."""
    script = ("import sys, torch; torch.cuda.is_initialized = lambda: True\n"
              "from byol_nb.train import main\n"
              f"main({['--strategy', 'ddp_notebook', '--devices', '2', *train_flags(tiny_shapes, tmp_path)]!r})")
    result = subprocess.run([sys.executable, "-c", script], env=run_env(), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0
    assert "python -m byol_nb.train --strategy ddp_notebook with strategy='ddp_notebook'" in result.stderr
    assert "Restart the kernel" in result.stderr
    assert not (tmp_path / "last.ckpt").exists()


# ---- a crashed process ends the job ----------------------------------------------------------------

def _no_process_left(folder: Path) -> None:
    leftovers = subprocess.run(["pgrep", "-f", str(folder)], capture_output=True, text=True).stdout.split()
    assert leftovers == [], f"processes left running: {leftovers}"


CRASH_LIMIT_S = 60


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["lightning", "torchrun", "launch"])
@pytest.mark.parametrize("rank", [0, 1])
def test_a_crashed_process_ends_the_whole_job_within_a_minute(tiny_shapes, tmp_path, launcher, rank):
    """Rank 0 or rank 1 raises at step 2 (BYOL_NB_FAIL_AT_STEP): on each launch path the job exits
    non-zero within a minute, naming the error, and leaves no training process behind."""
    flags = train_flags(tiny_shapes, tmp_path, steps=6)
    env = run_env(BYOL_NB_FAIL_AT_STEP="2", BYOL_NB_FAIL_RANK=str(rank))
    error = f"BYOL_NB_FAIL_AT_STEP=2: injected failure in process {rank} of 2"
    started = time.perf_counter()
    if launcher == "launch":
        os.environ.update(env)
        options = {flag[2:].replace("-", "_"): value for flag, value in zip(flags[::2], flags[1::2])
                   if flag not in ("--no-progress", "--out")}
        with pytest.raises(LaunchError) as failure:
            byol_nb.launch(tmp_path, stream=io.StringIO(), no_progress=True, devices=2, strategy="ddp", **options)
        for name in ("BYOL_NB_FAIL_AT_STEP", "BYOL_NB_FAIL_RANK"):
            del os.environ[name]
        assert error in str(failure.value).splitlines()[0] and "launch.log" in str(failure.value)
    else:
        command = ([sys.executable, "-m", "byol_nb.train", "--devices", "2", "--strategy", "ddp", *flags]
                   if launcher == "lightning" else
                   [str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "byol_nb.train", *flags])
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   start_new_session=True)
        try:
            output = process.communicate(timeout=CRASH_LIMIT_S + 30)[0]
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
        assert process.returncode != 0 and error in output
    assert time.perf_counter() - started < CRASH_LIMIT_S
    _no_process_left(tmp_path)


@pytest.mark.slow
def test_rank_0_killed_by_the_system_ends_the_job(tiny_shapes, tmp_path):
    """Rank 0 dies by SIGKILL (out of memory, say), so it cannot tell anyone: rank 1 stops too."""
    command = [sys.executable, "-m", "byol_nb.train", "--devices", "2", "--strategy", "ddp",
               *train_flags(tiny_shapes, tmp_path, steps=6)]
    env = run_env(BYOL_NB_FAIL_AT_STEP="2", BYOL_NB_FAIL_RANK="0", BYOL_NB_FAIL_HOW="kill")
    started = time.perf_counter()
    process = subprocess.run(command, env=env, capture_output=True, text=True, timeout=CRASH_LIMIT_S + 30)
    assert process.returncode == -signal.SIGKILL
    deadline = time.perf_counter() + 30
    while time.perf_counter() < deadline and subprocess.run(["pgrep", "-f", str(tmp_path)],
                                                            capture_output=True).stdout:
        time.sleep(0.5)
    assert time.perf_counter() - started < CRASH_LIMIT_S
    _no_process_left(tmp_path)


def test_a_worker_stops_when_its_launching_process_dies(tmp_path):
    """stop_with_launcher: a process whose parent vanished exits by itself within seconds."""
    worker = textwrap.dedent(f"""
        import time
        from byol_nb.devices import stop_with_launcher
        stop_with_launcher(poll_s=0.1)
        open({str(tmp_path / 'started')!r}, 'w').close()
        time.sleep(60)
    """)
    parent = textwrap.dedent(f"""
        import subprocess, sys, time
        subprocess.Popen([sys.executable, "-c", {worker!r}])
        time.sleep(30)
    """)
    launcher = subprocess.Popen([sys.executable, "-c", parent, str(tmp_path)])
    deadline = time.time() + 60
    while not (tmp_path / "started").exists() and time.time() < deadline:
        time.sleep(0.1)
    launcher.kill()  # the parent dies without a word to its child
    launcher.wait()
    deadline = time.time() + 10
    while subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True).stdout and time.time() < deadline:
        time.sleep(0.2)
    _no_process_left(tmp_path)
