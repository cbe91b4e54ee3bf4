"""Command-line entry point: pretrain, export the backbone, evaluate, write metrics.

    python -m byol_nb.train --data shapes --max-epochs 20 --out runs/byol

Writes OUT/last.ckpt (and OUT/best.ckpt when a labeled split is monitored), OUT/backbone.pt,
OUT/metrics.json, OUT/logs/ (the curves, a CSV file per attempt of the run) and OUT/curves.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.environments import SLURMEnvironment
from pytorch_lightning.callbacks import ModelCheckpoint

from byol_nb.callbacks import FailureInjection, MonitorInterval, ProgressBar, ProgressFile, ThroughputMonitor
from byol_nb.checkpoint import AtomicCheckpointIO, CheckpointError, DiskFullError, check_resume, save_backbone
from byol_nb.cli import apply_data_defaults, build_parser, check_args, config_from_args
from byol_nb.config import TrainConfig
from byol_nb.cpu_speed import speed_up_for_cpu
from byol_nb.datamodule import SSLDataModule
from byol_nb.devices import (
    ForkAfterCudaError,
    build_strategy,
    check_devices,
    check_fork_safe,
    launched_by_lightning,
    resolve_precision,
    resolve_topology,
    stop_with_launcher,
    stop_workers,
    uses_gpu,
)
from byol_nb.evaluate import evaluate_backbone
from byol_nb.images import DataError
from byol_nb.module import BYOLModule
from byol_nb.resume import LastCheckpoint, requeue_slurm_job
from byol_nb.run_logs import attempt_logger


class _NoAdvertisements(logging.Filter):
    """Drops Lightning's tip about its cloud logger: one line of noise in every run's output."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with the defaults that depend on the data filled in, checked: a value that
    cannot work stops here with one ``error:`` line, before any work."""
    args = build_parser().parse_args(argv)
    apply_data_defaults(args)
    try:
        check_args(args)
        check_devices(args.devices, args.accelerator)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    _check_writable(Path(args.out))  # last: it creates the folder
    return args


def _check_writable(out: Path) -> None:
    """Fail now, not after hours of training, when the output folder cannot take files."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise SystemExit(f"error: cannot write to --out {str(out)!r} ({error.strerror or error}): "
                         f"choose a folder you can write to") from None


