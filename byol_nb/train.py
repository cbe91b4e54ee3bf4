"""Command-line entry point: pretrain, export the backbone, evaluate, write metrics.

    python -m byol_nb.train --data shapes --max-epochs 20 --out runs/byol

Writes OUT/last.ckpt (and OUT/best.ckpt when a labeled split is monitored), OUT/backbone.pt,
OUT/metrics.json, OUT/logs/metrics.csv and OUT/curves.png.
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
from dataclasses import asdict, fields
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from byol_nb.callbacks import FailureInjection, MonitorInterval, ThroughputMonitor
from byol_nb.checkpoint import AtomicCheckpointIO, CheckpointError, check_resume, save_backbone
from byol_nb.data import DataError, SSLDataModule
from byol_nb.distributed import ForkAfterCudaError, check_fork_safe, resolve_topology
from byol_nb.evaluate import evaluate_backbone
from byol_nb.models import BACKBONES
from byol_nb.module import METHODS, PIXEL_METHODS, BYOLModule, TrainConfig, check_config
from byol_nb.optim import OPTIMIZERS, check_compiler
from byol_nb.resume import LastCheckpoint, ResumableCSVLogger, requeue_slurm_job


class _NoAdvertisements(logging.Filter):
    """Drops Lightning's tip about its cloud logger: one line of noise in every run's output."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m byol_nb.train", description="Self-supervised pretraining (BYOL).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--data", default="shapes",
                      help="'shapes' (built-in), 'cifar10', 'stl10', or a folder of images")
    data.add_argument("--val-data", default=None,
                      help="labeled folder (one sub-folder per class) for the kNN monitor; --data must be labeled too")
    data.add_argument("--image-size", type=int, default=d.image_size)
    data.add_argument("--crop-min-scale", type=float, default=d.crop_min_scale,
                      help="smallest crop area, as a fraction of the image (paper: 0.08)")
    data.add_argument("--jitter", type=float, nargs=4, default=argparse.SUPPRESS, metavar=("B", "C", "S", "H"),
                      help="colour jitter strengths: brightness, contrast, saturation, hue (hue at most 0.5; "
                           f"default: {_strengths(d.jitter)}, the paper's; "
                           f"{_strengths(DATA_DEFAULTS['shapes']['jitter'])} with --data shapes)")
    data.add_argument("--grayscale-p", type=float, default=d.grayscale_p,
                      help="probability that a view is turned grayscale (1: colour never tells two images apart)")
    data.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (0: cached in memory)")
    model = p.add_argument_group("model")
    model.add_argument("--method", choices=METHODS, default=d.method)
    model.add_argument("--backbone", choices=BACKBONES, default=d.backbone)
    model.add_argument("--small-stem", action=argparse.BooleanOptionalAction, default=d.small_stem,
                       help="3x3 stride-1 stem without max-pool, for small images (8x larger feature maps)")
    model.add_argument("--pretrained", action="store_true", help="start from torchvision's ImageNet weights (online)")
    model.add_argument("--proj-hidden", type=int, default=d.proj_hidden)
    model.add_argument("--proj-dim", type=int, default=d.proj_dim)
    model.add_argument("--local-views", type=int, default=argparse.SUPPRESS,
                       help="multi-crop (--method byol): extra small views per image, each predicting both main "
                            f"views' targets (default: {d.local_views}; "
                            f"{DATA_DEFAULTS['shapes']['local_views']} with --data shapes and --method byol)")
    model.add_argument("--local-size", type=int, default=d.local_size,
                       help="side of the local views in pixels (default: half of --image-size)")
    model.add_argument("--instance-weight", type=float, default=d.instance_weight,
                       help="pixel methods: weight of the instance (BYOL) loss on pooled features; 0 for pixel-only")
    model.add_argument("--pixel-threshold", type=float, default=d.pixel_threshold,
                       help="pixel methods: cells closer than this (in cell diagonals) are positive pairs")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--batch-size", type=int, default=d.batch_size, help="per process")
    steps = opt.add_mutually_exclusive_group()
    steps.add_argument("--max-epochs", type=int, default=None,
                       help=f"default: {DEFAULT_EPOCHS} when --max-steps is not given either "
                            f"({DATA_DEFAULTS['shapes']['max_epochs']} with --data shapes)")
    steps.add_argument("--max-steps", type=int, default=None)
    opt.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer)
    opt.add_argument("--lr", type=float, default=d.lr, help="per 256 images of global batch")
    opt.add_argument("--weight-decay", type=float, default=argparse.SUPPRESS,
                     help=f"default: {d.weight_decay}; {DATA_DEFAULTS['shapes']['weight_decay']} with --data shapes")
    opt.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    opt.add_argument("--tau-base", type=float, default=argparse.SUPPRESS,
                     help=f"EMA momentum at step 0 (default: {d.tau_base}; {DATA_DEFAULTS['shapes']['tau_base']} "
                          f"with --data shapes)")
    opt.add_argument("--seed", type=int, default=d.seed)
    hw = p.add_argument_group("hardware")
    hw.add_argument("--accelerator", choices=("auto", "cpu", "gpu"), default="auto")
    hw.add_argument("--devices", default="1", help="number of devices, or 'auto'")
    hw.add_argument("--num-nodes", type=int, default=1)
    hw.add_argument("--strategy", default="auto", help="auto, ddp, ddp_spawn, ddp_notebook, ...")
    hw.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=d.sync_bn,
                    help="with several processes, BatchNorm statistics over the global batch")
    hw.add_argument("--compile", action="store_true",
                    help="compile LARS's update and the augmentation's colour steps with torch.compile "
                         "(a C++ compiler on CPU): faster steps after ~30 s of compilation (BENCHMARKS.md)")
    hw.add_argument("--precision", default="auto",
                    help="auto (bf16-mixed on GPUs that support it and on CPUs with AMX or AVX512-BF16, else 32), "
                         "32, bf16-mixed, 16-mixed")
    run = p.add_argument_group("run")
    run.add_argument("--out", default="runs/byol", help="output folder")
    run.add_argument("--resume", action="store_true", help="continue from OUT/last.ckpt")
    run.add_argument("--knn-every-n-epochs", type=int, default=5,
                     help="epochs between kNN monitor passes (at most the run's number of full epochs, so "
                          "that a short run is monitored too); each pass embeds the whole labeled split, "
                          "about 15%% of an epoch on the built-in data")
    run.add_argument("--save-every-n-steps", type=int, default=200,
                     help="write OUT/last.ckpt every N optimizer steps (also at the end, and on SIGTERM/SIGUSR1)")
    run.add_argument("--log-every-n-steps", type=int, default=10, help="steps between rows of logs/metrics.csv")
    run.add_argument("--no-progress", action="store_true", help="hide the progress bar (logs only)")
    return p


