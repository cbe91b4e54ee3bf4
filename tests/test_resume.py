"""Exact resume after SIGKILL, clean stops on SIGTERM/SIGUSR1, and the EMA schedule across a resume.

The end-to-end test runs real training processes on CPU and interrupts them at whatever step
they have reached: a run killed and resumed (several times, by several signals) must end with the
same online and target weights, optimizer state and step count as a run never interrupted.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from byol_nb import module as module_lib
from byol_nb import train
from byol_nb.datamodule import ResumableSampler, SSLDataModule
from byol_nb.ema import cosine_momentum
from byol_nb.run_logs import read_metrics

MAX_STEPS = 12  # 48 images / batch 8 = 6 steps per epoch: the run crosses an epoch boundary
# with a local (multi-crop) view: its random draws must replay on resume too
FLAGS = ["--image-size", "16", "--batch-size", "8", "--proj-hidden", "64", "--proj-dim", "32", "--seed", "3",
         "--local-views", "1",
         "--accelerator", "cpu", "--no-progress", "--max-steps", str(MAX_STEPS), "--save-every-n-steps", "2",
         "--log-every-n-steps", "1"]


def _command(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "byol_nb.train", "--data", str(data), "--out", str(out), *FLAGS, *extra]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra}


def _step(checkpoint: Path) -> int:
    return int(torch.load(checkpoint, weights_only=True)["global_step"])


def _file_id(path: Path) -> tuple[int, int] | None:
    """Cheap enough to poll while training runs (loading the checkpoint is not, on a busy machine)."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def _interrupt(command: list[str], out: Path, signum: int, env: dict[str, str], delay: float
               ) -> subprocess.CompletedProcess:
    """Start ``command``, wait until it has written a checkpoint newer than the one it resumed from,
    let it run ``delay`` seconds longer (part of a step), then send ``signum``."""
    last = out / "last.ckpt"
    start = _file_id(last)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if _file_id(last) not in (None, start):  # atomic saves replace the file: a new inode
            break
        time.sleep(0.01)
    time.sleep(delay)
    assert process.poll() is None, f"the run ended before it could be interrupted:\n{process.communicate()[1]}"
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _losses_by_step(run: Path) -> dict[int, float]:
    """The run's logged loss per step, its attempts joined as the curves join them."""
    losses = read_metrics(run)["train/loss"]
    assert len({step for step, _ in losses}) == len(losses), "a step logged twice"
    return dict(losses)


def _assert_same_state(resumed: Path, reference: Path) -> None:
    a, b = (torch.load(p, weights_only=True) for p in (resumed, reference))
    assert a["global_step"] == b["global_step"] == MAX_STEPS
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert any(k.startswith("nets.target.") for k in a["state_dict"])
    for key, value in b["state_dict"].items():
        torch.testing.assert_close(a["state_dict"][key], value, rtol=1e-6, atol=1e-7, msg=key)
    for state_a, state_b in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        for name in state_b:
            torch.testing.assert_close(state_a[name], state_b[name], rtol=1e-6, atol=1e-7)
    assert a["lr_schedulers"] == b["lr_schedulers"]