def build_trainer(args: argparse.Namespace, callbacks: list[pl.Callback], logger: pl.loggers.Logger) -> pl.Trainer:
    """The Trainer for ``args``: topology (from torchrun when it started us), precision and strategy
    decided without initialising CUDA here, and the fork guard checked before anything forks."""
    try:
        devices, num_nodes = resolve_topology(args.devices, args.num_nodes)
        per_node = devices if devices != "auto" else (torch.cuda.device_count() if uses_gpu(args.accelerator) else 1)
        precision = resolve_precision(args.precision, args.accelerator)
        strategy = build_strategy(args.strategy, per_node * num_nodes, args.dist_timeout, args.accelerator)
        check_fork_safe(args.strategy, call=f"python -m byol_nb.train --strategy {args.strategy}",
                        accelerator=args.accelerator, devices=per_node)
    except (ValueError, ForkAfterCudaError) as error:
        raise SystemExit(f"error: {error}") from None
    plugins: list = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=False))  # signals are handled at step boundaries (resume.py)
    if not args.no_progress:  # redrawn as often as its values change, not once per step
        callbacks = [*callbacks, ProgressBar(refresh_rate=args.log_every_n_steps)]
    return pl.Trainer(
        accelerator=args.accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy, precision=precision,
        max_epochs=args.max_epochs if args.max_steps is None else -1, max_steps=args.max_steps or -1,
        callbacks=callbacks, plugins=plugins, logger=logger, log_every_n_steps=args.log_every_n_steps,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=not args.no_progress, enable_model_summary=False, deterministic=False,
        num_sanity_val_steps=0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if launched_by_lightning():
        stop_with_launcher()
    out = Path(args.out)
    config = config_from_args(args)
    pl.seed_everything(config.seed, workers=True, verbose=False)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    # Lightning cannot see that ResumableSampler continues mid-epoch exactly; it does.
    warnings.filterwarnings("ignore", ".*your dataloader is not resumable.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")  # Lightning's own use of a deprecated torch API
    # Logs are written every N global steps, across epochs: an epoch shorter than N loses nothing.
    warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
    # best.ckpt goes into OUT beside last.ckpt and the logs, on purpose.
    warnings.filterwarnings("ignore", ".*Checkpoint directory .* exists and is not empty.*")
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_NoAdvertisements())

    datamodule = SSLDataModule.from_config(config, args.data, args.val_data, args.num_workers)
    module = BYOLModule(config)
    if not uses_gpu(args.accelerator):
        speed_up_for_cpu(module.nets)
    initial_backbone = copy.deepcopy(module.backbone.state_dict())
    resume_from = out / "last.ckpt" if args.resume else None
    resume_step = _check_resume(resume_from, config, module) if resume_from is not None else None
    throughput = ThroughputMonitor()
    last = LastCheckpoint(out / "last.ckpt", args.save_every_n_steps, args.save_every_n_minutes,
                          poll_every=args.log_every_n_steps)
    callbacks: list[pl.Callback] = [throughput, ProgressFile(out, throughput), last,
                                    MonitorInterval(args.knn_every_n_epochs)]
    if datamodule.spec.val is not None:
        callbacks.append(ModelCheckpoint(dirpath=out, filename="best", monitor="knn_top1", mode="max",
                                         enable_version_counter=False))
    failure = FailureInjection.from_env()  # tests only: BYOL_NB_FAIL_AT_STEP
    if failure is not None:
        callbacks.append(failure)
    trainer = build_trainer(args, callbacks, attempt_logger(out, resume_step))
    started = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
    except BaseException:
        stop_workers(trainer)  # the other processes would wait for this one until the timeout
        raise
    wall = time.perf_counter() - started
    if not trainer.is_global_zero:
        return 0
    if last.stopped_by is not None:
        requeued = last.stopped_by == "SIGUSR1" and requeue_slurm_job()
        print(f"\nstopped by {last.stopped_by} after step {trainer.global_step}: saved {out / 'last.ckpt'}; "
              + ("the SLURM job is requeued" if requeued else "continue with the same command and --resume"))
        return 0

    metrics = {"method": config.method, "data": args.data, "global_step": trainer.global_step,
               "epochs": trainer.current_epoch,
               "final_loss": _last_logged(trainer, "train/loss"), "wall_time_s": round(wall, 1),
               "images_per_second": round(throughput.images_per_second, 1),
               "world_size": trainer.world_size, "config": asdict(config)}
    device = trainer.strategy.root_device  # Lightning has moved the module to the CPU: score it where it trained
    backbone = module.backbone.float().to(device)
    save_backbone(backbone, out / "backbone.pt", image_size=config.image_size)
    if datamodule.bank_set is not None:
        trained = evaluate_backbone(backbone, datamodule.bank_set, datamodule.val_set, device=device)
        backbone.load_state_dict(initial_backbone)
        at_init = evaluate_backbone(backbone, datamodule.bank_set, datamodule.val_set, device=device)
        metrics.update(knn_top1=round(trained, 2), knn_top1_random_init=round(at_init, 2))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    _plot_curves(out)
    _report(out, metrics)
    return 0


def _check_resume(path: Path, config: TrainConfig, module: BYOLModule) -> int:
    """Stop with one line when OUT/last.ckpt is missing, unsafe or from another architecture; warn
    when other settings changed (the continuation is then not the interrupted run). Returns the
    checkpoint's global step."""
    if not path.is_file():
        raise SystemExit(f"error: --resume given but {path} does not exist; drop --resume to start fresh")
    try:
        changed, step = check_resume(path, asdict(config), module.state_dict())
    except CheckpointError as error:
        raise SystemExit(f"error: {error}") from None
    if changed:
        warnings.warn(f"resuming {path} with changed settings ({'; '.join(changed)}): the run will not "
                      f"match one that was never interrupted", stacklevel=2)
    return step


def _last_logged(trainer: pl.Trainer, key: str) -> float | None:
    value = trainer.callback_metrics.get(key)
    return round(float(value), 4) if value is not None else None


def _plot_curves(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # a file, whatever backend the environment (a notebook's kernel) names
    from byol_nb.viz import plot_training_curves

    plot_training_curves(out).savefig(out / "curves.png", dpi=100, bbox_inches="tight")


def _report(out: Path, metrics: dict) -> None:
    print(f"\nfinished {metrics['global_step']} steps in {metrics['wall_time_s']} s "
          f"({metrics['images_per_second']} images/s)")
    if "knn_top1" in metrics:
        print(f"kNN top-1 on the held-out split: {metrics['knn_top1']}% trained, "
              f"{metrics['knn_top1_random_init']}% at random initialisation")
    for name in ("last.ckpt", "best.ckpt", "backbone.pt", "metrics.json", "curves.png"):
        if (out / name).exists():
            print(f"  {out / name}")


def cli(argv: list[str] | None = None) -> None:
    """``main`` with data problems and a full disk turned into one ``error:`` line and exit status 1."""
    try:
        sys.exit(main(argv))
    except (DataError, DiskFullError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    cli()