def _strengths(values: tuple[float, ...]) -> str:
    return " ".join(str(v) for v in values)


# Defaults that depend on the data, for flags left out on the command line (the rest come from
# TrainConfig and DEFAULT_EPOCHS). Measured on the built-in data (BENCHMARKS.md, "Learning on the
# built-in data"):
# - its colours are random, so colour never tells a class: a full turn of hue (0.5) takes away the
#   easiest way to tell two images apart, the palette (+5 kNN points in a same-conditions pair);
#   photos keep the paper's jitter, their colours mean something;
# - one local (multi-crop) view, a faster-moving target (tau_base 0.98) and weight decay 1e-5, in
#   40 epochs: +27.7 kNN points over random init (+28.2 in 50 epochs, 8 min 13 s), against +25.0
#   in 6 min 45 s for 50 epochs without them (two threads, seed 0; a local view costs about 20%
#   per step, which the shorter schedule pays for).
# The TrainConfig fields a preset may set; their flags default to "left out" (argparse.SUPPRESS).
PRESET_FLAGS = ("jitter", "local_views", "tau_base", "weight_decay")
DATA_DEFAULTS: dict[str, dict[str, object]] = {
    "shapes": {"jitter": (0.4, 0.4, 0.4, 0.5), "local_views": 1, "tau_base": 0.98, "weight_decay": 1e-5,
               "max_epochs": 40},
}


