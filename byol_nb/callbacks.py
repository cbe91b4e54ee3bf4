"""Small Lightning callbacks used by the training entry point."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import TQDMProgressBar


class ThroughputMonitor(pl.Callback):
    """Training images per second over the whole run, counting only training batches.

    Timed from batch start to batch end (data loading of the next batch included through the
    gaps), so validation and checkpointing do not dilute the number.
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self.images = 0
        self._start = 0.0
        self._last_end: float | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_end = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        # include the time spent fetching this batch since the previous one ended
        self._start = self._last_end if self._last_end is not None else time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._last_end = time.perf_counter()
        self.seconds += self._last_end - self._start
        self.images += len(batch[0]) * trainer.world_size

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0


class ProgressFile(pl.Callback):
    """Writes ``OUT/progress.json`` on every logging step (global rank 0): the step, the run's
    length, the images per second and the seconds trained so far, which a notebook shows while
    the run goes (:class:`byol_nb.live.LiveCurves`). Replaced whole (a temporary file renamed), so
    a reader never sees half a record; only plain numbers the callbacks already hold, no read of
    a device value."""

    def __init__(self, out: str | Path, throughput: ThroughputMonitor) -> None:
        self.path, self.throughput = Path(out) / "progress.json", throughput

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if not trainer.is_global_zero or trainer.global_step % trainer.log_every_n_steps:
            return
        record = {"step": trainer.global_step, "total_steps": int(trainer.estimated_stepping_batches),
                  "images_per_second": round(self.throughput.images_per_second, 1),
                  "elapsed_s": round(self.throughput.seconds, 1)}
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text(json.dumps(record))
        os.replace(partial, self.path)


class ProgressBar(TQDMProgressBar):
    """Lightning's progress bar, showing the module's ``progress_values`` (plain numbers the module
    updates on logging steps) and the metrics of validation passes, such as ``knn_top1``.

    Values logged with ``prog_bar=True`` in a training step would be read from the device after
    every step, a GPU synchronisation each time; the run's version number is left out.
    """

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        metrics = {**super().get_metrics(trainer, pl_module), **getattr(pl_module, "progress_values", {})}
        metrics.pop("v_num", None)
        return metrics


class MonitorInterval(pl.Callback):
    """Run the kNN monitor every ``every_n_epochs`` epochs, and at least once in a run of one full
    epoch or more: the interval shrinks to the run's number of full epochs, which is known only
    once the training data is loaded (a ``--max-steps`` run). Each monitor pass embeds the whole
    labeled split, so a pass every epoch would take a good share of a short run's time."""

    def __init__(self, every_n_epochs: int) -> None:
        self.every_n_epochs = every_n_epochs

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        full_epochs = int(trainer.estimated_stepping_batches) // max(1, int(trainer.num_training_batches))
        trainer.check_val_every_n_epoch = max(1, min(self.every_n_epochs, full_epochs))


class FailureInjection(pl.Callback):
    """Makes one process fail at a given step, to test that a failing process ends a multi-process
    job (non-zero exit, its error shown) instead of leaving the others waiting.

    Enabled only by environment variables (read by ``train.main``): ``BYOL_NB_FAIL_AT_STEP=k``
    makes a process fail at the start of global step ``k``; ``BYOL_NB_FAIL_RANK`` picks its global
    rank (default: the last one); ``BYOL_NB_FAIL_HOW=kill`` makes it die by SIGKILL, as when the
    system runs out of memory, instead of raising an error.
    """

    ENV = "BYOL_NB_FAIL_AT_STEP"

    def __init__(self, step: int, rank: int | None = None, kill: bool = False) -> None:
        self.step, self.rank, self.kill = step, rank, kill

    @classmethod
    def from_env(cls) -> "FailureInjection | None":
        value = os.environ.get(cls.ENV)
        if not value:
            return None
        rank = os.environ.get("BYOL_NB_FAIL_RANK")
        return cls(int(value), None if rank is None else int(rank), os.environ.get("BYOL_NB_FAIL_HOW") == "kill")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        rank = trainer.world_size - 1 if self.rank is None else self.rank
        if trainer.global_step != self.step or trainer.global_rank != rank:
            return
        if self.kill:
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"{self.ENV}={self.step}: injected failure in process {trainer.global_rank} "
                           f"of {trainer.world_size}")
