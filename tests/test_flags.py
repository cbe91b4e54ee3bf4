"""Bad flags and settings stop before any training with one clear line each."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from byol_nb import cli, config, devices, train
from byol_nb.datamodule import SSLDataModule
from byol_nb.images import DataError


def _stop(tmp_path, *flags: str) -> str:
    """The message train.main stops with; it must come before any output folder work or training."""
    with pytest.raises(SystemExit) as stop:
        train.main(["--out", str(tmp_path / "out"), "--accelerator", "cpu", *flags])
    message = str(stop.value)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


@pytest.mark.parametrize("flags, expected", [
    (["--batch-size", "0"], "--batch-size must be positive, got 0"),
    (["--batch-size", "-4"], "--batch-size must be positive, got -4"),
    (["--max-steps", "0"], "--max-steps must be positive, got 0"),
    (["--max-epochs", "-1"], "--max-epochs must be positive, got -1"),
    (["--save-every-n-steps", "0"], "--save-every-n-steps must be positive, got 0"),
    (["--knn-every-n-epochs", "0"], "--knn-every-n-epochs must be positive, got 0"),
    (["--num-workers", "-1"], "--num-workers must be 0 or more, got -1"),
    (["--image-size", "4"], "--image-size must be at least 8, got 4"),
    (["--lr", "0"], "--lr must be positive"),
    (["--devices", "0"], "--devices must be a positive number or 'auto', got '0'"),
    (["--devices", "two"], "--devices must be a positive number or 'auto', got 'two'"),
    (["--crop-min-scale", "0"], "--crop-min-scale must be in (0, 1], got 0.0"),
    (["--crop-min-scale", "1.5"], "--crop-min-scale must be in (0, 1], got 1.5"),
    (["--jitter", "0.4", "0.4", "0.4", "0.7"], "hue at most 0.5"),
    (["--jitter", "-0.1", "0.4", "0.4", "0.1"], "--jitter strengths must be 0 or more"),
    (["--grayscale-p", "1.5"], "--grayscale-p is a probability"),
    (["--method", "pixpro", "--image-size", "32"], "needs a feature map of at least 4x4 cells"),
    (["--dist-timeout", "0"], "--dist-timeout must be positive, got 0"),
    (["--local-views", "-1"], "--local-views must be 0 or more, got -1"),
    (["--local-views", "2", "--local-size", "0"], "--local-size must be positive, got 0"),
    (["--local-views", "2", "--local-size", "40"], "--local-size must be between 8 and --image-size (32), got 40"),
    (["--local-views", "2", "--crop-min-scale", "0.05"], "--crop-min-scale must be above 0.05"),
    (["--method", "pixpro", "--image-size", "64", "--local-views", "2"], "--local-views is for --method byol"),
])
def test_bad_value_gets_its_message(tmp_path, flags, expected):
    assert expected in _stop(tmp_path, *flags)
    assert not (tmp_path / "out").exists(), "a rejected run must not create its output folder"


def test_gpu_flag_without_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    message = _stop(tmp_path, "--accelerator", "gpu")
    assert "shows no GPU" in message and "--accelerator cpu" in message


def test_more_devices_than_the_machine_has(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert "--devices 4 but this machine has 2 GPU(s): use --devices 2 or fewer" in _stop(
        tmp_path, "--accelerator", "gpu", "--devices", "4")


def test_more_cpu_processes_than_cores_stop_at_once(tmp_path, monkeypatch):
    """64 CPU processes on a 2-core machine would start a 64-member process group and hang."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(devices, "cpu_cores", lambda: 2)
    message = _stop(tmp_path, "--devices", "64")
    assert "--devices 64 starts 64 CPU processes, but this process may use 2 CPU core(s): use --devices 2" in message
    with pytest.raises(SystemExit):
        train.parse_args(["--out", str(tmp_path / "o"), "--accelerator", "auto", "--devices", "3"])
    train.parse_args(["--out", str(tmp_path / "o"), "--accelerator", "cpu", "--devices", "2"])