def apply_data_defaults(args: argparse.Namespace) -> None:
    """Fill the flags that were left out from ``DATA_DEFAULTS[args.data]``, else from TrainConfig
    (and DEFAULT_EPOCHS). A preset's local views are BYOL's only: the pixel methods pair the two
    main views and refuse them, so there they stay at TrainConfig's 0."""
    preset, defaults = dict(DATA_DEFAULTS.get(args.data, {})), TrainConfig()
    if args.method in PIXEL_METHODS:
        preset.pop("local_views", None)
    for name in PRESET_FLAGS:
        if getattr(args, name, None) is None:
            setattr(args, name, preset.get(name, getattr(defaults, name)))
    args.jitter = tuple(args.jitter)
    if args.max_epochs is None and args.max_steps is None:
        args.max_epochs = preset.get("max_epochs", DEFAULT_EPOCHS)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    return TrainConfig(**values)


# A run's length when neither --max-epochs nor --max-steps is given and the data has no preset of
# its own (the built-in data's is shorter: DATA_DEFAULTS).
DEFAULT_EPOCHS = 50


def resolve_precision(precision: str, accelerator: str) -> str:
    """``auto``: bf16-mixed on GPUs that support it and on CPUs with bf16 instructions (AMX matrix
    units or AVX512-BF16), 32-true otherwise. Once the convolutions on tiny maps run as matmuls
    (byol_nb.matmul_conv), a ResNet-18 step is 1.6-2x faster in bf16 at 32-64 px on an AMX Xeon
    and 1.6-2.0x on an AVX512-BF16 EPYC without AMX (BENCHMARKS.md)."""
    if precision != "auto":
        return precision
    gpu = accelerator == "gpu" or (accelerator == "auto" and torch.cuda.is_available())
    if gpu:
        return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"
    return "bf16-mixed" if cpu_has_bf16() else "32-true"


