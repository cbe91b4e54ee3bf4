"""The numbers that lessons 05 and 06 state in their markdown agree with the configuration, the lessons'
own code and the libraries they quote. Reading the notebooks' JSON only (no kernel, no training): fast.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from unittest import mock

import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
REPO = NOTEBOOKS.parent


def cells(name: str, kind: str) -> list[str]:
    notebook = json.loads((NOTEBOOKS / name).read_text())
    return ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == kind]


def markdown(name: str) -> str:
    """The lesson's markdown, every run of white space (line breaks included) as one space."""
    return " ".join(" ".join(cells(name, "markdown")).split())


def code(name: str) -> str:
    return "\n".join(cells(name, "code"))


LESSON_05, LESSON_06 = "05_train_ddp.ipynb", "06_evaluate_and_visualize.ipynb"


def test_05_quotes_lightnings_refusal_of_ddp_in_a_notebook_word_for_word():
    pl = pytest.importorskip("pytorch_lightning")
    from pytorch_lightning.trainer.connectors import accelerator_connector
    from pytorch_lightning.utilities.exceptions import MisconfigurationException

    quoted = re.search(r"> (`Trainer\(strategy='ddp'\)`.*?worker function\.)", markdown(LESSON_05))
    assert quoted, "lesson 05 no longer quotes Lightning's message"
    quote = quoted.group(1).replace(" > ", " ")
    with mock.patch.object(accelerator_connector, "_IS_INTERACTIVE", True), \
            pytest.raises(MisconfigurationException) as refused:
        pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
    assert quote.replace("`", "") == str(refused.value).replace("`", "")


