"""Datasets and the Lightning DataModule.

Every dataset here yields ``(image, label)`` with ``image`` a uint8 tensor (3, S, S) and ``label`` an
int (-1 when unlabeled). Images stay uint8 until they reach the training device: the two-view
augmentation runs there, batched (see :mod:`byol_nb.augment`), so the loader only decodes and
resizes. Datasets that fit are decoded once into one uint8 array that every process of the machine
shares (:mod:`byol_nb.disk_cache`), which removes decoding from the training loop entirely; larger
folders are decoded in the DataLoader's worker processes (:func:`loader_workers`).

Sources, by the ``--data`` value:

* ``shapes``: the built-in dataset (:mod:`byol_nb.shapes`), generated on first use;
* ``cifar10`` / ``stl10``: torchvision sets, downloaded into ``data/`` (STL-10 trains on its
  unlabeled split);
* any folder: images found recursively; with one sub-folder per class it is also labeled.
"""

from __future__ import annotations

import math
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
from byol_nb.disk_cache import cached_array, file_stamps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
NAMED_DATASETS = ("shapes", "cifar10", "stl10")
DATA_ROOT = Path(__file__).resolve().parent.parent / "data"
# Decode a folder once into the shared disk cache when its uint8 pixels fit in this many bytes;
# larger folders are decoded batch by batch in the DataLoader's workers.
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


def _open_rgb(path: str | Path, size: int, whole: bool = False) -> Image.Image:
    """Decode ``path`` to 8-bit RGB, JPEGs at the smallest of 1, 1/2, 1/4 or 1/8 scale that keeps
    the short side (``whole``: the long side) at least ``size``.

    Raises :class:`UnreadableImage` for anything PIL cannot fully decode, including decompression
    bombs (images over ``PIL.Image.MAX_IMAGE_PIXELS``), so a caller can skip the file and count it.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                scale = size / (max(image.size) if whole else min(image.size))
                image.draft("RGB", (math.ceil(image.width * scale), math.ceil(image.height * scale)))
                image.load()
                return _to_rgb(image)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, EOFError,
            Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise UnreadableImage(f"{path}: {error}") from error


def load_image(path: str | Path, size: int) -> np.ndarray:
    """Decode ``path`` to a uint8 (size, size, 3) array: the centre square, resized to ``size``
    (how evaluation sees a photo: the resize and centre crop of the usual test transform).

    Cropping before resizing keeps the work at size x size pixels whatever the aspect ratio (a
    1 x 100000 strip would otherwise be upscaled to size x 100000 size first).
    """
    image = _open_rgb(path, size)
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return np.array(image.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side),
                                   reducing_gap=3.0))


def load_photo(path: str | Path, size: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Decode ``path`` whole, for training crops: its long side resized to ``size`` and centred in a
    uint8 (size, size, 3) square, and where it sits there, ``(left, top, width, height)`` in pixels.

    The square's other rows (or columns) repeat the photo's edge pixels, so that a crop touching
    the edge blends nothing foreign in; the crop sampler keeps every box inside the photo
    (:func:`byol_nb.augment.sample_crop_boxes`), so training crops see all of a landscape photo, not
    only its centre square. Square images come out exactly as :func:`load_image` gives them.
    """
    image = _open_rgb(path, size, whole=True)
    width, height = image.size
    scale = size / max(width, height)
    photo_w, photo_h = max(1, round(width * scale)), max(1, round(height * scale))
    photo = np.array(image.resize((photo_w, photo_h), Image.Resampling.BILINEAR, reducing_gap=3.0))
    left, top = (size - photo_w) // 2, (size - photo_h) // 2
    square = np.pad(photo, ((top, size - photo_h - top), (left, size - photo_w - left), (0, 0)), mode="edge")
    return square, (left, top, photo_w, photo_h)


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
    are decoded once, into a file that every process and later run shares (:mod:`byol_nb.disk_cache`;
    a changed folder is decoded again), and unreadable ones are dropped with one warning that counts
    them. Without it, each header is checked here and decoding happens in ``__getitem__``, in the
    DataLoader's workers; a file that still fails then is replaced by the next readable one (and
    counted), so an epoch never crashes half-way.

    Items are ``(image, label)``, each image the photo's centre square (for evaluation). With
    ``whole_photos`` (training crops) each image is the whole photo letterboxed in its square
    (:func:`load_photo`) and items are ``(image, label, content)``, ``content`` the photo's box
    ``(x0, y0, x1, y1)`` in the square's [0, 1] coordinates, which the crop sampler stays inside.
    """

    def __init__(self, root: str | Path, image_size: int, cache: bool | None = None,
                 whole_photos: bool = False) -> None:
        self.root, self.image_size, self.whole_photos = Path(root), image_size, whole_photos
        files, labels, self.classes = find_images(root)
        if cache is None:
            cache = fits_in_cache(len(files), image_size)
        self.pixels: torch.Tensor | None = None
        self.content: torch.Tensor | None = None  # (N, 4) photo boxes, cached whole photos only
        if cache:
            key = {"folder": str(self.root.resolve()), "size": image_size, "whole_photos": whole_photos,
                   "files": file_stamps(files)}
            pixels, meta = cached_array("folder", key, lambda: _decode_all(files, image_size, whole_photos))
            kept = [(files[i], labels[i]) for i in meta["kept"]]
            self.skipped: list[str] = meta["skipped"]
            self.pixels = torch.from_numpy(pixels) if kept else None
            if whole_photos and kept:
                self.content = content_boxes(torch.tensor(meta["photo_boxes"]), image_size)
        else:
            kept, self.skipped = [], []
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

    def __getitem__(self, index: int) -> tuple:
        if self.pixels is not None:
            if self.content is not None:
                return self.pixels[index], self.labels[index], self.content[index]
            return self.pixels[index], self.labels[index]
        for offset in range(len(self.files)):
            i = (index + offset) % len(self.files)
            try:
                array, box = _decode(self.files[i], self.image_size, self.whole_photos)
                image = torch.from_numpy(array).permute(2, 0, 1).contiguous()
                if self.whole_photos:
                    return image, self.labels[i], content_boxes(torch.tensor(box), self.image_size)
                return image, self.labels[i]
            except UnreadableImage as error:
                self.runtime_failures += 1
                warnings.warn(f"replaced unreadable image ({error}); {self.runtime_failures} so far")
        raise DataError(f"no image under {str(self.root)!r} could be decoded")


def fits_in_cache(count: int, image_size: int) -> bool:
    """Whether ``count`` decoded images of ``image_size`` px fit in ``DEFAULT_CACHE_BYTES``."""
    return count * 3 * image_size**2 <= DEFAULT_CACHE_BYTES


def content_boxes(photo_boxes: torch.Tensor, size: int) -> torch.Tensor:
    """``(left, top, width, height)`` pixel boxes of photos in squares of ``size`` px, as
    ``(x0, y0, x1, y1)`` in the squares' [0, 1] coordinates (float32)."""
    left, top, width, height = photo_boxes.float().unbind(-1)
    return torch.stack([left, top, left + width, top + height], dim=-1) / size