@pytest.mark.slow
def test_killed_and_stopped_runs_resume_to_the_uninterrupted_state(tiny_shapes, tmp_path):
    data, rng = tiny_shapes / "train", random.Random()
    reference = tmp_path / "reference"
    done = subprocess.run(_command(data, reference), capture_output=True, text=True, env=_env(), timeout=600)
    assert done.returncode == 0, done.stderr
    seconds_per_step = json.loads((reference / "metrics.json").read_text())["wall_time_s"] / MAX_STEPS

    out = tmp_path / "interrupted"
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'scontrol.args'}\n")
    (fake_bin / "scontrol").chmod(0o755)
    slurm = _env(SLURM_JOB_ID="4242", PATH=f"{fake_bin}{os.pathsep}{os.environ['PATH']}")

    killed = _interrupt(_command(data, out), out, signal.SIGKILL, _env(), rng.uniform(0, seconds_per_step))
    assert killed.returncode == -signal.SIGKILL
    steps = [_step(out / "last.ckpt")]
    for signum, env in ((signal.SIGUSR1, slurm), (signal.SIGTERM, _env())):
        stopped = _interrupt(_command(data, out, "--resume"), out, signum, env, rng.uniform(0, seconds_per_step))
        name = signal.Signals(signum).name
        assert stopped.returncode == 0, stopped.stderr
        assert "Traceback" not in stopped.stderr, stopped.stderr
        step = _step(out / "last.ckpt")
        assert f"stopped by {name} after step {step}" in stopped.stdout, stopped.stdout
        steps.append(step)
    assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "4242"]
    assert steps == sorted(steps) and steps[-1] < MAX_STEPS, steps
    assert not (out / "backbone.pt").exists(), "a stopped run must not export a half-trained backbone"

    finished = subprocess.run(_command(data, out, "--resume"), capture_output=True, text=True, env=_env(),
                              timeout=600)
    assert finished.returncode == 0, finished.stderr
    _assert_same_state(out / "last.ckpt", reference / "last.ckpt")
    resumed_log, reference_log = _losses_by_step(out), _losses_by_step(reference)
    assert sorted(resumed_log) == sorted(reference_log) == list(range(MAX_STEPS)), "log rows lost or doubled"
    for step, loss in reference_log.items():
        assert resumed_log[step] == pytest.approx(loss, rel=1e-5), step
    torch.testing.assert_close(torch.load(out / "backbone.pt", weights_only=True)["state_dict"],
                               torch.load(reference / "backbone.pt", weights_only=True)["state_dict"])


@pytest.mark.slow
def test_an_epoch_based_run_resumes_mid_epoch_exactly(tiny_shapes, tmp_path):
    """--max-epochs instead of --max-steps (make train's way): the run's length then depends on the
    data, and the resumed run must still continue inside its epoch, not restart it."""
    by_epochs = [flag.replace("--max-steps", "--max-epochs") for flag in FLAGS]
    by_epochs[by_epochs.index("--max-epochs") + 1] = "2"  # 2 epochs of 6 steps: MAX_STEPS

    def run(out: Path, *extra: str, **env: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "byol_nb.train", "--data", str(tiny_shapes / "train"), "--out", str(out),
                   *by_epochs, *extra]
        return subprocess.run(command, capture_output=True, text=True, env=_env(**env), timeout=600)

    assert run(tmp_path / "reference").returncode == 0
    crashed = run(tmp_path / "resumed", BYOL_NB_FAIL_AT_STEP="9")  # mid-way through the second epoch
    assert crashed.returncode != 0 and _step(tmp_path / "resumed" / "last.ckpt") == 8
    finished = run(tmp_path / "resumed", "--resume")
    assert finished.returncode == 0, finished.stderr
    _assert_same_state(tmp_path / "resumed" / "last.ckpt", tmp_path / "reference" / "last.ckpt")


