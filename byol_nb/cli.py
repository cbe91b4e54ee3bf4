"""The command line of ``python -m byol_nb.train``: its parser, the recipes that depend on the data
(``--data`` presets), the checks that stop a bad flag before any work, and :func:`command_line`,
which turns keyword options into flags for :mod:`byol_nb.launch`.

Like :mod:`byol_nb.config` it imports only the standard library: a notebook's options are checked
against the real parser before any process (or torch) starts.
"""

from __future__ import annotations

import argparse
import difflib
from dataclasses import fields
from typing import Any, Sequence

from byol_nb.config import BACKBONES, METHODS, NAMED_DATA, OPTIMIZERS, PIXEL_METHODS, TrainConfig, check_config

# The TrainConfig fields a data preset may set; their flags default to "left out" (argparse.SUPPRESS)
# so that a flag given on the command line always wins.
PRESET_FLAGS = ("image_size", "small_stem", "crop_min_scale", "jitter", "blur", "local_views", "proj_hidden",
                "batch_size", "lr", "weight_decay", "lars_eta", "lars_clip", "warmup_steps", "warmup_epochs",
                "tau_base")
# A run's length when neither --max-epochs nor --max-steps is given and the data has no preset.
DEFAULT_EPOCHS = 50
# Each named dataset's recipe, and where it comes from (the help text and the README cite it).
#
# shapes: random colours, so colour never tells a class: a full turn of hue (0.5) takes the palette
# away as a shortcut. One local view, a faster target and weight decay 1e-5 were the best recipe
# tried on them in a CPU budget of minutes (the README's "Recipes by data"). The longer
# warmup (a tenth of the run, the cap in BYOLModule.configure_optimizers) keeps the first full-size
# steps from scrambling the random network's features before the target can guide them: with 50
# steps some seeds spent most of the run recovering. Crops from a quarter of the image (not 0.35) make
# the two views of a shape differ more, which lifted the seeds that learned least.
# cifar10: solo-learn's BYOL recipe for CIFAR (scripts/pretrain/cifar/byol.yaml, with its asymmetric
# augmentations: no blur; ResNet-18 with the CIFAR stem; its LARS with trust coefficient 0.02 and each
# layer's rate clipped at the global rate). lightly's CIFAR-10 benchmark reports about
# 87% kNN for BYOL with a ResNet-18 after 200 epochs; solo-learn 92.6% linear after 1000.
# stl10: the BYOL paper's ImageNet recipe (Grill et al. 2020, section 3.3 and appendix C) at STL-10's
# 96 px: LARS at 0.2 per 256 images, weight decay 1.5e-6, tau 0.996, 10 warmup epochs.
DATA_DEFAULTS: dict[str, dict[str, Any]] = {
    "shapes": {"crop_min_scale": 0.25, "jitter": (0.4, 0.4, 0.4, 0.5), "local_views": 1, "tau_base": 0.98,
               "weight_decay": 1e-5, "warmup_steps": 100, "max_epochs": 40},
    "cifar10": {"small_stem": True, "crop_min_scale": 0.08, "blur": False, "proj_hidden": 4096, "batch_size": 256,
                "lr": 1.0, "weight_decay": 1e-5, "lars_eta": 0.02, "lars_clip": True, "warmup_epochs": 10,
                "max_epochs": 200},
    "stl10": {"image_size": 96, "crop_min_scale": 0.08, "proj_hidden": 4096, "batch_size": 256, "lr": 0.2,
              "warmup_epochs": 10, "tau_base": 0.996, "max_epochs": 200},
}
PRESET_SOURCES = {"shapes": "tuned here", "cifar10": "from solo-learn", "stl10": "from the BYOL paper"}


