"""A steady training step never makes the host wait for the GPU: no tensor built from host data on
the device, no op whose result depends on device values, no read of a device value, except on the
steps whose values are logged (every ``--log-every-n-steps``).

Counted on the CPU (:mod:`tests.host_syncs`) over real ``python -m byol_nb.train`` runs, for every
method, on both data paths: a folder (batches carry each photo's box) and a torchvision-style set
held as tensors (batches without boxes, as ``--data cifar10`` gives them); in one process, and in
two DDP processes with the SyncBatchNorm that GPUs use (its fused kernels replaced by the CPU
reference kernels of tests/test_sync_batchnorm.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch.nn.parallel import DistributedDataParallel

from byol_nb import augment, datamodule, datasets, distributed, module, train
from byol_nb.datasets import TensorImages
from tests.host_syncs import counting_host_syncs
from tests.test_sync_batchnorm import REFERENCE

LOG_EVERY = 4
STEPS = 12  # one epoch of the 48 images in batches of 4 (two with two processes)
METHODS = {"byol": [], "byol --local-views 1": ["--local-views", "1"],
           "pixpro": ["--method", "pixpro", "--small-stem"],
           "pixcontrast": ["--method", "pixcontrast", "--small-stem"]}


class StepMarks(pl.Callback):
    """The number of host syncs so far at the start of every training step, written to
    ``folder/marks_<rank>.json`` when training ends (a forked process reports through the file)."""

    def __init__(self, seen: list[str], folder: Path) -> None:
        self.seen, self.folder, self.marks = seen, folder, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self.marks.append(len(self.seen))

    def on_train_end(self, trainer, pl_module) -> None:
        events = [self.seen[a:b] for a, b in zip(self.marks, self.marks[1:])]
        (self.folder / f"marks_{trainer.global_rank}.json").write_text(json.dumps(events))


@pytest.fixture()
def cifar_shaped_tensors(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """``--data cifar10`` served from random CIFAR-shaped uint8 tensors (48 training images), through
    the real DataModule path, without downloading anything."""
    rng = np.random.default_rng(0)
    sets = {split: TensorImages(rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8), list(np.arange(count) % 6),
                                32, [str(c) for c in range(6)]) for split, count in (("train", 48), ("test", 24))}
    monkeypatch.setattr(datasets, "_torchvision_dataset", lambda name, split, size, allow_download: sets[split])
    monkeypatch.setattr(datamodule, "download", lambda name: None)
    monkeypatch.setattr(datamodule, "is_downloaded", lambda name: True)
    return ["--data", "cifar10", "--no-small-stem", "--crop-min-scale", "0.25"]


def folder_data(shapes: Path) -> list[str]:
    return ["--data", str(shapes / "train"), "--val-data", str(shapes / "test")]


def syncs_per_step(monkeypatch: pytest.MonkeyPatch, out: Path, data: list[str], *flags: str) -> list[list[str]]:
    """Train STEPS steps of ``python -m byol_nb.train`` in this process (and the processes it forks)
    and return, per step up to the last, the host syncs it made (rank 0's)."""
    with counting_host_syncs() as seen:
        marks = StepMarks(seen, out)
        build_trainer = train.build_trainer
        monkeypatch.setattr(train, "build_trainer", lambda args, callbacks, logger: build_trainer(
            args, [*callbacks, marks], logger))
        assert train.main([*data, "--image-size", "32", "--batch-size", "4", "--proj-hidden", "32",
                           "--max-steps", str(STEPS), "--log-every-n-steps", str(LOG_EVERY), "--accelerator", "cpu",
                           "--no-progress", "--out", str(out), *flags]) == 0
    return json.loads((out / "marks_0.json").read_text())


def assert_steady_steps_sync_nowhere(events: list[list[str]], steps_per_epoch: int = STEPS) -> None:
    """No sync between the start of a steady step and the start of the next. Not steady: the first
    step, the logging steps, and the last step of an epoch (the next epoch's order is drawn then,
    from host tensors that the CPU counter cannot tell from device ones)."""
    logged = {k for k in range(len(events)) if (k + 1) % LOG_EVERY == 0}
    epoch_ends = {k for k in range(len(events)) if (k + 1) % steps_per_epoch == 0}
    steady = {k: e for k, e in enumerate(events) if k > 0 and k not in logged | epoch_ends}
    assert steady and not any(steady.values()), {k: e for k, e in steady.items() if e}
    assert all(events[k] for k in logged), "the counter must see the logging steps' reads"


@pytest.mark.parametrize("method", ["byol --local-views 1"])
def test_a_steady_step_on_a_folder_never_waits_for_the_device(tiny_shapes, tmp_path, monkeypatch, method):
    assert_steady_steps_sync_nowhere(syncs_per_step(monkeypatch, tmp_path, folder_data(tiny_shapes),
                                                    *METHODS[method]))


@pytest.mark.parametrize("method", ["pixcontrast"])
def test_a_steady_step_on_tensors_without_boxes_never_waits_for_the_device(cifar_shaped_tensors, tmp_path,
                                                                           monkeypatch, method):
    assert_steady_steps_sync_nowhere(syncs_per_step(monkeypatch, tmp_path, cifar_shaped_tensors, *METHODS[method]))


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("path", ["folder", "tensors"])
def test_every_method_on_both_data_paths(tiny_shapes, cifar_shaped_tensors, tmp_path, monkeypatch, method, path):
    data = folder_data(tiny_shapes) if path == "folder" else cifar_shaped_tensors
    assert_steady_steps_sync_nowhere(syncs_per_step(monkeypatch, tmp_path, data, *METHODS[method]))


def test_the_counter_catches_a_host_tensor_put_back_into_the_step(cifar_shaped_tensors, tmp_path, monkeypatch):
    """The crop sampler's default box built again from host data, as it once was: every step syncs."""
    sample = augment.sample_crop_boxes

    def with_a_host_box(batch, scale, ratio, device="cpu", tries=10, content=None):
        content = torch.tensor([0.0, 0.0, 1.0, 1.0], device=device).expand(batch, 4) if content is None else content
        return sample(batch, scale, ratio, device, tries, content)

    monkeypatch.setattr(augment, "sample_crop_boxes", with_a_host_box)
    events = syncs_per_step(monkeypatch, tmp_path, cifar_shaped_tensors)
    assert all("torch.tensor(host data, device=)" in step for step in events)
    with pytest.raises(AssertionError):
        assert_steady_steps_sync_nowhere(events)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("path", ["folder", "tensors"])
def test_two_ddp_processes_with_the_gpus_syncbatchnorm(tiny_shapes, cifar_shaped_tensors, tmp_path, monkeypatch,
                                                       method, path):
    """Two forked DDP processes (gloo), BatchNorm converted as on GPUs (byol_nb.distributed.SyncBatchNorm,
    CPU reference kernels): the gathers of the pixel methods, the synchronised statistics and DDP's
    gradient all-reduce add no host sync to a steady step."""
    monkeypatch.setattr(distributed, "kernels", REFERENCE)
    monkeypatch.setattr(module, "convert_sync_batchnorm", lambda nets, cpu: distributed.convert_sync_batchnorm(
        nets, cpu=False))
    # DDP refuses nn.SyncBatchNorm in CPU modules only because torch's kernels are CUDA-only.
    monkeypatch.setattr(DistributedDataParallel, "_passing_sync_batchnorm_handle", lambda self, module: None)
    data = folder_data(tiny_shapes) if path == "folder" else cifar_shaped_tensors
    events = syncs_per_step(monkeypatch, tmp_path, data, "--devices", "2", "--strategy", "ddp_fork", "--precision",
                            "32", *METHODS[method])
    assert_steady_steps_sync_nowhere(events, steps_per_epoch=48 // 2 // 4)
    assert json.loads((tmp_path / "marks_1.json").read_text()), "rank 1 trained"