class _Indices(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[int, int]:
        return index, -1


def _loader(n: int, batch: int, world: int, rank: int, step: int, seed: int = 0):
    datamodule = SSLDataModule("unused", None, 16, batch, seed=seed)
    datamodule.train_set = _Indices(n)
    datamodule.trainer = SimpleNamespace(world_size=world, global_rank=rank, global_step=step,
                                         num_devices=world, strategy=SimpleNamespace(root_device=torch.device("cpu")))
    return datamodule.train_dataloader()


def _batches(loader, first_epoch: int, epochs: int) -> list[list[int]]:
    """What a training loop sees: Lightning calls set_epoch before every epoch but the first after
    a resume, whose epoch the data module already set."""
    seen = []
    for epoch in range(first_epoch, first_epoch + epochs):
        if epoch != first_epoch:
            loader.sampler.set_epoch(epoch)
        seen += [images.tolist() for images, _ in loader]
    return seen


def test_sampler_order_is_a_function_of_seed_and_epoch():
    data = _Indices(40)
    a, b, c = ResumableSampler(data, seed=1), ResumableSampler(data, seed=1), ResumableSampler(data, seed=2)
    assert list(a) == list(b) != list(c)
    assert sorted(a) == list(range(40))
    a.set_epoch(1)
    assert list(a) != list(b)


@settings(max_examples=50, deadline=None)
@given(n=st.integers(4, 60), world=st.integers(1, 3), batch=st.integers(1, 4), seed=st.integers(0, 9))
def test_ranks_see_different_images_every_epoch(n, world, batch, seed):
    assume(n // world >= batch)
    for epoch in (0, 1):
        parts = []
        for rank in range(world):
            sampler = ResumableSampler(_Indices(n), num_replicas=world, rank=rank, seed=seed)
            sampler.set_epoch(epoch)
            parts.append(list(sampler))
        assert len({len(p) for p in parts}) == 1
        flat = [i for p in parts for i in p]
        assert len(flat) == len(set(flat)), "two ranks got the same image in one epoch"


@settings(max_examples=50, deadline=None)
@given(n=st.integers(4, 40), world=st.integers(1, 3), rank=st.integers(0, 2), batch=st.integers(1, 4),
       data=st.data())
def test_loader_resumed_at_any_step_continues_the_uninterrupted_order(n, world, rank, batch, data):
    assume(rank < world and n // world >= batch)
    steps_per_epoch = (n // world) // batch
    uninterrupted = _batches(_loader(n, batch, world, rank, step=0), 0, 3)
    assert len(uninterrupted) == 3 * steps_per_epoch
    step = data.draw(st.integers(0, 3 * steps_per_epoch - 1), label="step")
    resumed = _batches(_loader(n, batch, world, rank, step), step // steps_per_epoch, 3 - step // steps_per_epoch)
    assert resumed == uninterrupted[step:]


@pytest.mark.slow
def test_momentum_schedule_continues_after_resume(tiny_shapes, tmp_path, monkeypatch):
    """After --resume at global step k the EMA uses tau_k, not tau_base again."""
    flags = ["--data", str(tiny_shapes / "train"), "--out", str(tmp_path), "--image-size", "16", "--batch-size", "8",
             "--proj-hidden", "32", "--proj-dim", "16", "--accelerator", "cpu", "--no-progress",
             "--tau-base", "0.9", "--save-every-n-steps", "1"]
    assert train.main([*flags, "--max-steps", "2"]) == 0
    taus: list[float] = []
    update = module_lib.ema_update_
    monkeypatch.setattr(module_lib, "ema_update_", lambda target, online, tau: (taus.append(tau),
                                                                               update(target, online, tau)))
    assert train.main([*flags, "--max-steps", "4", "--resume"]) == 0
    assert taus == pytest.approx([cosine_momentum(k, 4, 0.9) for k in (2, 3)])
    assert taus[0] > 0.9 + 1e-3


def test_last_checkpoint_is_written_every_n_minutes(tiny_shapes, tmp_path, monkeypatch):
    """With a clock that advances 2 minutes per reading and a save due every 3 minutes, a save
    comes every second step (each step reads the clock once), then once more at the end."""
    from byol_nb import resume

    readings = iter(range(0, 10**6, 120))
    monkeypatch.setattr(resume, "_clock", lambda: next(readings))
    saved = []
    save = resume.LastCheckpoint._save
    monkeypatch.setattr(resume.LastCheckpoint, "_save", lambda self, trainer: (saved.append(trainer.global_step),
                                                                               save(self, trainer)))
    assert train.main(["--data", str(tiny_shapes / "train"), "--image-size", "16", "--batch-size", "8",
                       "--proj-hidden", "32", "--proj-dim", "16", "--accelerator", "cpu", "--no-progress",
                       "--max-steps", "6", "--save-every-n-minutes", "3", "--out", str(tmp_path)]) == 0
    assert saved == [2, 4, 6, 6]  # the last call at the end finds step 6 written already