def apply_data_defaults(args: argparse.Namespace) -> None:
    """Fill the flags that were left out from ``DATA_DEFAULTS[args.data]``, else from TrainConfig
    (and DEFAULT_EPOCHS). A preset's local views are BYOL's only: the pixel methods pair the two
    main views and refuse them, so there they stay at TrainConfig's 0. A warmup given either way
    (``--warmup-steps`` or ``--warmup-epochs``) replaces the preset's warmup, whichever way it is set."""
    preset, defaults = dict(DATA_DEFAULTS.get(args.data, {})), TrainConfig()
    if args.method in PIXEL_METHODS:
        preset.pop("local_views", None)
    if any(getattr(args, name, None) is not None for name in ("warmup_steps", "warmup_epochs")):
        preset.pop("warmup_steps", None)
        preset.pop("warmup_epochs", None)
    for name in PRESET_FLAGS:
        if getattr(args, name, None) is None:
            setattr(args, name, preset.get(name, getattr(defaults, name)))
    args.jitter = tuple(args.jitter)
    if args.max_epochs is None and args.max_steps is None:
        args.max_epochs = preset.get("max_epochs", DEFAULT_EPOCHS)


def _preset_help(name: str, what: str = "") -> str:
    """``what``, then the flag's default and each preset's value with its source."""
    plain = getattr(TrainConfig(), name) if name != "max_epochs" else DEFAULT_EPOCHS
    values = [f"--data {data}: {_value(preset[name])}, {PRESET_SOURCES[data]}"
              for data, preset in DATA_DEFAULTS.items() if name in preset]
    return f"{what}{' ' if what else ''}(default: {_value(plain)}" + "".join(f"; {v}" for v in values) + ")"


def _value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    if isinstance(value, bool):
        return "on" if value else "off"
    return "none" if value is None else str(value)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    return TrainConfig(**values)


# ---- the command line ---------------------------------------------------------------------------

class TrainParser(argparse.ArgumentParser):
    """The parser of ``python -m byol_nb.train``; :meth:`check` parses without exiting."""

    raise_errors = False

    def error(self, message: str):  # type: ignore[override]
        if self.raise_errors:
            raise ValueError(message)
        super().error(message)

    def check(self, argv: Sequence[str]) -> argparse.Namespace:
        """Parse ``argv`` and fill the data defaults; raise ValueError with argparse's message
        instead of printing it and exiting (for callers that are not the command line)."""
        self.raise_errors = True
        try:
            args = self.parse_args(list(argv))
        finally:
            self.raise_errors = False
        apply_data_defaults(args)
        return args

    def option_names(self) -> dict[str, argparse.Action]:
        """Each option's keyword name (``max_steps`` for ``--max-steps``) and its argparse action."""
        return {action.dest: action for action in self._actions if action.option_strings and action.dest != "help"}


