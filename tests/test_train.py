"""End to end on CPU: the training command, the exported backbone and the evaluation command."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

import byol_nb
from byol_nb import train
from byol_nb.config import TrainConfig
from byol_nb.metrics import knn_top1, linear_probe_top1
from byol_nb.module import BYOLModule
from byol_nb.run_logs import metrics_files

TINY = ["--image-size", "32", "--batch-size", "16", "--proj-hidden", "64", "--no-progress"]


@pytest.fixture(scope="module")
def trained_run(tiny_shapes, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    code = train.main(["--data", str(tiny_shapes / "train"), "--val-data", str(tiny_shapes / "test"),
                       "--max-steps", "4", "--out", str(out), "--accelerator", "cpu", "--local-views", "2", *TINY])
    assert code == 0
    return out


@pytest.mark.slow
def test_training_writes_checkpoint_backbone_and_metrics(trained_run):
    for name in ("last.ckpt", "backbone.pt", "metrics.json", "curves.png"):
        assert (trained_run / name).is_file(), name
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert metrics["global_step"] == 4
    assert metrics["images_per_second"] > 0 and metrics["wall_time_s"] > 0
    assert 0 <= metrics["knn_top1"] <= 100 and 0 <= metrics["knn_top1_random_init"] <= 100
    assert metrics["final_loss"] is not None and 0 <= metrics["final_loss"] <= 8


@pytest.mark.slow
def test_load_backbone_gives_pooled_and_dense_features(trained_run):
    images = byol_nb.augment.normalize(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    pooled = byol_nb.load_backbone(trained_run / "backbone.pt")(images)  # the name users call
    dense = byol_nb.load_backbone(trained_run / "backbone.pt", dense=True)(images)
    assert pooled.shape == (2, 512)
    assert dense.shape == (2, 512, 1, 1)
    torch.testing.assert_close(dense.mean(dim=(2, 3)), pooled)


@pytest.mark.slow
def test_exported_backbone_is_made_of_torch_and_torchvision_modules_only(trained_run):
    """Trained on the CPU (whose speed-ups swap classes into the convolutions), the file still
    loads as plain library modules that anyone can use without byol_nb."""
    for dense in (False, True):
        network = byol_nb.load_backbone(trained_run / "backbone.pt", dense=dense)
        kinds = {type(module).__module__.split(".")[0] for module in network.modules()}
        assert kinds <= {"torch", "torchvision"}, kinds


@pytest.mark.slow
def test_evaluate_command_prints_one_json_line(trained_run, tiny_shapes):
    result = subprocess.run(
        [sys.executable, "-m", "byol_nb.evaluate", "--backbone", str(trained_run / "backbone.pt"),
         "--train", str(tiny_shapes / "train"), "--test", str(tiny_shapes / "test"), "--task", "knn"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert line["task"] == "knn" and 0 <= line["top1"] <= 100


def test_knn_top1_votes_with_nearest_neighbours():
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 0, 1, 1])
    queries = torch.tensor([[1.0, 0.05], [0.05, 1.0]])
    assert knn_top1(bank, labels, queries, torch.tensor([0, 1]), k=2) == 100.0
    assert knn_top1(bank, labels, queries, torch.tensor([1, 0]), k=2) == 0.0


def test_linear_probe_separates_separable_features():
    torch.manual_seed(0)
    x = torch.randn(200, 8)
    y = (x[:, 0] > 0).long()
    assert linear_probe_top1(x[:150], y[:150], x[150:], y[150:]) > 90


def test_unknown_path_stops_with_a_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        train.cli(["--data", str(tmp_path / "nowhere"), "--max-steps", "1", "--out", str(tmp_path / "o")])
    assert "does not exist" in str(stop.value)


def test_training_crops_come_from_twice_the_view_size(tiny_shapes):
    """Views are cut from images decoded at 2x the view size (sharp crops); the kNN monitor's
    images, which are not cropped, stay at the view size."""
    from byol_nb.datamodule import SSLDataModule

    datamodule = SSLDataModule(str(tiny_shapes / "train"), str(tiny_shapes / "test"), 16, batch_size=8)
    datamodule.setup()
    assert datamodule.train_set[0][0].shape == (3, 32, 32)
    assert datamodule.val_set[0][0].shape == datamodule.bank_set[0][0].shape == (3, 16, 16)
    assert SSLDataModule("cifar10", None, 32, batch_size=8).crop_source_size == 32  # no detail to gain


@pytest.mark.slow
@pytest.mark.parametrize("flags, monitored_epochs", [
    (["--max-epochs", "4", "--knn-every-n-epochs", "2"], [1, 3]),
    (["--max-epochs", "2"], [1]),  # the default (every 5) shrinks to the run's length: still monitored
])
def test_knn_monitor_runs_every_n_epochs(tiny_shapes, tmp_path, flags, monitored_epochs):
    code = train.main(["--data", str(tiny_shapes / "train"), "--val-data", str(tiny_shapes / "test"),
                       "--out", str(tmp_path), "--accelerator", "cpu", *flags, *TINY])
    assert code == 0
    (log,) = metrics_files(tmp_path)
    with open(log, newline="") as f:
        epochs = sorted({int(row["epoch"]) for row in csv.DictReader(f) if row.get("knn_top1")})
    assert epochs == monitored_epochs
    assert (tmp_path / "best.ckpt").is_file()


def test_the_module_trains_by_epochs_on_a_plain_dataloader():
    """BYOLModule needs no DataModule: the run's length, warmup (here in epochs) and schedules come
    from its configuration and the loader the trainer was given."""
    images = torch.randint(0, 256, (32, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(images, torch.zeros(32, dtype=torch.long)), batch_size=8, shuffle=True,
                        drop_last=True)
    config = TrainConfig(image_size=16, batch_size=8, proj_hidden=32, proj_dim=16, warmup_epochs=1.0)
    module = BYOLModule(config)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader)
    assert trainer.global_step == 12 and module.steps_per_epoch() == 4 and module.total_steps() == 12
    # the warmup of one epoch (4 steps) is capped at a tenth of the run: 1 step; the cosine ends at 0
    peak = module.peak_learning_rate()
    assert module.learning_rate(0) == pytest.approx(peak) and module.learning_rate(12) == pytest.approx(0)
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(module.learning_rate(11)) and 0 < lr < peak
