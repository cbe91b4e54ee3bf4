"""Datasets and the Lightning DataModule.

Every dataset here yields ``(image, label)`` with ``image`` a uint8 tensor (3, S, S) and ``label`` an
int (-1 when unlabeled). Images stay uint8 until they reach the training device: the two-view
augmentation runs there, batched (see :mod:`byol_nb.augment`), so the loader only decodes and
resizes. Small datasets are decoded once into one uint8 tensor (``cache``), which removes decoding
from the training loop entirely.

Sources, by the ``--data`` value:

* ``shapes``: the built-in dataset (:mod:`byol_nb.shapes`), generated on first use;
* ``cifar10`` / ``stl10``: torchvision sets, downloaded into ``data/`` (STL-10 trains on its
  unlabeled split);
* any folder: images found recursively; with one sub-folder per class it is also labeled.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from byol_nb import shapes
from byol_nb.devices import limit_threads_after_fork

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
NAMED_DATASETS = ("shapes", "cifar10", "stl10")
DATA_ROOT = Path(__file__).resolve().parent.parent / "data"
# Decode everything up front when the uint8 pixels fit in this many bytes (per process).
DEFAULT_CACHE_BYTES = 2 * 1024**3
CROP_SOURCE_FACTOR = 2  # training images are decoded at this multiple of the view size


class DataError(ValueError):
    """A dataset that cannot be used; the message names the path and the fix."""


class UnreadableImage(Exception):
    """One image file that cannot be decoded (broken, truncated, not an image, too large)."""


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; 16-bit and float images are rescaled, not clipped."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        array = (array - low) / (high - low) * 255 if high > low else np.zeros_like(array)
        image = Image.fromarray(array.astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def load_image(path: str | Path, size: int) -> np.ndarray:
    """Decode ``path`` to a uint8 (size, size, 3) array: the centre square, resized to ``size``.

    Raises :class:`UnreadableImage` for anything PIL cannot fully decode, including decompression
    bombs (images over ``PIL.Image.MAX_IMAGE_PIXELS``), so a caller can skip the file and count it.
    Cropping before resizing keeps the work at size x size pixels whatever the aspect ratio (a
    1 x 100000 strip would otherwise be upscaled to size x 100000 size first).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                image = _to_rgb(image)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, EOFError,
            Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise UnreadableImage(f"{path}: {error}") from error
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side),
                                   reducing_gap=3.0))


