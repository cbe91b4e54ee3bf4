"""The set-up every lesson runs in its first code cell (``L = lesson()``), and the check of its
exercises (:func:`check`).

One place decides where the lessons' runs and data go and how big they are:

* ``FAST=1`` (what CI uses) shrinks every lesson: a tiny built-in dataset, few steps, narrow heads.
  It changes sizes only, never which code runs or which flags are passed: a lesson asks for each
  size with ``L.size(full, fast)`` and for each training length with ``L.steps(full, fast)``.
* ``BYOL_NB_RUNS`` moves the trained runs (default: ``runs/course``, ``runs/fast`` with FAST), and
  ``--data shapes`` means the lesson's dataset (``BYOL_NB_SHAPES``, set here).
* ``BYOL_NB_MAX_STEPS`` caps every training length in full mode: the test of the full course runs
  each lesson's full-size code path through every training and launch call, briefly.
* ``BYOL_NB_PHOTOS`` names a folder of real photos (one sub-folder per class) for the lessons that
  show them (lesson 00 extracts the CIFAR-10 subset there when given the archive,
  ``BYOL_NB_PHOTOS_TAR``); without it those sections show the built-in data.
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

import torch

from byol_nb.paths import DATA, REPO
from byol_nb.shapes import generate_shapes

T = TypeVar("T")


@dataclass(frozen=True)
class Lesson:
    """Where a lesson's files go and how big its runs are."""

    fast: bool
    runs: Path  # trained runs, cached between sessions (delete a run's folder to train it again)
    shapes: Path  # the built-in dataset: ROOT/train/<class>, ROOT/test/<class>, ROOT/masks/...
    max_steps: int | None = None  # cap on every training length (the full-course test)

    def size(self, full: T, fast: T) -> T:
        """``full`` normally, ``fast`` under FAST=1: data sizes, widths, batch sizes."""
        return fast if self.fast else full

    def steps(self, full: int, fast: int) -> int:
        """A training length: ``full`` (capped by BYOL_NB_MAX_STEPS when set), ``fast`` under FAST=1."""
        if self.fast:
            return fast
        return full if self.max_steps is None else min(full, self.max_steps)

    @property
    def data(self) -> dict[str, str]:
        """The built-in dataset as ``python -m byol_nb.train`` options: ``--data shapes``, which
        brings its labeled test split for the kNN monitor and its recipe (``DATA_DEFAULTS``);
        :func:`lesson` points it at this lesson's dataset (``BYOL_NB_SHAPES``)."""
        return {"data": "shapes"}

    def photos(self) -> Path | None:
        """A folder of real photos with one sub-folder per class (its ``test`` split when it has one),
        or None: ``BYOL_NB_PHOTOS``, or the CIFAR-10 subset extracted from ``BYOL_NB_PHOTOS_TAR``
        into ``data/``."""
        folder = os.environ.get("BYOL_NB_PHOTOS")
        if folder:
            return Path(folder).expanduser()
        archive = os.environ.get("BYOL_NB_PHOTOS_TAR")
        subset = DATA / "cifar10-subset"
        if archive and not (subset / "test").is_dir() and Path(archive).is_file():
            with tarfile.open(archive) as tar:  # a local archive: no download
                tar.extractall(DATA, filter="data")
        return subset if (subset / "test").is_dir() else None


def lesson() -> Lesson:
    """Read the environment, write the built-in dataset if needed (500 training and 100 test images
    per class at 64 px; 8 and 4 at 32 px with FAST=1), and say what was set up."""
    fast = os.environ.get("FAST", "0") == "1"
    runs = Path(os.environ.get("BYOL_NB_RUNS", REPO / "runs" / ("fast" if fast else "course")))
    shapes = (generate_shapes(DATA / "shapes-fast", train_per_class=8, test_per_class=4, size=32) if fast
              else generate_shapes(DATA / "shapes"))
    os.environ["BYOL_NB_SHAPES"] = str(shapes)  # --data shapes, in this kernel and the runs it launches
    cap = os.environ.get("BYOL_NB_MAX_STEPS")
    setup = Lesson(fast=fast, runs=runs, shapes=shapes, max_steps=int(cap) if cap else None)
    mode = "FAST (tiny data, a few steps)" if fast else "full"
    print(f"mode: {mode}{f', at most {cap} steps per run' if cap else ''}; runs in {runs}; data in {shapes}")
    return setup


class NotAnswered(Exception):
    """Raised by an exercise's placeholder until the learner writes their answer."""


def check(answer: Callable[[], object], expected: object, tolerance: float = 1e-6) -> bool:
    """An exercise's check cell: runs ``answer()`` (the learner's code) and says whether it gives
    ``expected``, never what ``expected`` is (solutions sit in a collapsed block under the exercise).

    Numbers match within ``tolerance``, tensors element by element, anything else by ``==``.
    """
    try:
        got = answer()
    except NotAnswered:
        print("not answered yet: write your code in the exercise cell, then run it and this cell again")
        return False
    if isinstance(expected, torch.Tensor):
        right = isinstance(got, torch.Tensor) and got.shape == expected.shape and torch.allclose(
            got.float(), expected.float(), atol=tolerance, rtol=0)
    elif isinstance(expected, (int, float)) and isinstance(got, (int, float)):
        right = abs(got - expected) <= tolerance
    else:
        right = got == expected
    print("correct!" if right else "not yet: compare your steps with the lesson's cells above and try again")
    return bool(right)
