"""Datasets: every one yields ``(image, label)`` with ``image`` a uint8 tensor (3, S, S) and
``label`` an int (-1 when unlabeled). Images stay uint8 until they reach the training device: the
two-view augmentation runs there, batched (see :mod:`byol_nb.augment`), so a dataset only decodes
and resizes. Datasets that fit are decoded once into one uint8 array that every process of the
machine shares (:mod:`byol_nb.disk_cache`), which removes decoding from the training loop
entirely; larger folders are decoded in the DataLoader's worker processes.

Sources, by name (``open_dataset``):

* a folder: images found recursively; with one sub-folder per class it is also labeled;
* ``cifar10:train`` / ``cifar10:test`` / ``stl10:train`` (unlabeled) / ``stl10:labeled-train`` /
  ``stl10:test``: torchvision sets, downloaded once (:func:`download`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import uuid
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from byol_nb.config import TORCHVISION_DATA
from byol_nb.devices import cpu_cores
from byol_nb.disk_cache import cached_array, file_stamps
from byol_nb.images import DataError, UnreadableImage, find_images, load_image, load_photo
from byol_nb.paths import downloads_root

# Decode a folder once into the shared disk cache when its uint8 pixels fit in this many bytes;
# larger folders are decoded batch by batch in the DataLoader's workers.
DEFAULT_CACHE_BYTES = 2 * 1024**3
MAX_WORKERS = 16  # decoding processes per DataLoader, at most

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
    workers = min(MAX_WORKERS, cpu_cores()) if len(files) >= PARALLEL_DECODE_FROM else 0
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


# ---- torchvision's sets ---------------------------------------------------------------------------

DOWNLOAD_TIMEOUT_S = 15  # per network operation: without a network the download fails in seconds, not minutes


def _torchvision_class(name: str) -> type:
    import torchvision

    return {"cifar10": torchvision.datasets.CIFAR10, "stl10": torchvision.datasets.STL10}[name]


def set_folder(name: str) -> Path:
    """Where torchvision's files of set ``name`` live: ``data/NAME`` (``BYOL_NB_DATA`` moves ``data``)."""
    return downloads_root() / name


def is_downloaded(name: str) -> bool:
    """Whether set ``name`` is complete in :func:`set_folder` (torchvision's own check of its files)."""
    folder = set_folder(name) / _torchvision_class(name).base_folder
    return folder.is_dir() and any(folder.iterdir())


def download(name: str) -> Path:
    """Fetch set ``name`` into :func:`set_folder`, unless it is there; returns the folder.

    The download goes to a temporary folder beside it that is renamed into place once complete, so
    a broken connection leaves nothing half-written and two nodes downloading at once cannot mix
    their files (the second rename finds the folder there and drops its copy). An archive already
    placed in the folder by hand (a machine without internet) is checked and extracted instead.
    Raises :class:`DataError` naming the archive and where to put it when there is no network.
    """
    cls, folder = _torchvision_class(name), set_folder(name)
    if is_downloaded(name):
        return folder
    archive = folder / cls.filename
    target = folder if archive.is_file() else folder.with_name(f".{name}.{uuid.uuid4().hex}.partial")
    try:
        with _network_timeout(DOWNLOAD_TIMEOUT_S):
            _fetch(name, target)
        if target != folder:
            _move_into_place(target, folder)
    except (OSError, RuntimeError) as error:  # URLError and timeouts are OSErrors; a bad checksum a RuntimeError
        raise DataError(f"{name} is not in {folder} and could not be downloaded ({_reason(error)}). Without "
                        f"internet, put torchvision's archive {cls.filename} (from {cls.url}) into {folder} "
                        f"and run again, or point BYOL_NB_DATA at a folder that holds {name}/") from None
    finally:
        if target != folder:
            shutil.rmtree(target, ignore_errors=True)
    return folder


def _fetch(name: str, root: Path) -> None:
    """torchvision's archive of set ``name`` into ``root`` (kept when it is there and its checksum
    holds), extracted beside it."""
    from torchvision.datasets.utils import download_and_extract_archive

    cls = _torchvision_class(name)
    download_and_extract_archive(cls.url, root, filename=cls.filename, md5=cls.tgz_md5)