def build_parser() -> TrainParser:
    d = TrainConfig()
    preset = dict(default=argparse.SUPPRESS)  # a flag that a --data preset may set: left out unless given
    p = TrainParser(prog="python -m byol_nb.train", description="Self-supervised pretraining (BYOL, PixPro).",
                    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--data", default="shapes",
                      help=f"{', '.join(repr(name) for name in NAMED_DATA)} (the first built in, the others "
                           f"downloaded by torchvision), or a folder of images")
    data.add_argument("--val-data", default=None,
                      help="labeled folder (one sub-folder per class) for the kNN monitor; --data must be labeled too")
    data.add_argument("--image-size", type=int, **preset, help=_preset_help("image_size", "side of the views in px"))
    data.add_argument("--crop-min-scale", type=float, **preset,
                      help=_preset_help("crop_min_scale", "smallest crop area, as a fraction of the image "
                                                          "(paper: 0.08)"))
    data.add_argument("--jitter", type=float, nargs=4, **preset, metavar=("B", "C", "S", "H"),
                      help=_preset_help("jitter", "colour jitter strengths: brightness, contrast, saturation, hue "
                                                  "(hue at most 0.5; the paper's: 0.4 0.4 0.2 0.1)"))
    data.add_argument("--blur", action=argparse.BooleanOptionalAction, **preset,
                      help=_preset_help("blur", "Gaussian blur in the views (always in view 1, 10%% of view 2)"))
    data.add_argument("--grayscale-p", type=float, default=d.grayscale_p,
                      help="probability that a view is turned grayscale (1: colour never tells two images apart)")
    data.add_argument("--num-workers", type=int, default=None,
                      help="DataLoader workers per process (None: 0 when the images fit in the shared decode "
                           "cache, else the CPUs per process less one, at most 16)")
    model = p.add_argument_group("model")
    model.add_argument("--method", choices=METHODS, default=d.method)
    model.add_argument("--backbone", choices=BACKBONES, default=d.backbone)
    model.add_argument("--small-stem", action=argparse.BooleanOptionalAction, **preset,
                       help=_preset_help("small_stem", "3x3 stride-1 stem without max-pool, for small images "
                                                       "(feature maps 4x larger on each side)"))
    model.add_argument("--pretrained", action="store_true", help="start from torchvision's ImageNet weights (online)")
    model.add_argument("--proj-hidden", type=int, **preset,
                       help=_preset_help("proj_hidden", "hidden width of projector and predictor (paper: 4096)"))
    model.add_argument("--proj-dim", type=int, default=d.proj_dim)
    model.add_argument("--local-views", type=int, **preset,
                       help=_preset_help("local_views", "multi-crop (--method byol only): extra small views per "
                                                        "image, each predicting both main views' targets"))
    model.add_argument("--local-size", type=int, default=d.local_size,
                       help="side of the local views in pixels (default: half of --image-size)")
    model.add_argument("--instance-weight", type=float, default=d.instance_weight,
                       help="pixel methods: weight of the instance (BYOL) loss on pooled features; 0 for pixel-only")
    model.add_argument("--pixel-threshold", type=float, default=d.pixel_threshold,
                       help="pixel methods: cells closer than this (in cell diagonals) are positive pairs")
    model.add_argument("--ppm-gamma", type=float, default=d.ppm_gamma,
                       help="pixpro: exponent of the propagation's similarity, max(cos, 0) ** gamma")
    model.add_argument("--pixel-temperature", type=float, default=d.pixel_temperature,
                       help="pixcontrast: the InfoNCE temperature")
    model.add_argument("--pixel-negative-distance", type=float, default=d.pixel_negative_distance,
                       help="pixcontrast: cells of one image farther apart than this (in cell diagonals) are "
                            "negatives; between --pixel-threshold and this, neither")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--batch-size", type=int, **preset, help=_preset_help("batch_size", "per process"))
    steps = opt.add_mutually_exclusive_group()
    steps.add_argument("--max-epochs", type=int, default=None,
                       help=_preset_help("max_epochs", "when --max-steps is not given either"))
    steps.add_argument("--max-steps", type=int, default=None)
    opt.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer)
    opt.add_argument("--lr", type=float, **preset,
                     help=_preset_help("lr", "per 256 images of global batch (paper: 0.2 with LARS)"))
    opt.add_argument("--weight-decay", type=float, **preset, help=_preset_help("weight_decay", "(paper: 1.5e-6)"))
    opt.add_argument("--lars-eta", type=float, **preset,
                     help=_preset_help("lars_eta", "LARS trust coefficient: each layer's step is scaled by "
                                                   "eta ||w|| / ||g + wd w|| (paper: 0.001)"))
    opt.add_argument("--lars-clip", action=argparse.BooleanOptionalAction, **preset,
                     help=_preset_help("lars_clip", "clip each layer's LARS rate at the global learning rate"))
    warmup = opt.add_mutually_exclusive_group()
    warmup.add_argument("--warmup-steps", type=int, **preset,
                        help=_preset_help("warmup_steps", "linear warmup, at most a tenth of the run"))
    warmup.add_argument("--warmup-epochs", type=float, **preset,
                        help=_preset_help("warmup_epochs", "the warmup in epochs instead (paper: 10)"))
    opt.add_argument("--tau-base", type=float, **preset,
                     help=_preset_help("tau_base", "EMA momentum at step 0 (paper: 0.996)"))
    opt.add_argument("--seed", type=int, default=d.seed)
    hw = p.add_argument_group("hardware")
    hw.add_argument("--accelerator", choices=("auto", "cpu", "gpu"), default="auto")
    hw.add_argument("--devices", default="1", help="number of devices (processes) per node, or 'auto'")
    hw.add_argument("--num-nodes", type=int, default=1)
    hw.add_argument("--strategy", default="auto", help="auto, ddp, ddp_spawn, ddp_notebook, ...")
    hw.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=d.sync_bn,
                    help="with several processes, BatchNorm statistics over the global batch")
    hw.add_argument("--precision", default="auto",
                    help="auto (bf16-mixed on GPUs that support it and on CPUs with bf16 instructions, else 32), "
                         "32, bf16-mixed, 16-mixed")
    hw.add_argument("--dist-timeout", type=int, default=300,
                    help="seconds a process waits for the others in a collective operation before the job "
                         "stops (a hung or crashed process then frees every device)")
    run = p.add_argument_group("run")
    run.add_argument("--out", default="runs/byol", help="output folder")
    run.add_argument("--resume", action="store_true", help="continue from OUT/last.ckpt")
    run.add_argument("--knn-every-n-epochs", type=int, default=5,
                     help="epochs between kNN monitor passes (at most the run's number of full epochs, so "
                          "that a short run is monitored too); each pass embeds the whole labeled split")
    run.add_argument("--save-every-n-minutes", type=float, default=10.0,
                     help="write OUT/last.ckpt every N minutes of training (also at the end, and on SIGTERM/SIGUSR1)")
    run.add_argument("--save-every-n-steps", type=int, default=None,
                     help="also write OUT/last.ckpt every N optimizer steps")
    run.add_argument("--log-every-n-steps", type=int, default=10,
                     help="steps between rows of the metrics log (and between checks for a non-finite loss)")
    run.add_argument("--no-progress", action="store_true", help="hide the progress bar (logs only)")
    return p


