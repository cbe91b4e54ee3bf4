"""The numbers that lessons 00-02 state in their markdown agree with the code they describe: the
lesson times with ``byol_nb.course.expected_times``, the recipe values with ``byol_nb.cli`` and
``byol_nb.config``. (Numbers a lesson prints come from the code already; these are the ones its
text must state before any cell runs.)"""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import pytest
import torch

from byol_nb import course
from byol_nb.augment import AugmentConfig, blur_sigma
from byol_nb.cli import DATA_DEFAULTS
from byol_nb.config import LOCAL_MIN_SCALE, TrainConfig
from byol_nb.metrics import knn_top1

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def markdown(name: str) -> list[str]:
    cells = json.loads(next(NOTEBOOKS.glob(f"{name}_*.ipynb")).read_text())["cells"]
    return ["".join(c["source"]) for c in cells if c["cell_type"] == "markdown"]


def number(pattern: str, text: str) -> float:
    found = re.search(pattern, re.sub(r"\s+", " ", text))
    assert found, f"the lesson no longer says {pattern!r}: update this test with it"
    return float(found.group(1))


def seconds_on_a_cpu(lesson: str, bf16: bool, monkeypatch: pytest.MonkeyPatch) -> float:
    monkeypatch.setattr(course, "cpu_has_bf16", lambda: bf16)
    seconds, _ = course.expected_times(torch.device("cpu"))[lesson]
    return seconds


@pytest.mark.parametrize("lesson", ["00", "01"])
def test_lessons_without_training_state_a_bound_that_holds_with_and_without_bf16(lesson, monkeypatch):
    bound = number(r"\*\*Time:\*\* under (\d+) seconds on a 2-core CPU, with or without bf16", markdown(lesson)[0])
    for bf16 in (True, False):
        assert seconds_on_a_cpu(lesson, bf16, monkeypatch) < bound


def test_lesson_02_states_its_measured_and_its_estimated_time(monkeypatch):
    header = markdown("02")[0]
    with_bf16 = number(r"about (\d+) minutes where it has bf16 instructions", header)
    without = number(r"an estimated (\d+) minutes without", header)
    assert round(seconds_on_a_cpu("02", True, monkeypatch) / 60) == with_bf16
    assert round(seconds_on_a_cpu("02", False, monkeypatch) / 60) == without


def jitter_flags(text: str) -> list[tuple[float, ...]]:
    return [tuple(float(v) for v in found.split()) for found in re.findall(r"--jitter ((?:[\d.]+ ?){4})`", text)]


@pytest.mark.parametrize("lesson", ["00", "01"])
def test_the_shapes_jitter_quoted_is_the_presets(lesson):
    quoted = [flags for text in markdown(lesson) for flags in jitter_flags(re.sub(r"\s+", " ", text))]
    assert quoted, f"lesson {lesson} no longer quotes --jitter: update this test"
    assert all(flags == tuple(DATA_DEFAULTS["shapes"]["jitter"]) for flags in quoted)


def test_lesson_01_blur_and_crop_values():
    text = " ".join(markdown("01"))
    assert number(r"training blurs by at most ([\d.]+) px", text) == round(blur_sigma(32)[1], 2)
    assert number(r"the paper's 224-pixel range \(up to ([\d.]+) px\)", text) == blur_sigma(224)[1]
    assert number(r"BYOL's paper uses \$s_\\min = ([\d.]+)\$ \(shown here\)", text) == AugmentConfig(32).crop_scale[0]


def test_lesson_00_image_size_default():
    text = " ".join(markdown("00"))
    assert number(r"`--image-size`, (\d+) by default", text) == TrainConfig().image_size


def test_lesson_02_knn_and_multi_crop_values():
    text = " ".join(markdown("02"))
    assert number(r"vote of its (\d+) nearest training images", text) == \
        inspect.signature(knn_top1).parameters["k"].default
    assert number(r"uses one \(`--local-views (\d+)`\)", text) == DATA_DEFAULTS["shapes"]["local_views"] == 1
    assert number(r"\(from (\d+)% of the image up to the main views' smallest crop\)", text) / 100 == LOCAL_MIN_SCALE
