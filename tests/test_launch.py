"""byol_nb.launch: the options a notebook passes become exactly the flags the training script
accepts, and a wrong option fails in the kernel, before any process starts."""

from __future__ import annotations

import argparse
import io
import subprocess
import sys

import pytest

import byol_nb
from byol_nb import cli, config
from byol_nb.launch import train_command

# A value of every option, of every kind the parser has. Options whose value needs a companion
# option to make a run that can train carry it along.
SAMPLES: dict[str, list[tuple[object, dict]]] = {
    "data": [("some/photos", {}), ("shapes", {})],
    "val_data": [("some/labeled", {})],
    "image_size": [(64, {})],
    "crop_min_scale": [(0.2, {})],
    "jitter": [((0.4, 0.4, 0.2, 0.1), {}), ([0.1, 0.2, 0.3, 0.4], {})],
    "grayscale_p": [(0.5, {})],
    "blur": [(True, {}), (False, {})],
    "num_workers": [(2, {})],
    "method": [("byol", {}), ("pixpro", {"small_stem": True}), ("pixcontrast", {"small_stem": True})],
    "backbone": [(name, {}) for name in config.BACKBONES],
    "small_stem": [(True, {}), (False, {})],
    "pretrained": [(True, {}), (False, {})],
    "proj_hidden": [(64, {})],
    "proj_dim": [(32, {})],
    "local_views": [(2, {})],
    "local_size": [(12, {"local_views": 1})],
    "instance_weight": [(0.0, {"method": "pixpro", "small_stem": True})],
    "pixel_threshold": [(0.5, {"method": "pixpro", "small_stem": True})],
    "ppm_gamma": [(1.0, {"method": "pixpro", "small_stem": True})],
    "pixel_temperature": [(0.2, {"method": "pixcontrast", "small_stem": True})],
    "pixel_negative_distance": [(1.5, {"method": "pixcontrast", "small_stem": True})],
    "batch_size": [(16, {})],
    "max_epochs": [(3, {})],
    "max_steps": [(7, {})],
    "optimizer": [(name, {}) for name in config.OPTIMIZERS],
    "lr": [(0.5, {})],
    "weight_decay": [(1e-4, {})],
    "lars_eta": [(0.02, {})],
    "lars_clip": [(True, {}), (False, {})],
    "warmup_steps": [(5, {})],
    "warmup_epochs": [(0.5, {}), (2, {})],
    "tau_base": [(0.996, {})],
    "seed": [(3, {})],
    "accelerator": [("cpu", {}), ("auto", {})],
    "devices": [("2", {}), (2, {}), ("auto", {})],
    "num_nodes": [(2, {})],
    "strategy": [("ddp", {}), ("ddp_notebook", {})],
    "sync_bn": [(True, {}), (False, {})],
    "precision": [("32", {}), ("bf16-mixed", {})],
    "dist_timeout": [(60, {})],
    "out": [("runs/x", {})],
    "resume": [(True, {}), (False, {})],
    "knn_every_n_epochs": [(2, {})],
    "save_every_n_steps": [(50, {})],
    "save_every_n_minutes": [(0.5, {})],
    "log_every_n_steps": [(1, {})],
    "no_progress": [(True, {}), (False, {})],
}
CASES = [(name, value, companions) for name, samples in SAMPLES.items() for value, companions in samples]


def test_every_option_of_the_training_parser_has_a_sample():
    assert set(cli.build_parser().option_names()) == set(SAMPLES)


@pytest.mark.parametrize("name, value, companions", CASES, ids=[f"{n}={v!r}" for n, v, _ in CASES])
def test_options_round_trip_through_the_training_parser(name, value, companions):
    """Every option and value type (a switch given False, an on/off flag, a list, None) becomes flags
    that the parser of python -m byol_nb.train reads back as the same value."""
    options = {"val_data": None, **companions, name: value}
    # what launch() runs: python -m byol_nb.train --out OUT <flags>; `out` itself is launch's first argument
    argv = cli.command_line(**options) if name == "out" else train_command("runs/x", **options)[5:]
    args = cli.build_parser().check(argv)
    expected = tuple(value) if isinstance(value, list) else value
    parsed = getattr(args, name)
    assert (str(parsed) if name == "devices" else parsed) == (str(expected) if name == "devices" else expected)
    if name != "val_data":
        assert "--val-data" not in argv  # None leaves an option out
    if value is False:
        action = cli.build_parser().option_names()[name]
        on_off = isinstance(action, argparse.BooleanOptionalAction)
        assert argv == ([f"--no-{name.replace('_', '-')}"] if on_off else [])


def test_unknown_option_lists_the_valid_ones_and_suggests_the_closest():
    with pytest.raises(ValueError) as error:
        train_command("runs/x", max_step=3)
    message = str(error.value)
    assert "'max_step' (did you mean 'max_steps'?)" in message and "batch_size" in message and "sync_bn" in message


@pytest.mark.parametrize("options, message", [
    (dict(max_steps="three"), "argument --max-steps: invalid int value: 'three'"),
    (dict(method="simclr"), "invalid choice: 'simclr'"),
    (dict(resume="yes"), "resume is a switch"),
    (dict(method="pixpro"), "needs a feature map of at least 4x4 cells"),
    (dict(batch_size=0), "--batch-size must be positive"),
])
def test_a_value_the_script_would_refuse_fails_in_the_kernel(options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        train_command("runs/x", **options)


def test_launch_checks_its_options_before_starting_any_process(monkeypatch, tmp_path):
    started = []
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: started.append(a))
    with pytest.raises(ValueError, match="unknown training option"):
        byol_nb.launch(tmp_path / "run", max_setps=3)
    assert started == [] and not (tmp_path / "run").exists()


def test_the_command_is_the_training_module_with_the_output_folder_first():
    command = train_command("runs/x", max_steps=3, resume=False, sync_bn=False)
    assert command == [sys.executable, "-m", "byol_nb.train", "--out", "runs/x", "--max-steps", "3", "--no-sync-bn"]


def test_check_raises_instead_of_exiting():
    parser = cli.build_parser()
    with pytest.raises(ValueError, match="unrecognized arguments: --no-resume"):
        parser.check(["--no-resume"])
    with pytest.raises(SystemExit):  # the command line itself still exits with argparse's message
        parser.parse_args(["--no-resume"])
    assert isinstance(parser.check([]), argparse.Namespace)


def test_output_without_tracebacks_keeps_progress_and_names_the_error():
    """A failing run's tracebacks (one per process, thousands of characters) stay in the log; the
    cell keeps the progress bar and the other lines, and the error is named."""
    from byol_nb.launch import _Output

    shown, log = io.StringIO(), io.StringIO()
    output = _Output(shown, log, show_tracebacks=False)
    text = ("start\n\rEpoch 0:  10%\rEpoch 0:  20%\r[rank1]: Traceback (most recent call last):\n"
            "[rank1]:   File \"x.py\", line 1\n[rank1]: RuntimeError: injected\nafter\n")
    for piece in (text[:9], text[9:60], text[60:]):  # as it arrives, cut anywhere
        output.write(piece)
    assert log.getvalue() == text
    assert shown.getvalue() == "start\n\rEpoch 0:  10%\rEpoch 0:  20%\rafter\n"
    assert output.errors == ["[rank1]: RuntimeError: injected"]
