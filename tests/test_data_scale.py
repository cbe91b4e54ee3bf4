"""Data at scale: uint8 resizing in chunks, the shared decode cache and when it is rebuilt, the
DataLoader's worker count, and streaming through a folder whose files break after the check."""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset

from byol_nb import datamodule, datasets, disk_cache, images
from byol_nb.datamodule import loader_workers
from byol_nb.datasets import ImageFolder, TensorImages, resize_uint8


def _write_images(folder, count: int, size: int = 20, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")


@pytest.fixture
def cache_folder(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("BYOL_NB_CACHE", str(folder))
    return folder


def test_chunked_resize_equals_resizing_all_at_once(monkeypatch):
    pixels = torch.randint(0, 256, (10, 3, 24, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(datasets, "RESIZE_CHUNK", 3)  # 4 chunks, the last one short
    resized = resize_uint8(pixels, 16)
    whole = torch.nn.functional.interpolate(pixels.float(), size=(16, 16), mode="bilinear", antialias=True,
                                            align_corners=False).round().clamp(0, 255).to(torch.uint8)
    assert resized.dtype == torch.uint8 and resized.shape == (10, 3, 16, 16)
    assert torch.equal(resized, whole)


def test_named_set_at_its_own_size_is_not_copied():
    images = np.random.default_rng(0).integers(0, 256, (6, 3, 8, 8), dtype=np.uint8)  # STL-10's layout
    dataset = TensorImages(images, list(range(6)), 8, classes=[], channels_first=True)
    assert dataset.pixels.data_ptr() == images.__array_interface__["data"][0]
    channels_last = np.ascontiguousarray(images.transpose(0, 2, 3, 1))  # CIFAR-10's layout
    assert torch.equal(TensorImages(channels_last, list(range(6)), 8, classes=[])[2][0], torch.from_numpy(images[2]))


def test_cached_array_builds_once_per_key(cache_folder):
    calls = []

    def build():
        calls.append(1)
        return np.arange(12, dtype=np.uint8).reshape(3, 4), {"note": len(calls)}

    first, meta = disk_cache.cached_array("demo", {"a": 1}, build)
    again, meta_again = disk_cache.cached_array("demo", {"a": 1}, build)
    assert len(calls) == 1 and meta == meta_again == {"note": 1}
    assert isinstance(again, np.memmap) and np.array_equal(first, again)
    disk_cache.cached_array("demo", {"a": 2}, build)  # another key: built again
    assert len(calls) == 2
    assert not list(cache_folder.glob("*.partial"))


def test_cached_array_without_a_writable_folder_still_returns_the_array(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("BYOL_NB_CACHE", str(blocker / "cache"))
    array, meta = disk_cache.cached_array("demo", {"a": 1}, lambda: (np.ones(3, dtype=np.uint8), {"ok": True}))
    assert array.tolist() == [1, 1, 1] and meta == {"ok": True}


def test_folder_is_decoded_once_and_again_when_it_changes(tmp_path, cache_folder, monkeypatch):
    _write_images(tmp_path / "images", 5)
    first = ImageFolder(tmp_path / "images", 16, cache=True)
    assert len(list(cache_folder.glob("folder-*.npy"))) == 1

    def no_decoding(path, size):
        raise AssertionError("a cached folder must not be decoded again")

    monkeypatch.setattr(datasets, "load_image", no_decoding)
    second = ImageFolder(tmp_path / "images", 16, cache=True)  # read from the cache
    assert torch.equal(first.pixels, second.pixels) and second.files == first.files
    monkeypatch.undo()
    monkeypatch.setenv("BYOL_NB_CACHE", str(cache_folder))
    changed = tmp_path / "images" / "002.png"
    Image.fromarray(np.zeros((20, 24, 3), dtype=np.uint8)).save(changed)
    os.utime(changed, ns=(1, 1))  # a different modification time, even on a coarse clock
    third = ImageFolder(tmp_path / "images", 16, cache=True)
    assert (third.pixels[2] == 0).all() and torch.equal(third.pixels[0], first.pixels[0])
    assert len(list(cache_folder.glob("folder-*.npy"))) == 2


def test_cached_folder_remembers_what_it_skipped(tmp_path, cache_folder):
    _write_images(tmp_path, 3)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    for _ in range(2):  # built, then read back: the same images and the same warning
        with pytest.warns(UserWarning, match=r"skipped 1 unreadable"):
            dataset = ImageFolder(tmp_path, 16, cache=True)
        assert len(dataset) == 3 and all(f.name != "broken.png" for f in dataset.files)


def test_worker_processes_decode_a_large_folder_as_one_process_would(tmp_path, cache_folder, monkeypatch):
    _write_images(tmp_path / "a", 9)
    (tmp_path / "a" / "004.png").write_bytes(b"\x89PNG broken")
    with pytest.warns(UserWarning, match="skipped 1"):
        serial = ImageFolder(tmp_path / "a", 16, cache=True)
    monkeypatch.setattr(datasets, "PARALLEL_DECODE_FROM", 2)
    monkeypatch.setattr(disk_cache, "FORMAT", disk_cache.FORMAT + 1)  # another key: decoded again, in workers
    with pytest.warns(UserWarning, match="skipped 1"):
        parallel = ImageFolder(tmp_path / "a", 16, cache=True)
    assert torch.equal(serial.pixels, parallel.pixels) and serial.files == parallel.files
    assert len(list(cache_folder.glob("folder-*.npy"))) == 2


def test_worker_count_follows_the_data_and_the_processes(tmp_path, monkeypatch):
    _write_images(tmp_path, 4)
    cached, streamed = ImageFolder(tmp_path, 16, cache=True), ImageFolder(tmp_path, 16, cache=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert loader_workers(cached) == 0 and loader_workers(Subset(cached, [0, 1])) == 0
    assert loader_workers(streamed) == 7
    assert loader_workers(streamed, processes_per_node=4) == 1
    assert loader_workers(streamed, processes_per_node=8) == 1  # never none for files to decode
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert loader_workers(streamed) == datasets.MAX_WORKERS


def test_workers_replace_a_file_that_breaks_after_the_check(tmp_path):
    _write_images(tmp_path, 8)
    dataset = ImageFolder(tmp_path, 16, cache=False)
    (tmp_path / "003.png").write_bytes(b"truncated")  # passes the header check above, fails in a worker
    loader = DataLoader(dataset, batch_size=4, num_workers=2, persistent_workers=True)
    batches = [images for _ in range(2) for images, _ in loader]  # two epochs, the same workers
    assert len(batches) == 4 and all(b.shape == (4, 3, 16, 16) and b.dtype == torch.uint8 for b in batches)
    next_readable = torch.from_numpy(images.load_image(tmp_path / "004.png", 16)).permute(2, 0, 1)
    assert torch.equal(batches[0][3], next_readable) and torch.equal(batches[2][3], next_readable)


@pytest.mark.parametrize("world, rank, step", [(1, 0, 0), (1, 0, 7), (2, 1, 3)])
def test_device_batches_follow_the_sampler_like_a_dataloader(tiny_shapes, world, rank, step):
    dataset = ImageFolder(tiny_shapes / "train", 16, cache=True)
    batches = {}
    for kind in ("loader", "device"):
        sampler = datamodule.ResumableSampler(dataset, num_replicas=world, rank=rank, seed=5)
        sampler.start_at(*divmod(step * 4, len(sampler)))  # resumed part-way, as train_dataloader does
        loader = (DataLoader(dataset, batch_size=4, sampler=sampler, drop_last=True) if kind == "loader"
                  else datamodule.DeviceBatches(dataset, sampler, 4, torch.device("cpu")))
        assert len(loader) == len(sampler) // 4
        batches[kind] = [list(loader) for epoch in range(2) if sampler.set_epoch(sampler.epoch + epoch) or True]
    for (a_images, a_labels), (b_images, b_labels) in zip(sum(batches["loader"], []), sum(batches["device"], [])):
        assert torch.equal(a_images, b_images) and torch.equal(a_labels, b_labels)
    assert sum(map(len, batches["loader"])) == sum(map(len, batches["device"])) > 0


def test_only_a_gpu_with_room_keeps_the_images(tmp_path, monkeypatch):
    _write_images(tmp_path, 4)
    dataset = ImageFolder(tmp_path, 16, cache=True)  # 4 x 3 x 16 x 16 = 3072 bytes
    assert not datamodule.keep_on_device(dataset, torch.device("cpu"))
    assert not datamodule.keep_on_device(ImageFolder(tmp_path, 16, cache=False), torch.device("cuda", 0))
    for memory, expected in ((10 * 3072, True), (3072, False)):
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=memory))
        assert datamodule.keep_on_device(dataset, torch.device("cuda", 0)) == expected


@pytest.mark.slow
def test_training_from_device_batches_matches_the_dataloader_and_resumes(tiny_shapes, tmp_path, monkeypatch):
    """The whole training path with the images indexed on the device (the CPU standing in for a
    GPU): the same weights as with the DataLoader, also across a resume mid-epoch."""
    from byol_nb import train

    flags = ["--data", str(tiny_shapes / "train"), "--image-size", "16", "--batch-size", "8", "--proj-hidden", "32",
             "--proj-dim", "16", "--accelerator", "cpu", "--no-progress", "--save-every-n-steps", "1"]
    assert train.main([*flags, "--out", str(tmp_path / "loader"), "--max-steps", "9"]) == 0
    monkeypatch.setattr(datamodule, "keep_on_device", lambda dataset, device: True)
    used = []
    original = datamodule.DeviceBatches

    class CountedBatches(original):
        def __iter__(self):
            used.append(1)
            yield from original.__iter__(self)

    monkeypatch.setattr(datamodule, "DeviceBatches", CountedBatches)
    monkeypatch.setenv("BYOL_NB_FAIL_AT_STEP", "7")  # a crash in the second epoch (6 steps each)
    with pytest.raises(RuntimeError, match="injected"):
        train.main([*flags, "--out", str(tmp_path / "device"), "--max-steps", "9"])
    monkeypatch.delenv("BYOL_NB_FAIL_AT_STEP")
    assert train.main([*flags, "--out", str(tmp_path / "device"), "--max-steps", "9", "--resume"]) == 0
    assert used, "the device batches were not used"
    a, b = (torch.load(tmp_path / run / "last.ckpt", weights_only=True)["state_dict"] for run in ("loader", "device"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)