def _decode(path: Path, size: int, whole_photo: bool) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """:func:`load_photo` for ``whole_photo``, else :func:`load_image` and its square's box."""
    return load_photo(path, size) if whole_photo else (load_image(path, size), (0, 0, size, size))


class _DecodeFiles(Dataset):
    """Each file decoded with its photo's box, or the reason it could not be: what the cache's
    workers hand back."""

    def __init__(self, files: Sequence[Path], image_size: int, whole_photos: bool) -> None:
        self.files, self.image_size, self.whole_photos = files, image_size, whole_photos

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[np.ndarray, tuple[int, int, int, int]] | str:
        try:
            return _decode(self.files[index], self.image_size, self.whole_photos)
        except UnreadableImage as error:
            return str(error)


PARALLEL_DECODE_FROM = 256  # files; fewer are decoded faster than worker processes start


def _decode_all(files: Sequence[Path], image_size: int, whole_photos: bool = False) -> tuple[np.ndarray, dict]:
    """Every readable file decoded into one (kept, 3, S, S) uint8 array, and which files it holds
    (``kept``: indices into ``files``, ``photo_boxes``: where each photo sits in its square) or
    skipped (``skipped``: the errors). A large folder is decoded by one worker process per CPU:
    this runs once per machine, while the others wait."""
    workers = min(MAX_WORKERS, _available_cpus()) if len(files) >= PARALLEL_DECODE_FROM else 0
    decoded = DataLoader(_DecodeFiles(files, image_size, whole_photos), batch_size=None, num_workers=workers)
    pixels = np.empty((len(files), 3, image_size, image_size), dtype=np.uint8)
    kept: list[int] = []
    photo_boxes: list[list[int]] = []
    skipped: list[str] = []
    for i, item in enumerate(decoded):
        if isinstance(item, str):
            skipped.append(item)
        else:
            image, box = item
            pixels[len(kept)] = image.permute(2, 0, 1).numpy()  # the loader hands arrays over as tensors
            kept.append(i)
            photo_boxes.append([int(v) for v in box])
    return pixels[:len(kept)], {"kept": kept, "photo_boxes": photo_boxes, "skipped": skipped}


