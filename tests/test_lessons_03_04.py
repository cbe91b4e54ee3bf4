"""The numbers that lessons 03 and 04 state in their markdown, against the code they describe: the
package's configuration (``byol_nb.config``, ``byol_nb.cli``), its measured lesson times
(``byol_nb.course``) and the flags of the lesson's own code cells. A change to either side that
leaves the text behind fails here, not in a learner's reading."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from byol_nb.cli import DATA_DEFAULTS
from byol_nb.config import TrainConfig
from byol_nb.course import FP32_FACTOR, XEON_SECONDS

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def cells(name: str, kind: str) -> list[str]:
    notebook = json.loads((NOTEBOOKS / name).read_text())
    return ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == kind]


def one_line(text: str) -> str:
    """Markdown with its line breaks as spaces, so a phrase split over two lines still matches."""
    return re.sub(r"\s+", " ", text)


PIXPRO = "03_pixpro_pixel_loss.ipynb"
GATHER = "04_multi_gpu_gather.ipynb"


@pytest.fixture(scope="module")
def pixpro_text() -> str:
    return one_line("\n".join(cells(PIXPRO, "markdown")))


@pytest.fixture(scope="module")
def pixpro_run_cell() -> str:
    [cell] = [c for c in cells(PIXPRO, "code") if "PIXPRO_FLAGS = " in c]
    return cell


def test_03_time_is_the_measured_one(pixpro_text: str):
    minutes = re.search(r"\*\*Time:\*\* about (\d+) minutes on the 2-core CPU with bf16", pixpro_text)
    assert minutes, "03's first cell must state the measured time"
    assert int(minutes.group(1)) == round(XEON_SECONDS["03"] / 60)
    factor = re.search(r"an estimated ([\d.]+) times that on a CPU without bf16", pixpro_text)
    assert factor and float(factor.group(1)) == FP32_FACTOR


def test_03_pixel_constants_are_the_configuration(pixpro_text: str):
    config = TrainConfig()
    assert f"< {config.pixel_threshold}" in pixpro_text  # the positive-pair formula
    assert f"closer than {config.pixel_threshold} cell diagonals" in pixpro_text
    assert re.search(rf"\\gamma = {config.ppm_gamma:g},", pixpro_text)
    assert f"`--instance-weight`, {config.instance_weight:g} by default" in pixpro_text
    assert f"instance loss (weight {config.instance_weight:g}, the default)" in pixpro_text


def test_03_run_described_as_launched(pixpro_text: str, pixpro_run_cell: str):
    steps, batch = re.search(r"(\d+) steps of (\d+) images", pixpro_text).groups()
    assert f"max_steps=L.steps({steps}," in pixpro_run_cell and f"batch_size=L.size({batch}," in pixpro_run_cell
    crop, preset = re.search(r"crops of at least (\d+)% of the image instead of the preset's (\d+)%", pixpro_text).groups()
    assert f"crop_min_scale={int(crop) / 100}" in pixpro_run_cell
    assert DATA_DEFAULTS["shapes"]["crop_min_scale"] == int(preset) / 100
    hidden, default = re.search(r"a projector (\d+) wide inside instead of (\d+)", pixpro_text).groups()
    assert f"proj_hidden=L.size({hidden}," in pixpro_run_cell
    assert "proj_hidden" not in DATA_DEFAULTS["shapes"] and TrainConfig().proj_hidden == int(default)
    assert "**L.data" in pixpro_run_cell and 'method="pixpro"' in pixpro_run_cell
    assert "instance_weight" not in pixpro_run_cell  # the text says the default weight trains


def test_04_time_is_the_measured_one():
    first = one_line(cells(GATHER, "markdown")[0])
    bound = re.search(r"\*\*Time:\*\* under (\d+) seconds on the 2-core CPU", first)
    assert bound, "04's first cell must state the measured time"
    assert XEON_SECONDS["04"] < int(bound.group(1))