def test_05_gpu_plan_in_markdown_follows_the_cifar10_preset():
    from byol_nb.cli import DATA_DEFAULTS

    preset, text = DATA_DEFAULTS["cifar10"], markdown(LESSON_05)
    # "50 epochs per GPU, at most the recipe's 200", as the lesson's cifar10_run computes it
    assert "50 * gpus" in code(LESSON_05) and "50 epochs per GPU, at most the recipe's 200" in text
    assert preset["max_epochs"] == 200
    gpus = 8
    epochs = min(preset["max_epochs"], 50 * gpus)
    steps = epochs * (50_000 // gpus // preset["batch_size"])
    assert f"global batch of {gpus * preset['batch_size']:,}" in text
    assert f"about {round(steps, -2):,} steps" in text
    assert f"{epochs} epochs at a global batch" in text


def test_05_single_process_speed_is_the_one_benchmarks_records():
    number = re.search(r"make train in \"\s*f\"one process: (\d+) images/s, measured on a 2-core Xeon", code(LESSON_05))
    assert number, "lesson 05 no longer prints make train's one-process speed"
    assert f"{number.group(1)} images/s" in (REPO / "BENCHMARKS.md").read_text()


def test_06_markdown_run_lengths_match_its_code():
    text, source = markdown(LESSON_06), code(LESSON_06)
    assert "max_steps=L.steps(500, 3), batch_size=L.size(128, 8)" in source  # PHOTO_RECIPE
    assert "500 steps of 128 photos" in text and "64,000 photos" in text and 500 * 128 == 64_000
    assert "max_steps=L.steps(400, 3)" in source and "(400 steps each" in text  # lesson 03's settings


def test_06_names_the_package_function_that_builds_the_photos():
    from byol_nb import course

    assert "byol_nb.course.make_photos()" in markdown(LESSON_06) and callable(course.make_photos)
    assert "L.photos()" in markdown(LESSON_06) and "photos = L.photos()" in code(LESSON_06)


def test_05_lars_in_the_settings_table_is_the_optimizers():
    import torch

    from byol_nb.optim import lars_updates

    source = code(LESSON_05)
    assert "η‖w‖ / ‖g + λw‖" in source and "clipped: each layer's rate at most the global one" in source
    torch.manual_seed(0)
    w, wd, eta, lr = torch.randn(4, 3, dtype=torch.float64), 1e-5, 0.02, 0.5
    g = torch.randn(4, 3, dtype=torch.float64)
    d = g + wd * w
    ratio = eta * w.norm() / d.norm()  # the table's formula
    weight = torch.nn.Parameter(w.clone())
    weight.grad = g.clone()
    (update,) = lars_updates([weight], wd, eta)
    assert torch.allclose(update, d * ratio)
    (clipped,) = lars_updates([weight], wd, eta, clip_lr=lr)  # the step is lr * clipped: rate min(lr * ..., lr)
    assert torch.allclose(lr * clipped, d * torch.clamp(ratio, max=lr))
    assert ratio < lr  # the case the clip leaves alone; and one where it binds:
    (bound,) = lars_updates([weight], wd, eta, clip_lr=ratio.item() / 2)
    assert torch.allclose(bound, d)


def test_05_built_in_run_is_make_trains_schedule():
    import inspect

    from byol_nb.cli import DATA_DEFAULTS
    from byol_nb.config import TrainConfig
    from byol_nb.shapes import SHAPE_CLASSES, generate_shapes

    source, text = code(LESSON_05), markdown(LESSON_05)
    assert "--data shapes" in (REPO / "Makefile").read_text() and "the recipe and schedule of `make train`" in text
    train_images = len(SHAPE_CLASSES) * inspect.signature(generate_shapes).parameters["train_per_class"].default
    config = TrainConfig()
    steps = DATA_DEFAULTS["shapes"]["max_epochs"] * (train_images // config.batch_size)
    assert f"max_steps=L.steps({steps}, 4)" in source and f"{steps} steps of a global batch of {config.batch_size}" in source
    assert f"batch_size=L.size({config.batch_size}, 16) // HARDWARE[\"devices\"]" in source
    assert f"proj_hidden=L.size({config.proj_hidden}, 64)" in source


def test_05_and_06_quote_the_courses_knn():
    import inspect

    from byol_nb.metrics import knn_classify, knn_top1

    k = inspect.signature(knn_top1).parameters["k"].default
    temperature = inspect.signature(knn_classify).parameters["temperature"].default
    assert k == inspect.signature(knn_classify).parameters["k"].default
    assert f"the course's kNN uses k = {k}" in markdown(LESSON_05)
    text = markdown(LESSON_06)
    assert f"its $k = {k}$ most similar training images" in text and f"$e^{{\\text{{sim}}/{temperature:g}}}$" in text
    assert f"where the course's kNN uses k = {k}" in text


def test_06_numbers_from_benchmarks_are_benchmarks():
    text, benchmarks = markdown(LESSON_06), (REPO / "BENCHMARKS.md").read_text()
    # instance-only vs PixPro under 06's probes
    assert "kNN 37.2% for BYOL and 38.8% for PixPro against 34.2%, mIoU 21.9 and 23.9 against 18.1" in text
    assert "06's probes | 37.2 / 34.2 | 21.9 / 18.1 |" in benchmarks
    assert "06's probes | 38.8 / 34.2 | 23.9 / 18.1 |" in benchmarks
    # the real-photo run
    assert "this run took 16 min 41 s and ended at 31.4% kNN against 30.1%" in text
    assert "(lesson 06's run) | 64,000 | 16 min 41 s | **31.4 / 30.1** |" in benchmarks
    assert "\"the full run: 16 min 41 s on a 2-core Xeon with bf16, measured\"" in code(LESSON_06)


def test_06_photo_subset_and_epochs_follow_make_photos():
    import inspect

    from byol_nb import course

    per_class = inspect.signature(course.make_photos).parameters["train_per_class"].default
    subset, seen = 10 * per_class, 500 * 128  # CIFAR-10's ten classes; PHOTO_RECIPE's steps and batch
    text = markdown(LESSON_06)
    assert f"{seen / subset:.1f} passes over the subset's {subset:,} training photos" in text
    assert f"{seen / 50_000:.1f} epochs of CIFAR-10's 50,000" in text


def test_06_label_draws_in_the_text_are_the_codes():
    text, source = markdown(LESSON_06), code(LESSON_06)
    assert "DRAWS = L.size(5, 2)" in source and "drawn five times at random (`byol_nb.metrics.label_draws`; FAST: twice)" in text
    assert "draws=L.per_device(2, DRAWS)" in source and "on a CPU it gets only the first two (on a GPU all of them)" in text
    assert "linear_probe_by_labels(*f, BUDGETS, draws=DRAWS)" in source
    assert "label_draws(features[\"random init\"][1], BUDGETS, draws=DRAWS)" in source  # the probes' draws
    assert "supervised_top1(train, test, index," in source and "per_class=" not in source
    assert "viz.plot_embeddings(" in source
