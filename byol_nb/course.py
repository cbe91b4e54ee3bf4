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
  show them; without it they use the CIFAR-10 subset in ``data/cifar10-subset``, which
  :func:`make_photos` builds from torchvision's download (or extracts from ``BYOL_NB_PHOTOS_TAR``),
  and without that the built-in data.
* ``BYOL_NB_DEVICE`` picks the device every lesson trains and probes on (``L.device``; default: the
  first GPU when there is one, else the CPU).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tarfile
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import torch

from byol_nb.devices import cpu_has_bf16
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
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where lessons train and probe

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
        """A folder of real photos with one sub-folder per class and a ``train``/``test`` split, or
        None: ``BYOL_NB_PHOTOS``, else the CIFAR-10 subset in ``data/`` (extracted from
        ``BYOL_NB_PHOTOS_TAR`` when that archive is given and the folder is missing)."""
        folder = os.environ.get("BYOL_NB_PHOTOS")
        if folder:
            return Path(folder).expanduser()
        archive = os.environ.get("BYOL_NB_PHOTOS_TAR")
        if archive and not (PHOTOS / "test").is_dir() and Path(archive).is_file():
            with tarfile.open(archive) as tar:  # a local archive: no download
                tar.extractall(DATA, filter="data")
        return PHOTOS if (PHOTOS / "test").is_dir() else None

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def per_device(self, cpu: T, gpu: T) -> T:
        """``gpu`` when the lesson runs on a GPU (more steps, bigger batches where they make a point
        clearer), else ``cpu``; under FAST=1 the CPU's value is what ``size``/``steps`` shrink."""
        return gpu if self.on_gpu else cpu


# The CIFAR-10 subset the lessons train on when no other photos are named: 1,000 training and 200 test
# images per class, 32 x 32 JPEGs in class folders.
PHOTOS = DATA / "cifar10-subset"


def make_photos(train_per_class: int = 1000, test_per_class: int = 200, root: Path = PHOTOS) -> Path:
    """Build the CIFAR-10 subset in ``root`` from torchvision's CIFAR-10 (one download of 163 MB into
    ``data/cifar10``, see :func:`byol_nb.datasets.download`): the first ``train_per_class`` training
    and ``test_per_class`` test images of each class, as JPEG files in class folders. Written to a
    temporary folder renamed into place; a subset already there is kept. Raises
    :class:`~byol_nb.images.DataError` without network, naming the archive and where to put it."""
    import torchvision
    from PIL import Image

    from byol_nb.datasets import download

    if (root / "test").is_dir():
        return root
    cifar = download("cifar10")
    partial = root.with_name(f".{root.name}.{uuid.uuid4().hex}.partial")
    try:
        for split, per_class in (("train", train_per_class), ("test", test_per_class)):
            data = torchvision.datasets.CIFAR10(cifar, train=split == "train")
            written = dict.fromkeys(range(len(data.classes)), 0)
            for pixels, label in zip(data.data, data.targets):
                if written[label] < per_class:
                    folder = partial / split / data.classes[label]
                    folder.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(pixels).save(folder / f"{written[label]:04d}.jpg", quality=95)
                    written[label] += 1
        os.replace(partial, root)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return root


def course_device() -> torch.device:
    """``BYOL_NB_DEVICE``, else the first GPU when there is one (asked through NVML: the kernel's
    CUDA stays uninitialised, see :mod:`byol_nb.devices`), else the CPU."""
    chosen = os.environ.get("BYOL_NB_DEVICE")
    if chosen:
        return torch.device(chosen)
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


# Each lesson's first run in full mode (Restart and Run All, headless, nothing cached), in seconds, on
# the 2-core Intel Xeon with bf16 instructions that BENCHMARKS.md describes (its section "The lessons'
# own runs", which says how 06's figure was completed).
XEON_SECONDS = {"00": 28, "01": 14, "02": 132, "03": 598, "04": 8, "05": 1007, "06": 2400}
# Without bf16 instructions (fp32), the training of make train took 3.4 times as long on the AMD EPYC
# (BENCHMARKS.md); lessons that train scale alike, the others hardly at all.
FP32_FACTOR = 3.4
TRAINING_LESSONS = ("02", "03", "05", "06")


def expected_times(device: torch.device) -> dict[str, tuple[float, str]]:
    """Each lesson's first-run time on a machine like this one, in seconds, and what the number is:
    measured (the Xeon), or an estimate scaled from it (a CPU without bf16 instructions) or not
    known yet (a GPU: the course has not been timed on one)."""
    if device.type == "cuda":
        return {name: (seconds, "not measured on a GPU yet: the CPU's time, an upper bound")
                for name, seconds in XEON_SECONDS.items()}
    if cpu_has_bf16():
        return {name: (seconds, "measured on a 2-core Xeon with bf16") for name, seconds in XEON_SECONDS.items()}
    return {name: (seconds * (FP32_FACTOR if name in TRAINING_LESSONS else 1), "estimate: fp32, 3.4x the Xeon")
            for name, seconds in XEON_SECONDS.items()}


@contextlib.contextmanager
def quiet_lightning(log: Path) -> Iterator[None]:
    """Lightning run inside the kernel (``ddp_notebook``) with its info lines and warnings written to
    ``log`` instead of the cell, as ``byol_nb.launch`` keeps a launched run's output in its log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log, mode="w")
    loggers = [logging.getLogger(name) for name in ("pytorch_lightning", "lightning_fabric", "lightning")]
    saved = [(logger.handlers[:], logger.propagate) for logger in loggers]
    for logger in loggers:
        logger.handlers, logger.propagate = [handler], False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            for logger, (handlers, propagate) in zip(loggers, saved):
                logger.handlers, logger.propagate = handlers, propagate
            handler.close()


def lesson() -> Lesson:
    """Read the environment, write the built-in dataset if needed (500 training and 100 test images
    per class at 64 px; 8 and 4 at 32 px with FAST=1), and say what was set up."""
    fast = os.environ.get("FAST", "0") == "1"
    runs = Path(os.environ.get("BYOL_NB_RUNS", REPO / "runs" / ("fast" if fast else "course")))
    shapes = (generate_shapes(DATA / "shapes-fast", train_per_class=8, test_per_class=4, size=32) if fast
              else generate_shapes(DATA / "shapes"))
    os.environ["BYOL_NB_SHAPES"] = str(shapes)  # --data shapes, in this kernel and the runs it launches
    cap = os.environ.get("BYOL_NB_MAX_STEPS")
    setup = Lesson(fast=fast, runs=runs, shapes=shapes, max_steps=int(cap) if cap else None, device=course_device())
    mode = "FAST (tiny data, a few steps)" if fast else "full"
    print(f"mode: {mode}{f', at most {cap} steps per run' if cap else ''}; device: {setup.device}; runs in {runs}; "
          f"data in {shapes}")
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
