"""A training step never waits for the device: no value computed on it is read on the host (each
read is a GPU synchronisation) except on the steps whose values are logged.

Counted on the CPU through the Python calls that read a tensor's value (item, tolist, bool, int,
float, index, numpy) over every step of a real ``python -m byol_nb.train`` run.
"""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from byol_nb import train

READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy")
LOG_EVERY = 4


class StepMarks(pl.Callback):
    """The number of reads so far at the start of every training step."""

    def __init__(self, reads: list[int]) -> None:
        self.reads, self.marks = reads, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self.marks.append(self.reads[0])


@pytest.mark.parametrize("method", [["--local-views", "1"], ["--method", "pixpro", "--small-stem"],
                                    ["--method", "pixcontrast", "--small-stem"]], ids=["byol", "pixpro", "pixcontrast"])
def test_a_steady_state_step_reads_no_device_value_on_the_host(tiny_shapes, tmp_path, monkeypatch, method):
    reads = [0]
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            reads[0] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    marks = StepMarks(reads)
    build_trainer = train.build_trainer
    monkeypatch.setattr(train, "build_trainer", lambda args, callbacks, logger: build_trainer(
        args, [*callbacks, marks], logger))
    steps = 12  # one epoch of the 48 tiny images in batches of 4: no epoch boundary inside
    assert train.main(["--data", str(tiny_shapes / "train"), "--val-data", str(tiny_shapes / "test"),
                       "--image-size", "32", "--batch-size", "4", "--proj-hidden", "32", "--max-steps", str(steps),
                       "--log-every-n-steps", str(LOG_EVERY), "--accelerator", "cpu", "--out", str(tmp_path),
                       *method]) == 0
    per_step = [b - a for a, b in zip(marks.marks, marks.marks[1:])]  # step k, up to the start of step k + 1
    logged = {k for k in range(steps) if (k + 1) % LOG_EVERY == 0}
    steady = {k: n for k, n in enumerate(per_step) if k > 0 and k not in logged}
    assert steady and all(n == 0 for n in steady.values()), f"host reads per step: {per_step}"
    assert all(per_step[k] > 0 for k in logged if k < len(per_step)), "the count sees the logging steps' reads"
