"""Small Lightning callbacks used by the training entry point."""

from __future__ import annotations

import time

import pytorch_lightning as pl


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