def find_images(root: str | Path) -> tuple[list[Path], list[int], list[str]]:
    """Image files under ``root`` (recursive, symlink loops are followed once) and their labels.

    The folder is *labeled* when every image sits under a first-level sub-folder and there are at
    least two such folders: the label is the sub-folder's index in sorted order. Otherwise labels
    are -1 and ``classes`` is empty.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"data path {str(root)!r} does not exist: check the spelling, or pass "
                        f"--data shapes for the built-in dataset")
    if not root.is_dir():
        raise DataError(f"data path {str(root)!r} is a file, not a folder of images")
    files: list[Path] = []
    seen_dirs: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:  # a symlink loop, or a second link to a folder already read
            dirnames.clear()
            continue
        seen_dirs.add(real)
        dirnames.sort()
        files.extend(Path(dirpath) / name for name in sorted(filenames)
                     if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."))
    if not files:
        raise DataError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found under {str(root)!r}: "
                        f"point --data at a folder that holds images, or at their parent folder")
    top_level = [f.relative_to(root).parts for f in files]
    classes = sorted({parts[0] for parts in top_level if len(parts) > 1})
    if len(classes) >= 2 and all(len(parts) > 1 for parts in top_level):
        index = {name: i for i, name in enumerate(classes)}
        return files, [index[parts[0]] for parts in top_level], classes
    return files, [-1] * len(files), []


class ImageFolder(Dataset):
    """A folder of images, robust to the files people really have.

    With ``cache`` (default: when the decoded pixels fit in ``DEFAULT_CACHE_BYTES``) all images
    are decoded once here and unreadable ones are dropped with one warning that counts them.
    Without it, each header is checked here and decoding happens in ``__getitem__``; a file that
    still fails then is replaced by the next readable one (and counted), so an epoch never
    crashes half-way.
    """

    def __init__(self, root: str | Path, image_size: int, cache: bool | None = None) -> None:
        self.root, self.image_size = Path(root), image_size
        files, labels, self.classes = find_images(root)
        if cache is None:
            cache = len(files) * 3 * image_size**2 <= DEFAULT_CACHE_BYTES
        self.skipped: list[str] = []
        self.pixels: torch.Tensor | None = None
        if cache:
            decoded, kept = [], []
            for path, label in zip(files, labels):
                try:
                    decoded.append(load_image(path, image_size))
                    kept.append((path, label))
                except UnreadableImage as error:
                    self.skipped.append(str(error))
            if decoded:
                self.pixels = torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2).contiguous()
        else:
            kept = []
            for path, label in zip(files, labels):
                try:
                    with Image.open(path) as image:
                        image.verify()
                    kept.append((path, label))
                except (OSError, UnidentifiedImageError, ValueError, SyntaxError,
                        Image.DecompressionBombError) as error:
                    self.skipped.append(f"{path}: {error}")
        if self.skipped:
            warnings.warn(f"skipped {len(self.skipped)} unreadable file(s) under {str(root)!r}, "
                          f"for example {self.skipped[0]}", stacklevel=2)
        if not kept:
            raise DataError(f"none of the {len(files)} image file(s) under {str(root)!r} could be read "
                            f"(first error: {self.skipped[0]}); check the files or choose another folder")
        self.files = [path for path, _ in kept]
        self.labels = [label for _, label in kept]
        self.runtime_failures = 0

    @property
    def labeled(self) -> bool:
        return bool(self.classes)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self.pixels is not None:
            return self.pixels[index], self.labels[index]
        for offset in range(len(self.files)):
            i = (index + offset) % len(self.files)
            try:
                array = load_image(self.files[i], self.image_size)
                return torch.from_numpy(array).permute(2, 0, 1).contiguous(), self.labels[i]
            except UnreadableImage as error:
                self.runtime_failures += 1
                warnings.warn(f"replaced unreadable image ({error}); {self.runtime_failures} so far")
        raise DataError(f"no image under {str(self.root)!r} could be decoded")


class TensorImages(Dataset):
    """uint8 images already in memory (torchvision sets), resized once to ``image_size``."""

    def __init__(self, images: np.ndarray, labels: Sequence[int], image_size: int, classes: list[str]) -> None:
        pixels = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
        if pixels.shape[-1] != image_size:
            pixels = torch.nn.functional.interpolate(pixels.float(), size=image_size, mode="bilinear",
                                                     antialias=True, align_corners=False)
            pixels = pixels.round().clamp(0, 255).to(torch.uint8)
        self.pixels, self.labels, self.classes = pixels.contiguous(), list(labels), classes

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.pixels[index], self.labels[index]


def _torchvision_dataset(name: str, split: str, image_size: int, download: bool) -> TensorImages:
    import torchvision

    root = DATA_ROOT / name
    try:
        if name == "cifar10":
            ds = torchvision.datasets.CIFAR10(root, train=split == "train", download=download)
            return TensorImages(ds.data, ds.targets, image_size, list(ds.classes))
        stl_split = {"train": "unlabeled", "labeled-train": "train", "test": "test"}[split]
        ds = torchvision.datasets.STL10(root, split=stl_split, download=download)
        return TensorImages(ds.data.transpose(0, 2, 3, 1), [int(y) for y in ds.labels], image_size,
                            list(ds.classes))
    except RuntimeError as error:  # torchvision's "Dataset not found or corrupted"
        raise DataError(f"{name} is not in {root} and could not be downloaded ({error}); "
                        f"connect to the internet once, or pass a folder of images to --data") from error


@dataclass(frozen=True)
class DataSpec:
    """Where the training images and the labeled monitor split come from."""

    train: str
    val: str | None = None
    monitor_bank: str | None = None  # labeled images whose features the kNN monitor votes with


def resolve_data(data: str, val_data: str | None = None) -> DataSpec:
    """Turn ``--data``/``--val-data`` into concrete sources; named sets bring their own splits."""
    if data == "shapes":
        root = shapes_root()
        return DataSpec(str(root / "train"), val_data or str(root / "test"), str(root / "train"))
    if data == "cifar10":
        return DataSpec("cifar10:train", val_data or "cifar10:test", "cifar10:train")
    if data == "stl10":
        return DataSpec("stl10:train", val_data or "stl10:test", "stl10:labeled-train")
    return DataSpec(data, val_data, data if val_data else None)


def shapes_root() -> Path:
    """Where the built-in dataset lives; BYOL_NB_SHAPES moves it (tests use a temporary folder)."""
    return Path(os.environ.get("BYOL_NB_SHAPES", shapes.DEFAULT_ROOT))


def open_dataset(source: str, image_size: int, download: bool = True) -> Dataset:
    """A dataset for one source: ``name:split`` for torchvision sets, otherwise a folder."""
    name, _, split = source.partition(":")
    if name in ("cifar10", "stl10") and split:
        return _torchvision_dataset(name, split, image_size, download)
    return ImageFolder(source, image_size)


def dataset_labels(dataset: Dataset) -> list[int]:
    return list(getattr(dataset, "labels"))


class ResumableSampler(DistributedSampler):
    """Shuffled training order that a resumed run replays exactly, on one process or many.

    The order of epoch ``e`` is a permutation seeded with ``seed + e`` (nothing else), split across
    processes as :class:`~torch.utils.data.DistributedSampler` does: each rank takes every
    ``num_replicas``-th index, so ranks see different images, and ``set_epoch`` reshuffles. After
    :meth:`start_at` the next pass starts part-way through its epoch, skipping the batches an
    interrupted run already trained on. Being a DistributedSampler, Lightning keeps it under DDP.
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self._resume: tuple[int, int] | None = None

    def start_at(self, epoch: int, skip: int) -> None:
        """Make the next pass over ``epoch`` begin after its first ``skip`` samples (of this rank)."""
        self.set_epoch(epoch)
        self._resume = (epoch, skip)

    def __iter__(self):
        indices = list(super().__iter__())
        if self._resume is not None and self._resume[0] == self.epoch:
            indices = indices[self._resume[1]:]
        self._resume = None
        return iter(indices)