def test_output_folder_that_cannot_be_written(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    message = _stop(tmp_path, "--out", str(blocker / "run"))
    assert f"cannot write to --out {str(blocker / 'run')!r}" in message and "choose a folder" in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to read-only folders")
def test_read_only_output_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert "cannot write to --out" in _stop(tmp_path, "--out", str(locked))


@pytest.mark.parametrize("flag, value, choices", [("--backbone", "resnet9", "resnet18"),
                                                  ("--method", "simclr", "byol")])
def test_unknown_backbone_or_method_names_the_choices(tmp_path, capsys, flag, value, choices):
    with pytest.raises(SystemExit) as stop:
        train.main(["--out", str(tmp_path / "out"), flag, value])
    assert stop.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"invalid choice: '{value}'" in error and choices in error


def test_batch_larger_than_each_process_share_of_the_data(tiny_shapes):
    """48 images over 8 processes is 6 each: fewer than one batch of 8 per process."""
    datamodule = SSLDataModule(str(tiny_shapes / "train"), None, 32, batch_size=8)
    datamodule.trainer = SimpleNamespace(world_size=8)
    with pytest.raises(DataError, match=r"48 usable image\(s\), split over 8 processes, fewer than one batch "
                                        r"of 8 per process"):
        datamodule.setup("fit")


SHAPES, CIFAR, STL = (cli.DATA_DEFAULTS[name] for name in ("shapes", "cifar10", "stl10"))
PLAIN = config.TrainConfig()


@pytest.mark.parametrize("flags, expected", [
    (["--data", "shapes"], dict(jitter=SHAPES["jitter"], local_views=SHAPES["local_views"], tau_base=SHAPES["tau_base"],
                                weight_decay=SHAPES["weight_decay"], warmup_steps=SHAPES["warmup_steps"],
                                max_epochs=SHAPES["max_epochs"], lr=PLAIN.lr, small_stem=False)),
    (["--data", "some/photos"], dict(jitter=PLAIN.jitter, local_views=PLAIN.local_views, tau_base=PLAIN.tau_base,
                                     weight_decay=PLAIN.weight_decay, warmup_steps=PLAIN.warmup_steps,
                                     warmup_epochs=None, max_epochs=cli.DEFAULT_EPOCHS, image_size=32)),
    (["--data", "shapes", "--warmup-steps", "7"], dict(warmup_steps=7, tau_base=SHAPES["tau_base"])),
    (["--data", "shapes", "--jitter", "0.1", "0.2", "0.3", "0.4"], dict(jitter=(0.1, 0.2, 0.3, 0.4))),
    (["--data", "shapes", "--local-views", "0", "--tau-base", "0.9", "--weight-decay", "0"],
     dict(local_views=0, tau_base=0.9, weight_decay=0.0, jitter=SHAPES["jitter"])),
    (["--data", "shapes", "--max-steps", "7"], dict(max_epochs=None, max_steps=7)),
    # the pixel losses pair the two main views only: no preset local views for them
    (["--data", "shapes", "--method", "pixpro", "--small-stem"], dict(local_views=0, tau_base=SHAPES["tau_base"])),
    (["--data", "cifar10"], dict(CIFAR, local_views=0, image_size=32, tau_base=PLAIN.tau_base)),
    (["--data", "stl10"], dict(STL, small_stem=False, blur=True)),
    # a warmup given in either unit replaces the preset's, whichever unit that uses
    (["--data", "cifar10", "--warmup-steps", "500"], dict(warmup_steps=500, warmup_epochs=None)),
    (["--data", "shapes", "--warmup-epochs", "2"], dict(warmup_epochs=2.0, warmup_steps=PLAIN.warmup_steps)),
    (["--data", "cifar10", "--no-small-stem", "--lr", "0.5", "--batch-size", "64", "--blur"],
     dict(small_stem=False, lr=0.5, batch_size=64, blur=True, proj_hidden=CIFAR["proj_hidden"])),
    (["--data", "stl10", "--image-size", "64", "--method", "pixpro", "--small-stem"],
     dict(image_size=64, small_stem=True, tau_base=STL["tau_base"])),
])
def test_defaults_depend_on_the_data_and_a_given_flag_wins(flags, expected):
    args = cli.build_parser().parse_args(flags)
    cli.apply_data_defaults(args)
    for name, value in expected.items():
        assert getattr(args, name) == (tuple(value) if name == "jitter" else value), name
    config.check_config(cli.config_from_args(args))
    assert isinstance(cli.config_from_args(args).jitter, tuple)


@pytest.mark.parametrize("data", list(cli.DATA_DEFAULTS))
def test_a_preset_sets_only_flags_and_only_what_differs(data):
    for name, value in cli.DATA_DEFAULTS[data].items():
        assert name in cli.PRESET_FLAGS or name == "max_epochs", name
        plain = cli.DEFAULT_EPOCHS if name == "max_epochs" else getattr(PLAIN, name)
        assert value != plain, f"--data {data} repeats the default of {name}"
    assert f"--data {data}: " in " ".join(cli.build_parser().format_help().split())


@pytest.mark.parametrize("warmup, total, expected", [
    (dict(warmup_steps=50), 10_000, 50),
    (dict(warmup_steps=50), 200, 20),  # a tenth of a short run at most
    (dict(warmup_epochs=10), 10_000, 390),  # 10 epochs of 39 steps
    (dict(warmup_epochs=0.5), 10_000, 20),
    (dict(warmup_epochs=10), 390, 39),
])
def test_warmup_in_steps_or_epochs(warmup, total, expected):
    assert config.TrainConfig(**warmup).warmup_length(steps_per_epoch=39, total_steps=total) == expected


def test_a_named_set_that_refuses_pixel_methods_proposes_the_small_stem():
    args = cli.build_parser().parse_args(["--data", "stl10", "--method", "pixpro"])
    cli.apply_data_defaults(args)
    with pytest.raises(ValueError, match="96 px images give 3x3 .*add --small-stem"):
        config.check_config(cli.config_from_args(args))


@pytest.mark.parametrize("flags, expected", [
    ("fpu sse avx2 fma", "32-true"),  # an AVX2 CPU: bf16 would be emulated, slower than fp32
    ("fpu avx2 avx512f avx512_bf16", "bf16-mixed"),  # AMD Zen 4/5
    ("fpu avx2 avx512f amx_tile amx_bf16", "bf16-mixed"),  # Intel Xeon with AMX
])
def test_auto_precision_on_a_cpu_is_bf16_only_with_bf16_instructions(monkeypatch, tmp_path, flags, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor : 0\nflags : {flags}\n")
    real = devices.cpu_has_bf16
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: real(cpuinfo))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert devices.resolve_precision("auto", "auto") == expected
    assert devices.resolve_precision("auto", "cpu") == expected
    assert devices.resolve_precision("32", "cpu") == "32"  # a given precision is kept
