"""Atomic checkpoint writes and untrusted files: a kill or a full disk while saving leaves the
previous file loadable; a file that would run code, or comes from another architecture or format,
is refused with a message that names what is wrong."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from byol_nb import checkpoint, evaluate, train
from byol_nb.checkpoint import AtomicCheckpointIO, CheckpointError, atomic_save, load_backbone, safe_load, save_backbone
from byol_nb.models import Backbone
from byol_nb.module import BYOLModule, TrainConfig


class RunsCode:
    """What a malicious pickle does: importing os.system and calling it while loading."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def backbone_file(tmp_path_factory) -> Path:
    return save_backbone(Backbone("resnet18"), tmp_path_factory.mktemp("bb") / "backbone.pt", image_size=32)


# ---- atomic writes ---------------------------------------------------------------------------
def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": torch.tensor(1)}, path)

    def dies_half_way(obj, file):
        file.write(b"PK\x03\x04 half a zip file")
        raise KeyboardInterrupt  # what a signal does in the middle of torch.save

    monkeypatch.setattr(checkpoint.torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        AtomicCheckpointIO().save_checkpoint({"step": torch.tensor(2)}, path)
    monkeypatch.undo()
    assert AtomicCheckpointIO().load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"], "temporary file left behind"


def _short_write(obj, file):
    file.write(b"PK\x03\x04 half a zip file")
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1024 vs 996")  # torch's words


@pytest.mark.parametrize("free_mb, raised", [(1, checkpoint.DiskFullError), (10_000, RuntimeError)])
def test_a_full_disk_is_named_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, free_mb, raised):
    path = tmp_path / "last.ckpt"
    atomic_save({"step": torch.tensor(1)}, path)
    monkeypatch.setattr(checkpoint.torch, "save", _short_write)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda folder: SimpleNamespace(free=free_mb * 2**20))
    with pytest.raises(raised) as error:
        atomic_save({"step": torch.tensor(2)}, path)
    assert type(error.value) is raised  # a failure with space left is not called a full disk
    if raised is checkpoint.DiskFullError:
        assert f"could not write {path}: its disk is full (1 MB free); the previous last.ckpt is intact" in (
            str(error.value))
    monkeypatch.undo()
    assert safe_load(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"], "temporary file left behind"


def test_a_full_disk_ends_the_command_with_one_error_line(monkeypatch):
    def full_disk(argv):
        raise checkpoint.DiskFullError("could not write runs/last.ckpt: its disk is full (0 MB free)")

    monkeypatch.setattr(train, "main", full_disk)
    with pytest.raises(SystemExit) as stop:
        train.cli([])
    assert stop.value.code == "error: could not write runs/last.ckpt: its disk is full (0 MB free)"


WRITER = """
import sys, torch
from byol_nb.checkpoint import AtomicCheckpointIO
io, i = AtomicCheckpointIO(), 0
while True:
    i += 1
    io.save_checkpoint({"version": i, "weights": torch.full((4_000_000,), float(i))}, sys.argv[1])
"""


@pytest.mark.slow
def test_process_killed_while_saving_leaves_a_loadable_checkpoint(tmp_path):
    """SIGKILL a process that rewrites a 16 MB checkpoint in a loop, at random moments: the file
    on disk is always a complete checkpoint (an in-place torch.save leaves a truncated one)."""
    path, rng = tmp_path / "last.ckpt", random.Random()
    for _ in range(4):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)])
        deadline = time.monotonic() + 120
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.05, 1.0))
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        loaded = safe_load(path)
        assert torch.equal(loaded["weights"], torch.full((4_000_000,), float(loaded["version"])))
    AtomicCheckpointIO().save_checkpoint({"version": 0}, path)  # the next save clears killed writers' temporaries
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


# ---- untrusted and foreign files -------------------------------------------------------------
def test_pickle_that_would_run_code_is_refused(tmp_path, backbone_file):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "backbone.pt"
    payload = torch.load(backbone_file, weights_only=True)
    torch.save({**payload, "extra": RunsCode(marker)}, evil)
    with pytest.raises(CheckpointError, match=r"refused to load .*import (posix|os)\.system"):
        load_backbone(evil)
    assert evaluate.main(["--backbone", str(evil), "--train", str(tmp_path), "--test", str(tmp_path)]) == 2
    assert not marker.exists(), "loading the file ran its code"


def test_resume_from_a_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    torch.save({"hyper_parameters": {}, "state_dict": {}, "hook": RunsCode(marker)}, tmp_path / "last.ckpt")
    with pytest.raises(SystemExit, match="refused to load"):
        train.main(["--out", str(tmp_path), "--resume", "--max-steps", "1", "--proj-hidden", "32"])
    assert not marker.exists()