POSITIVE_FLAGS = ("batch_size", "max_epochs", "max_steps", "save_every_n_steps", "save_every_n_minutes", "num_nodes", "proj_hidden",
                  "proj_dim", "log_every_n_steps", "knn_every_n_epochs", "local_size", "dist_timeout")


def check_args(args: argparse.Namespace) -> None:
    """Raise ValueError, naming the flag, for values that cannot work (before any process starts)."""
    for flag in POSITIVE_FLAGS:
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be positive, got {value}")
    if args.num_workers is not None and args.num_workers < 0:
        raise ValueError(f"--num-workers must be 0 or more, got {args.num_workers}")
    if args.devices != "auto" and (not args.devices.isdigit() or int(args.devices) <= 0):
        raise ValueError(f"--devices must be a positive number or 'auto', got {args.devices!r}")
    if args.image_size < 8:
        raise ValueError(f"--image-size must be at least 8, got {args.image_size}")
    if args.lr <= 0:
        raise ValueError(f"--lr must be positive, got {args.lr}")
    check_config(config_from_args(args))


def command_line(**options: object) -> list[str]:
    """The arguments of ``python -m byol_nb.train`` for keyword ``options``, checked by its parser.

    ``max_steps=3`` gives ``--max-steps 3``. A switch such as ``resume`` gives its flag for True and
    nothing for False; an on/off flag such as ``sync_bn`` gives ``--sync-bn`` or ``--no-sync-bn``; a
    list (``jitter=(0.4, 0.4, 0.4, 0.1)``) gives its values; None leaves the option out. Raises
    ValueError for an unknown name (listing the valid ones) or a value the parser refuses.
    """
    parser = build_parser()
    actions = parser.option_names()
    unknown = [name for name in options if name not in actions]
    if unknown:
        hints = {name: difflib.get_close_matches(name, actions, n=1) for name in unknown}
        named = ", ".join(f"{name!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "") for name, hint in hints.items())
        raise ValueError(f"unknown training option(s) {named}; the options are: {', '.join(sorted(actions))}")
    argv: list[str] = []
    for name, value in options.items():
        action, flag = actions[name], actions[name].option_strings[0]
        if value is None:
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            argv.append(flag if value else "--no-" + flag[2:])
        elif action.nargs == 0:  # a switch (store_true): only its presence means anything
            if not isinstance(value, bool):
                raise ValueError(f"{name} is a switch: pass True or False, got {value!r}")
            argv += [flag] if value else []
        elif isinstance(value, (list, tuple)):
            argv += [flag, *(str(v) for v in value)]
        else:
            argv += [flag, str(value)]
    args = parser.check(argv)
    check_args(args)
    return argv