def cpu_has_bf16() -> bool:
    """Whether this CPU computes in bf16 natively: AMX tiles or AVX512-BF16 (torch's own checks)."""
    return any(getattr(torch.cpu, check, lambda: False)()
               for check in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


def validate_args(args: argparse.Namespace) -> None:
    """Stop before any work with one clear line for values that cannot work."""
    for flag in ("batch_size", "max_epochs", "max_steps", "save_every_n_steps", "num_nodes", "proj_hidden",
                 "proj_dim", "log_every_n_steps", "knn_every_n_epochs", "local_size"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise SystemExit(f"error: --{flag.replace('_', '-')} must be positive, got {value}")
    if args.num_workers < 0:
        raise SystemExit(f"error: --num-workers must be 0 or more, got {args.num_workers}")
    _check_devices(args.devices, args.accelerator)
    if args.image_size < 8:
        raise SystemExit(f"error: --image-size must be at least 8, got {args.image_size}")
    if args.lr <= 0:
        raise SystemExit(f"error: --lr must be positive, got {args.lr}")
    try:
        check_config(config_from_args(args))
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    if args.compile and (args.accelerator == "cpu" or torch.cuda.device_count() == 0):
        try:
            check_compiler()
        except RuntimeError as error:
            raise SystemExit(f"error: {error}") from None
    _check_writable(Path(args.out))  # last: it creates the folder


def _check_devices(devices: str, accelerator: str) -> None:
    """--devices is 'auto' or a positive count that the machine has (GPUs; CPU processes may
    outnumber cores, which is how tests run several processes)."""
    if devices == "auto":
        return
    if not devices.isdigit() or int(devices) <= 0:
        raise SystemExit(f"error: --devices must be a positive number or 'auto', got {devices!r}")
    gpus = torch.cuda.device_count()  # asks the driver without initialising CUDA in this process
    if accelerator == "gpu" and gpus == 0:
        raise SystemExit("error: --accelerator gpu but this machine shows no GPU (torch.cuda.device_count() is 0): "
                         "use --accelerator cpu, or check the driver and CUDA_VISIBLE_DEVICES")
    if accelerator in ("gpu", "auto") and 0 < gpus < int(devices):
        raise SystemExit(f"error: --devices {devices} but this machine has {gpus} GPU(s): "
                         f"use --devices {gpus} or fewer (per node)")


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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    apply_data_defaults(args)
    validate_args(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = config_from_args(args)
    try:
        devices, num_nodes = resolve_topology(args.devices, args.num_nodes)
        check_fork_safe(args.strategy, call=f"python -m byol_nb.train --strategy {args.strategy}")
    except (ValueError, ForkAfterCudaError) as error:
        raise SystemExit(f"error: {error}") from None
    pl.seed_everything(config.seed, workers=True, verbose=False)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    # Lightning cannot see that ResumableSampler continues mid-epoch exactly; it does.
    warnings.filterwarnings("ignore", ".*your dataloader is not resumable.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")  # Lightning's own use of a deprecated torch API
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_NoAdvertisements())

    datamodule = SSLDataModule(args.data, args.val_data, args.image_size, args.batch_size, args.num_workers,
                               seed=config.seed)
    module = BYOLModule(config, compiled=args.compile)
    initial_backbone = copy.deepcopy(module.backbone.state_dict())
    resume_from = out / "last.ckpt" if args.resume else None
    resume_step = _check_resume(resume_from, config, module) if resume_from is not None else None
    throughput = ThroughputMonitor()
    last = LastCheckpoint(out / "last.ckpt", args.save_every_n_steps)
    callbacks: list[pl.Callback] = [throughput, last, MonitorInterval(args.knn_every_n_epochs)]
    if datamodule.spec.val is not None:
        callbacks.append(ModelCheckpoint(dirpath=out, filename="best", monitor="knn_top1", mode="max",
                                         enable_version_counter=False))
    failure = FailureInjection.from_env()  # tests only: BYOL_NB_FAIL_AT_STEP
    if failure is not None:
        callbacks.append(failure)
    trainer = pl.Trainer(
        accelerator=args.accelerator, devices=devices, num_nodes=num_nodes, strategy=args.strategy,
        precision=resolve_precision(args.precision, args.accelerator),
        max_epochs=args.max_epochs if args.max_steps is None else -1, max_steps=args.max_steps or -1,
        callbacks=callbacks, enable_checkpointing=datamodule.spec.val is not None, plugins=[AtomicCheckpointIO()],
        logger=ResumableCSVLogger(out, name="logs", version="", resume_step=resume_step, flush_logs_every_n_steps=1),
        log_every_n_steps=args.log_every_n_steps,
        enable_progress_bar=not args.no_progress, enable_model_summary=False, deterministic=False,
        num_sanity_val_steps=0)
    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
    wall = time.perf_counter() - started
    if not trainer.is_global_zero:
        return 0
    if last.stopped_by is not None:
        requeued = last.stopped_by == "SIGUSR1" and requeue_slurm_job()
        print(f"\nstopped by {last.stopped_by} after step {trainer.global_step}: saved {out / 'last.ckpt'}; "
              + ("the SLURM job is requeued" if requeued else "continue with the same command and --resume"))
        return 0

    metrics = {"method": config.method, "global_step": trainer.global_step, "epochs": trainer.current_epoch,
               "final_loss": _last_logged(trainer, "train/loss"), "wall_time_s": round(wall, 1),
               "images_per_second": round(throughput.images_per_second, 1),
               "world_size": trainer.world_size, "config": asdict(config)}
    backbone = module.backbone.cpu().float()
    save_backbone(backbone, out / "backbone.pt", image_size=config.image_size)
    if datamodule.bank_set is not None:
        trained = evaluate_backbone(backbone, datamodule.bank_set, datamodule.val_set)
        backbone.load_state_dict(initial_backbone)
        at_init = evaluate_backbone(backbone, datamodule.bank_set, datamodule.val_set)
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
    from byol_nb.viz import plot_training_curves

    csv = out / "logs" / "metrics.csv"
    if csv.exists():
        plot_training_curves(csv).savefig(out / "curves.png", dpi=100, bbox_inches="tight")


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
    """``main`` with data problems turned into one ``error:`` line and exit status 1."""
    try:
        sys.exit(main(argv))
    except DataError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    cli()