def test_empty_file_gets_a_message(tmp_path):
    (tmp_path / "backbone.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_backbone(tmp_path / "backbone.pt")


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=3000), prefix=st.sampled_from([b"", b"PK\x03\x04", b"\x80\x02"]))
@example(content=b"c", prefix=b"")  # found by hypothesis in CI
def test_random_bytes_get_a_message_not_a_crash(tmp_path, content, prefix):
    path = tmp_path / "fuzz.pt"
    path.write_bytes(prefix + content)
    # b"c..." is pickle's GLOBAL opcode: the refusal to import is the right message for it too.
    with pytest.raises(CheckpointError, match="not a readable torch file|cannot be read|not a byol_nb|refused to load"):
        load_backbone(path)


def test_truncated_backbone_gets_a_message(tmp_path, backbone_file):
    path = tmp_path / "backbone.pt"
    path.write_bytes(backbone_file.read_bytes()[:100_000])
    with pytest.raises(CheckpointError, match="cannot be read|not a readable"):
        load_backbone(path)


def test_backbone_of_another_architecture_names_the_difference(tmp_path, backbone_file):
    payload = torch.load(backbone_file, weights_only=True)
    torch.save({**payload, "backbone": "resnet34"}, tmp_path / "backbone.pt")
    with pytest.raises(CheckpointError, match=r"do not fit a resnet34 backbone.*missing tensors"):
        load_backbone(tmp_path / "backbone.pt")
    torch.save({**payload, "small_stem": True}, tmp_path / "stem.pt")
    with pytest.raises(CheckpointError, match=r"shape differences \(e\.g\. body\.0\.weight: file \(64, 3, 7, 7\)"):
        load_backbone(tmp_path / "stem.pt")


@pytest.mark.parametrize("change, message", [
    ({"format": "byol_nb.backbone/0"}, "format 'byol_nb.backbone/0', but this version reads 'byol_nb.backbone/1'"),
    ({"format": None, "pytorch-lightning_version": "2.6"}, "a Lightning training checkpoint"),
])
def test_backbone_file_of_another_format_names_it(tmp_path, backbone_file, change, message):
    payload = torch.load(backbone_file, weights_only=True)
    torch.save({**payload, **change}, tmp_path / "backbone.pt")
    with pytest.raises(CheckpointError, match=message):
        load_backbone(tmp_path / "backbone.pt")


def test_bare_state_dict_is_named(tmp_path):
    torch.save(Backbone("resnet18").state_dict(), tmp_path / "weights.pt")
    with pytest.raises(CheckpointError, match="bare state_dict"):
        load_backbone(tmp_path / "weights.pt")


TINY = TrainConfig(proj_hidden=32, proj_dim=16)
FLAGS = ["--max-steps", "1", "--proj-hidden", "32", "--proj-dim", "16", "--resume"]


def _fake_last_checkpoint(out: Path, config: TrainConfig, rename: bool = False) -> None:
    state = BYOLModule(config).state_dict()
    if rename:  # what an older layout of the networks looks like
        state = {k.replace("nets.online.", "nets.student."): v for k, v in state.items()}
    atomic_save({"hyper_parameters": asdict(config), "state_dict": state}, out / "last.ckpt")


def test_resume_with_another_backbone_names_what_differs(tmp_path):
    _fake_last_checkpoint(tmp_path, TINY)
    with pytest.raises(SystemExit, match=r"backbone='resnet18' in the checkpoint, 'resnet34' now.*Pass the"):
        train.main(["--out", str(tmp_path), "--backbone", "resnet34", *FLAGS])
    with pytest.raises(SystemExit, match=r"proj_hidden=32 in the checkpoint, 64 now"):
        train.main(["--out", str(tmp_path), *FLAGS[:-1][:2], "--proj-hidden", "64", "--proj-dim", "16", "--resume"])


def test_resume_from_an_older_layout_names_what_differs(tmp_path):
    _fake_last_checkpoint(tmp_path, TINY, rename=True)
    with pytest.raises(SystemExit, match=r"do not fit this version's networks .*missing tensors \(e\.g\. nets\.online\."):
        train.main(["--out", str(tmp_path), *FLAGS])


def test_resume_from_a_foreign_checkpoint_is_named(tmp_path):
    atomic_save({"model": torch.zeros(3)}, tmp_path / "last.ckpt")
    with pytest.raises(SystemExit, match="not a byol_nb training checkpoint"):
        train.main(["--out", str(tmp_path), *FLAGS])


def test_resume_without_checkpoint_says_so(tmp_path):
    with pytest.raises(SystemExit, match="does not exist; drop --resume"):
        train.main(["--out", str(tmp_path), *FLAGS])