def _move_into_place(partial: Path, folder: Path) -> None:
    """Rename the completed download to ``folder`` (an empty one is replaced; a complete one, from
    a download that finished first, is kept)."""
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
    try:
        os.replace(partial, folder)
    except OSError:
        if not is_downloaded(folder.name):
            raise


@contextlib.contextmanager
def _network_timeout(seconds: float) -> Iterator[None]:
    """torchvision's downloads wait as long as the socket default allows (forever): bound them."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _reason(error: BaseException) -> str:
    reason = getattr(error, "reason", None) or getattr(error, "strerror", None) or error
    return str(reason).strip() or type(error).__name__


def _torchvision_dataset(name: str, split: str, image_size: int, allow_download: bool) -> TensorImages:
    """CIFAR-10 or STL-10 (``split``: train, test, or STL-10's labeled-train) at ``image_size`` px,
    downloaded first when missing and ``allow_download``; the uint8 pixels are read from the shared
    disk cache, so the processes of a run hold one copy between them."""
    if allow_download:
        download(name)
    elif not is_downloaded(name):
        raise DataError(f"{name} is not in {set_folder(name)}: it is downloaded before training starts (run once "
                        f"with internet, or put torchvision's archive {_torchvision_class(name).filename} there)")
    root = set_folder(name)
    stl_split = {"train": "unlabeled", "labeled-train": "train", "test": "test"}.get(split, split)

    def build() -> tuple[np.ndarray, dict]:
        try:
            if name == "cifar10":
                ds = _torchvision_class(name)(root, train=split == "train")
                images = TensorImages(ds.data, ds.targets, image_size, list(ds.classes))
            else:
                ds = _torchvision_class(name)(root, split=stl_split)
                images = TensorImages(ds.data, [int(y) for y in ds.labels], image_size, list(ds.classes),
                                      channels_first=True)
        except RuntimeError as error:  # torchvision's "Dataset not found or corrupted"
            raise DataError(f"{name} in {root} is incomplete or corrupted ({error}): delete the folder and "
                            f"run again to download it anew") from None
        return images.pixels.contiguous().numpy(), {"labels": images.labels, "classes": images.classes}

    key = {"set": name, "split": split, "size": image_size,
           "files": file_stamps(sorted(p for p in root.rglob("*") if p.is_file()))}
    pixels, meta = cached_array(name, key, build)
    return TensorImages(pixels, meta["labels"], image_size, meta["classes"], channels_first=True)


def is_torchvision_source(source: str) -> bool:
    """Whether ``source`` names a torchvision set's split (``cifar10:train``) rather than a folder."""
    name, _, split = source.partition(":")
    return name in TORCHVISION_DATA and bool(split)


def open_dataset(source: str, image_size: int, download: bool = True, whole_photos: bool = False) -> Dataset:
    """A dataset for one source: ``name:split`` for torchvision sets (square already; downloaded when
    missing unless ``download`` is False), otherwise a folder, its photos whole with ``whole_photos``
    (see :class:`ImageFolder`)."""
    if is_torchvision_source(source):
        name, _, split = source.partition(":")
        return _torchvision_dataset(name, split, image_size, download)
    return ImageFolder(source, image_size, whole_photos=whole_photos)


def dataset_labels(dataset: Dataset) -> list[int]:
    """The labels of a dataset of this module (or an :func:`evenly_spaced` subset of one), in order."""
    return list(getattr(dataset, "labels"))


def evenly_spaced(dataset: Dataset, size: int) -> Dataset:
    """An evenly spaced, deterministic subset of at most ``size`` items (keeps every class of a
    sorted folder), with its labels."""
    if len(dataset) <= size:
        return dataset
    indices = np.linspace(0, len(dataset) - 1, size).round().astype(int).tolist()
    subset = torch.utils.data.Subset(dataset, indices)
    subset.labels = [dataset_labels(dataset)[i] for i in indices]  # type: ignore[attr-defined]
    return subset