class SSLDataModule(pl.LightningDataModule):
    """Training images (labels ignored) plus, optionally, a labeled bank and queries for kNN.

    Datasets are built in :meth:`setup`, inside each process, so that ``ddp_notebook`` and spawned
    launches never pickle pixel tensors across processes.
    """

    def __init__(self, data: str, val_data: str | None, image_size: int, batch_size: int,
                 num_workers: int = 0, monitor_size: int = 2000, seed: int = 0) -> None:
        super().__init__()
        self.spec = resolve_data(data, val_data)
        self.image_size, self.batch_size = image_size, batch_size
        self.num_workers, self.monitor_size, self.seed = num_workers, monitor_size, seed
        self.train_set: Dataset | None = None
        self.bank_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def prepare_data(self) -> None:
        if self.spec.train == str(shapes_root() / "train"):
            shapes.ensure_shapes(shapes_root())

    @property
    def crop_source_size(self) -> int:
        """The side training images are decoded at: twice the view size for image folders.

        Views are random crops (often a third of the image or less) resized to ``image_size``. Cut
        from images already shrunk to ``image_size`` they are upsampled and blurred; torchvision's
        RandomResizedCrop cuts them from the original instead. Twice the view size keeps crops of
        down to a quarter of the area sharp, for 4x the decoded pixels (the cache limit still
        applies). Named torchvision sets keep their native size: they have no more detail.
        """
        name, _, split = self.spec.train.partition(":")
        return self.image_size if name in ("cifar10", "stl10") and split else CROP_SOURCE_FACTOR * self.image_size

    def setup(self, stage: str | None = None) -> None:
        limit_threads_after_fork()  # the first CPU work in a ddp_notebook worker happens here
        if self.train_set is not None:
            return
        self.train_set = open_dataset(self.spec.train, self.crop_source_size)
        if self.spec.val is not None:
            self.val_set = open_dataset(self.spec.val, self.image_size)
            bank = open_dataset(self.spec.monitor_bank, self.image_size) if self.spec.monitor_bank else None
            labels_ok = bank is not None and min(dataset_labels(bank)) >= 0 and min(dataset_labels(self.val_set)) >= 0
            if not labels_ok:
                raise DataError(f"--val-data {self.spec.val!r} and the training data need one sub-folder "
                                f"per class for the kNN monitor; leave --val-data out for unlabeled data")
            self.bank_set = _subset(bank, self.monitor_size)
            self.val_set = _subset(self.val_set, self.monitor_size)
        world = self.trainer.world_size if self.trainer is not None else 1
        if len(self.train_set) // world < self.batch_size:
            split = f", split over {world} processes," if world > 1 else ","
            raise DataError(f"{self.spec.train!r} has {len(self.train_set)} usable image(s){split} fewer than one "
                            f"batch of {self.batch_size} per process; lower --batch-size or add images")

    def train_dataloader(self) -> DataLoader:
        """Batches in :class:`ResumableSampler` order, starting where the run's global step says.

        One optimizer step consumes one batch, so a run resumed at global step ``k`` continues
        with batch ``k % steps_per_epoch`` of epoch ``k // steps_per_epoch``, as if never stopped.
        """
        trainer = self.trainer
        world, rank, step = (trainer.world_size, trainer.global_rank, trainer.global_step) if trainer else (1, 0, 0)
        sampler = ResumableSampler(self.train_set, num_replicas=world, rank=rank, seed=self.seed)
        epoch, batch = divmod(step, len(sampler) // self.batch_size)
        sampler.start_at(epoch, batch * self.batch_size)
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler, drop_last=True,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          pin_memory=self.trainer is not None and self.trainer.strategy.root_device.type == "cuda")

    def val_dataloader(self) -> list[DataLoader]:
        if self.val_set is None:
            return []
        return [DataLoader(ds, batch_size=256, shuffle=False, num_workers=self.num_workers)
                for ds in (self.bank_set, self.val_set)]


def _subset(dataset: Dataset, size: int) -> Dataset:
    """An evenly spaced, deterministic subset (keeps every class of a sorted folder)."""
    if len(dataset) <= size:
        return dataset
    indices = np.linspace(0, len(dataset) - 1, size).round().astype(int).tolist()
    subset = torch.utils.data.Subset(dataset, indices)
    subset.labels = [dataset_labels(dataset)[i] for i in indices]  # type: ignore[attr-defined]
    return subset
