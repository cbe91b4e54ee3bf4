"""What a training run reads, and in which order: the Lightning DataModule built from a run's
configuration, the resumable sampler, batches kept on the GPU and the loader's worker count.

``--data`` names a source (:func:`resolve_data`): the built-in ``shapes``, a torchvision set, or a
folder; named sets bring their labeled split for the kNN monitor.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from byol_nb import shapes
from byol_nb.config import TrainConfig
from byol_nb.datasets import (
    MAX_WORKERS,
    dataset_labels,
    download,
    evenly_spaced,
    fits_in_cache,
    is_downloaded,
    is_torchvision_source,
    open_dataset,
)
from byol_nb.devices import cpu_cores, limit_threads_after_fork
from byol_nb.images import DataError, find_images
from byol_nb.paths import shapes_root

CROP_SOURCE_FACTOR = 2  # training images are decoded at this multiple of the view size


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
    launches never pickle pixel tensors across processes. Build it with :meth:`from_config`, so that
    the image size and batch size are the ones the module trains with.
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

    @classmethod
    def from_config(cls, config: TrainConfig, data: str, val_data: str | None = None,
                    num_workers: int | None = None) -> "SSLDataModule":
        """The data of a run with ``config``: its views' size, its batch size per process, its seed."""
        return cls(data, val_data, config.image_size, config.batch_size, num_workers, seed=config.seed)

    def prepare_data(self) -> None:
        """Once per machine, before every process's :meth:`setup`: write the built-in data, download
        named sets (on global rank 0 only: a data folder shared by several nodes gets one download)
        and fill the shared decode cache, so that the processes only read it."""
        if self.spec.train == str(shapes_root() / "train"):
            shapes.ensure_shapes(shapes_root())
        first = self.trainer is None or self.trainer.global_rank == 0
        for source, size, whole in self._sources():
            if is_torchvision_source(source):
                name = source.partition(":")[0]
                if first:
                    download(name)
                if is_downloaded(name):  # on another node, setup fills the cache once the download is done
                    open_dataset(source, size, download=False)
            # A folder too large for the cache has nothing to prepare: setup checks its files once.
            elif fits_in_cache(len(find_images(source)[0]), size):
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
        self.train_set = open_dataset(self.spec.train, self.crop_source_size, download=False, whole_photos=True)
        if self.spec.val is not None:
            self.val_set = open_dataset(self.spec.val, self.image_size, download=False)
            bank = (open_dataset(self.spec.monitor_bank, self.image_size, download=False)
                    if self.spec.monitor_bank else None)
            labels_ok = bank is not None and min(dataset_labels(bank)) >= 0 and min(dataset_labels(self.val_set)) >= 0
            if not labels_ok:
                raise DataError(f"--val-data {self.spec.val!r} and the training data need one sub-folder "
                                f"per class for the kNN monitor; leave --val-data out for unlabeled data")
            self.bank_set = evenly_spaced(bank, self.monitor_size)
            self.val_set = evenly_spaced(self.val_set, self.monitor_size)
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


def loader_workers(dataset: Dataset, processes_per_node: int = 1) -> int:
    """Worker processes per DataLoader: none for images already decoded in memory (indexing them
    costs less than handing batches between processes), otherwise the CPUs available to this
    process less one for the training loop itself (at least one, at most ``MAX_WORKERS``)."""
    base = dataset.dataset if isinstance(dataset, torch.utils.data.Subset) else dataset
    if getattr(base, "pixels", None) is not None:
        return 0
    return max(1, min(MAX_WORKERS, cpu_cores() // max(1, processes_per_node) - 1))