class TensorImages(Dataset):
    """uint8 images already in memory (torchvision sets), resized once to ``image_size``.

    ``images`` is (N, H, W, 3) or, with ``channels_first``, (N, 3, H, W), as torchvision stores
    CIFAR-10 and STL-10. At its own size the array is used as it is (no copy); otherwise it is
    resized in chunks of ``RESIZE_CHUNK`` images into one uint8 tensor, so memory grows with the
    data in uint8, never with a float copy of the whole set.
    """

    def __init__(self, images: np.ndarray, labels: Sequence[int], image_size: int, classes: list[str],
                 channels_first: bool = False) -> None:
        pixels = torch.from_numpy(images)
        if not channels_first:
            pixels = pixels.permute(0, 3, 1, 2)
        if pixels.shape[-1] != image_size or pixels.shape[-2] != image_size:
            pixels = resize_uint8(pixels, image_size)
        self.pixels, self.labels, self.classes = pixels, list(labels), classes

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.pixels[index], self.labels[index]


RESIZE_CHUNK = 1024  # images resized at once: 1024 x 3 x 96 x 96 floats are 113 MB


def resize_uint8(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """Resize uint8 images (N, 3, H, W) to (N, 3, size, size), antialiased, chunk by chunk."""
    out = torch.empty((len(pixels), 3, size, size), dtype=torch.uint8)
    for start in range(0, len(pixels), RESIZE_CHUNK):
        chunk = pixels[start:start + RESIZE_CHUNK].float()
        chunk = torch.nn.functional.interpolate(chunk, size=(size, size), mode="bilinear", antialias=True,
                                                align_corners=False)
        out[start:start + RESIZE_CHUNK] = chunk.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _torchvision_dataset(name: str, split: str, image_size: int, download: bool) -> TensorImages:
    """CIFAR-10 or STL-10 (``split``: train, test, or STL-10's labeled-train), downloaded into
    ``data/NAME`` when missing, at ``image_size`` px; the uint8 pixels are read from the shared
    disk cache, so the processes of a run hold one copy between them."""
    import torchvision

    root = DATA_ROOT / name
    stl_split = {"train": "unlabeled", "labeled-train": "train", "test": "test"}.get(split, split)

    def load() -> TensorImages:
        if name == "cifar10":
            ds = torchvision.datasets.CIFAR10(root, train=split == "train", download=download)
            return TensorImages(ds.data, ds.targets, image_size, list(ds.classes))
        ds = torchvision.datasets.STL10(root, split=stl_split, download=download)
        return TensorImages(ds.data, [int(y) for y in ds.labels], image_size, list(ds.classes), channels_first=True)

    def build() -> tuple[np.ndarray, dict]:
        images = load()
        return images.pixels.contiguous().numpy(), {"labels": images.labels, "classes": images.classes}

    try:
        if not any(root.rglob("*")):
            load()  # downloads the set once, so that the cache's key below sees its files
        key = {"set": name, "split": split, "size": image_size,
               "files": file_stamps(sorted(p for p in root.rglob("*") if p.is_file()))}
        pixels, meta = cached_array(name, key, build)
    except RuntimeError as error:  # torchvision's "Dataset not found or corrupted"
        raise DataError(f"{name} is not in {root} and could not be downloaded ({error}); "
                        f"connect to the internet once, or pass a folder of images to --data") from error
    return TensorImages(pixels, meta["labels"], image_size, meta["classes"], channels_first=True)


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


def is_torchvision_source(source: str) -> bool:
    """Whether ``source`` names a torchvision set's split (``cifar10:train``) rather than a folder."""
    name, _, split = source.partition(":")
    return name in ("cifar10", "stl10") and bool(split)


def open_dataset(source: str, image_size: int, download: bool = True, whole_photos: bool = False) -> Dataset:
    """A dataset for one source: ``name:split`` for torchvision sets (square already), otherwise a
    folder, its photos whole with ``whole_photos`` (see :class:`ImageFolder`)."""
    if is_torchvision_source(source):
        name, _, split = source.partition(":")
        return _torchvision_dataset(name, split, image_size, download)
    return ImageFolder(source, image_size, whole_photos=whole_photos)


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


class DeviceBatches:
    """Batches of a decoded dataset indexed on the training device: the images are copied there
    once, and each step gathers its batch with one indexing call, with no DataLoader, worker or
    host-to-device copy per step. The order is the sampler's, exactly as a DataLoader over the same
    sampler would give it (resume included), and so are the batches: ``(images, labels)``, and the
    photos' boxes where the dataset has them; Lightning calls the sampler's ``set_epoch`` as for a
    DataLoader, through the ``sampler`` attribute."""

    def __init__(self, dataset: Dataset, sampler: ResumableSampler, batch_size: int, device: torch.device) -> None:
        self.sampler, self.batch_size = sampler, batch_size
        self.pixels = torch.as_tensor(dataset.pixels).to(device)  # type: ignore[attr-defined]
        self.labels = torch.as_tensor(dataset_labels(dataset), device=device)
        content = getattr(dataset, "content", None)
        self.columns = (self.pixels, self.labels) + (() if content is None else (content.to(device),))

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def __iter__(self):
        indices = torch.tensor(list(self.sampler), dtype=torch.long)
        for start in range(0, len(indices) - self.batch_size + 1, self.batch_size):
            batch = indices[start:start + self.batch_size].to(self.pixels.device, non_blocking=True)
            yield tuple(column[batch] for column in self.columns)


DEVICE_MEMORY_SHARE = 0.2  # the most of a GPU's memory a dataset may take there; training needs the rest


def keep_on_device(dataset: Dataset, device: torch.device) -> bool:
    """Whether to index ``dataset`` on the training device (:class:`DeviceBatches`): a GPU, and
    decoded images that take at most ``DEVICE_MEMORY_SHARE`` of its memory."""
    pixels = getattr(dataset, "pixels", None)
    return (device.type == "cuda" and pixels is not None
            and pixels.nbytes <= DEVICE_MEMORY_SHARE * torch.cuda.get_device_properties(device).total_memory)


class SSLDataModule(pl.LightningDataModule):
    """Training images (labels ignored) plus, optionally, a labeled bank and queries for kNN.

    Datasets are built in :meth:`setup`, inside each process, so that ``ddp_notebook`` and spawned
    launches never pickle pixel tensors across processes.
    """

    def __init__(self, data: str, val_data: str | None, image_size: int, batch_size: int,
                 num_workers: int | None = None, monitor_size: int = 2000, seed: int = 0) -> None:
        super().__init__()
        self.spec = resolve_data(data, val_data)
        self.image_size, self.batch_size = image_size, batch_size
        self.num_workers, self.monitor_size, self.seed = num_workers, monitor_size, seed
        self.train_set: Dataset | None = None
        self.bank_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def prepare_data(self) -> None:
        """Once per machine, before every process's :meth:`setup`: write the built-in data, download
        named sets and fill the shared decode cache, so that the processes only read it."""
        if self.spec.train == str(shapes_root() / "train"):
            shapes.ensure_shapes(shapes_root())
        for source, size, whole in self._sources():
            # A folder too large for the cache has nothing to prepare: setup checks its files once.
            if is_torchvision_source(source) or fits_in_cache(len(find_images(source)[0]), size):
                open_dataset(source, size, whole_photos=whole)

    def _sources(self) -> list[tuple[str, int, bool]]:
        """(source, image size, whole photos) of every dataset the run opens: training crops are
        cut from whole photos, the kNN monitor sees their centre squares."""
        sources = [(self.spec.train, self.crop_source_size, True)]
        if self.spec.val is not None:
            sources.append((self.spec.val, self.image_size, False))
            if self.spec.monitor_bank is not None:
                sources.append((self.spec.monitor_bank, self.image_size, False))
        return sources

    @property
    def crop_source_size(self) -> int:
        """The side training images are decoded at: twice the view size for image folders.

        Views are random crops (often a third of the image or less) resized to ``image_size``. Cut
        from images already shrunk to ``image_size`` they are upsampled and blurred; torchvision's
        RandomResizedCrop cuts them from the original instead. Twice the view size keeps crops of
        down to a quarter of the area sharp, for 4x the decoded pixels (the cache limit still
        applies). Named torchvision sets keep their native size: they have no more detail.
        """
        return self.image_size if is_torchvision_source(self.spec.train) else CROP_SOURCE_FACTOR * self.image_size

    def setup(self, stage: str | None = None) -> None:
        limit_threads_after_fork()  # the first CPU work in a ddp_notebook worker happens here
        if self.train_set is not None:
            return
        self.train_set = open_dataset(self.spec.train, self.crop_source_size, whole_photos=True)
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

    def steps_per_epoch(self, world_size: int = 1) -> int:
        """Optimizer steps in one pass over the training set split over ``world_size`` processes."""
        return len(self.train_set) // world_size // self.batch_size

    def train_dataloader(self) -> DataLoader:
        """Batches in :class:`ResumableSampler` order, starting where the run's global step says.

        One optimizer step consumes one batch, so a run resumed at global step ``k`` continues
        with batch ``k % steps_per_epoch`` of epoch ``k // steps_per_epoch``, as if never stopped.
        """
        trainer = self.trainer
        world, rank, step = (trainer.world_size, trainer.global_rank, trainer.global_step) if trainer else (1, 0, 0)
        sampler = ResumableSampler(self.train_set, num_replicas=world, rank=rank, seed=self.seed)
        epoch, batch = divmod(step, self.steps_per_epoch(world))
        sampler.start_at(epoch, batch * self.batch_size)
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        if keep_on_device(self.train_set, device):
            return DeviceBatches(self.train_set, sampler, self.batch_size, device)
        return self._loader(self.train_set, batch_size=self.batch_size, sampler=sampler, drop_last=True)

    def val_dataloader(self) -> list[DataLoader]:
        if self.val_set is None:
            return []
        return [self._loader(ds, batch_size=256, shuffle=False) for ds in (self.bank_set, self.val_set)]

    def _loader(self, dataset: Dataset, **options) -> DataLoader:
        """A DataLoader with ``--num-workers`` workers (default: :func:`loader_workers`), kept alive
        between epochs and a few batches ahead; pinned memory only when the batches go to a GPU."""
        trainer = self.trainer
        per_node = trainer.num_devices if trainer is not None else 1
        workers = self.num_workers if self.num_workers is not None else loader_workers(dataset, per_node)
        streaming = dict(persistent_workers=True, prefetch_factor=4) if workers > 0 else {}
        return DataLoader(dataset, num_workers=workers, **streaming, **options,
                          pin_memory=trainer is not None and trainer.strategy.root_device.type == "cuda")


MAX_WORKERS = 16


def loader_workers(dataset: Dataset, processes_per_node: int = 1) -> int:
    """Worker processes per DataLoader: none for images already decoded in memory (indexing them
    costs less than handing batches between processes), otherwise the CPUs available to this
    process less one for the training loop itself (at least one, at most ``MAX_WORKERS``)."""
    base = dataset.dataset if isinstance(dataset, torch.utils.data.Subset) else dataset
    if getattr(base, "pixels", None) is not None:
        return 0
    return max(1, min(MAX_WORKERS, _available_cpus() // max(1, processes_per_node) - 1))


def _available_cpus() -> int:
    """The CPUs this process may run on (a container's or SLURM's limit, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _subset(dataset: Dataset, size: int) -> Dataset:
    """An evenly spaced, deterministic subset (keeps every class of a sorted folder)."""
    if len(dataset) <= size:
        return dataset
    indices = np.linspace(0, len(dataset) - 1, size).round().astype(int).tolist()
    subset = torch.utils.data.Subset(dataset, indices)
    subset.labels = [dataset_labels(dataset)[i] for i in indices]  # type: ignore[attr-defined]
    return subset
