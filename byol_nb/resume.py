"""Keeping a run resumable: OUT/last.ckpt every few minutes (or N steps), at the end, and when the job
is told to stop.

A run can end at any moment: a SIGKILL, a pre-empted cluster job, a time limit. ``--resume``
continues from ``last.ckpt`` exactly (see :class:`byol_nb.data.ResumableSampler` for the data
order and :meth:`byol_nb.module.BYOLModule.augment_seed` for the views), so the only work lost to a
SIGKILL is the steps since the last save. SIGTERM (pre-emption) and SIGUSR1 (SLURM's warning
before the time limit, ``#SBATCH --signal=USR1@120``) lose nothing: the step in flight finishes,
``last.ckpt`` is written, and the process exits cleanly with status 0. After SIGUSR1 under SLURM
the job is also put back in the queue (``scontrol requeue``), to continue with ``--resume``.

What Lightning provides and what it lacks: Lightning writes checkpoints and restores its loops
from them (``trainer.save_checkpoint``, ``fit(ckpt_path=...)``), and its CSV logger writes the
curves. It has no *exact mid-epoch* resume: its own SLURM handler (``SLURMEnvironment(
auto_requeue=True)``) saves from inside the signal handler, in the middle of a step, to a file
``--resume`` does not read. So the signals are handled here, at step boundaries, and Lightning's
handler is switched off (``auto_requeue=False`` in ``byol_nb.train``). Lightning's CSV logger
starts a new file in each attempt of a run (:mod:`byol_nb.run_logs`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.rank_zero import rank_zero_warn

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_clock = time.monotonic  # seconds; tests turn it faster


class LastCheckpoint(pl.Callback):
    """Writes ``path`` every ``every_n_minutes`` of training and every ``every_n_steps`` optimizer
    steps (either may be None), at the end of training, and after the step during which SIGTERM or
    SIGUSR1 arrived; then it stops the trainer.

    Saving by time bounds what a crash loses on any machine: the same step count is minutes on a
    CPU but seconds on a GPU, where a checkpoint of both networks and the optimizer (hundreds of MB,
    flushed to disk) every few seconds would cost a good share of the run. Saving happens at the end
    of a training batch, a point Lightning's loops restore exactly.

    Decisions are shared by all processes: any rank's signal stops every rank at the same step (a
    signal may reach only one of them, ``kill`` of the launching process), and rank 0's clock decides
    when a save is due (every rank must take part in it). With several processes they agree every
    ``poll_every`` steps (one small all-reduce), so a signal or a due save waits that many steps at
    most. ``stopped_by`` names the signal afterwards, or is None when training ran to its end.
    """

    def __init__(self, path: str | Path, every_n_steps: int | None = None, every_n_minutes: float | None = 10.0,
                 poll_every: int = 10) -> None:
        if any(v is not None and v <= 0 for v in (every_n_steps, every_n_minutes)) or poll_every <= 0:
            raise ValueError(f"every_n_steps, every_n_minutes and poll_every must be positive, got {every_n_steps}, "
                             f"{every_n_minutes}, {poll_every}")
        self.path, self.every_n_steps, self.poll_every = Path(path), every_n_steps, poll_every
        self.every_s = None if every_n_minutes is None else 60 * every_n_minutes
        self.stopped_by: str | None = None
        self._received = 0
        self._saved_step = -1
        self._saved_at = _clock()
        self._previous_handlers: dict[int, object] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning installs its own SIGTERM handler just before this hook; it would raise from the
        # loop without saving. Ours replaces it while training runs, and on_train_end puts it back.
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous_handlers[signum] = signal.signal(signum, self._on_signal)
            _skip_lightnings_sigterm_broadcast(trainer)
        self._saved_at = _clock()

    def _on_signal(self, signum: int, frame: object) -> None:
        self._received = int(signum)  # acted on at the end of the current step

    def _time_to_save(self, trainer: pl.Trainer) -> bool:
        return (self.every_s is not None and trainer.is_global_zero
                and _clock() - self._saved_at >= self.every_s)

    def _signal_and_due_save(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[int, bool]:
        """Any process's signal, and whether rank 0's clock says a save is due."""
        if trainer.world_size == 1:
            return self._received, self._time_to_save(trainer)
        if trainer.global_step % self.poll_every:
            return 0, False
        local = torch.tensor([self._received, int(self._time_to_save(trainer))], device=pl_module.device)
        received, due = trainer.strategy.reduce(local, reduce_op=torch.distributed.ReduceOp.MAX).tolist()
        return int(received), bool(due)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        signum, due = self._signal_and_due_save(trainer, pl_module)
        by_steps = self.every_n_steps is not None and trainer.global_step % self.every_n_steps == 0
        if signum or due or by_steps:
            self._save(trainer)
        if signum:
            self.stopped_by = signal.Signals(signum).name
            trainer.should_stop = True

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer)
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._previous_handlers.clear()

    def _save(self, trainer: pl.Trainer) -> None:
        if trainer.global_step != self._saved_step:
            trainer.save_checkpoint(self.path, weights_only=False)  # every rank calls it; rank 0 writes
            self._saved_step = trainer.global_step
            self._saved_at = _clock()


def _skip_lightnings_sigterm_broadcast(trainer: pl.Trainer) -> None:
    """Under DDP, Lightning 2.6 broadcasts its own SIGTERM flag from rank 0 before every training
    step and reads it on the host (``_broadcast_sigterm_tensor``): a GPU synchronisation per step
    (Lightning-AI/pytorch-lightning#21487). With our handler in place of Lightning's, that flag is
    never set, so the broadcast always sends 0; stopping on a signal is agreed here instead, every
    ``poll_every`` steps. Lightning versions without the broadcast are left as they are."""
    loop = trainer.fit_loop.epoch_loop
    if hasattr(loop, "_broadcast_sigterm_tensor"):
        loop._broadcast_sigterm_tensor = lambda: None


def requeue_slurm_job() -> bool:
    """Put this SLURM job back in the queue (``scontrol requeue``); False outside SLURM or on failure.

    The job script then starts the same command again and it continues with ``--resume``.
    """
    job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    if not job:
        return False
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        rank_zero_warn(f"could not requeue SLURM job {job}: {error}; resubmit it with --resume")
        return False
    if result.returncode != 0:
        rank_zero_warn(f"scontrol requeue {job} failed ({result.stderr.strip()}); resubmit it with --resume")
    return result.returncode == 0
