"""Decoded images kept on disk, built once per machine and shared by every process and later run.

Decoding a folder of JPEGs (or resizing a torchvision set) takes minutes at ImageNet scale, and
every process of a DDP run would otherwise do it again and hold its own copy. Here the result, one
uint8 array, is written once as a ``.npy`` file and then opened memory-mapped: the processes of a
run (and the runs after it) share the same pages of the operating system's file cache.

The file's name is a hash of everything the pixels depend on (the source, each file's size and
modification time, the image size, ``FORMAT``), so a changed source is simply a different file: it
is rebuilt, never read stale. Files are written to a temporary name and renamed, so a crashed or
concurrent build never leaves a half-written array behind.

``BYOL_NB_CACHE`` moves the folder (default: ``data/cache``); deleting it is always safe.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from byol_nb.paths import cache_root

# Bump when what a cached array holds changes (the decoding, the crop, the layout).
FORMAT = 1


def file_stamps(paths: Iterable[Path]) -> list[tuple[str, int, int]]:
    """(path, size, modification time in ns) of each file: what decides whether a cache is current.
    A file that cannot be read (a broken link) gets (-1, -1): it changes the key once it can."""
    stamps = []
    for path in paths:
        try:
            stat = os.stat(path)
            stamps.append((str(path), stat.st_size, stat.st_mtime_ns))
        except OSError:
            stamps.append((str(path), -1, -1))
    return stamps


def cached_array(name: str, key: Any, build: Callable[[], tuple[np.ndarray, dict]]) -> tuple[np.ndarray, dict]:
    """The array (memory-mapped, copy-on-write) and metadata that ``build()`` returns for ``key``.

    ``key`` is anything JSON can write; ``name`` only makes the file recognisable. On the first call
    for a key, ``build()`` runs and its result is saved; later calls, in any process, read the file.
    When the cache folder cannot be written (a read-only checkout), the built array is returned as is.
    """
    digest = hashlib.sha256(json.dumps([FORMAT, key], sort_keys=True).encode()).hexdigest()[:20]
    folder = cache_root()
    array_path, meta_path = folder / f"{name}-{digest}.npy", folder / f"{name}-{digest}.json"
    if array_path.is_file() and meta_path.is_file():
        return np.load(array_path, mmap_mode="c"), json.loads(meta_path.read_text())
    array, meta = build()
    partial = f".{uuid.uuid4().hex}.partial"
    array_tmp, meta_tmp = array_path.with_name(array_path.name + partial), meta_path.with_name(meta_path.name + partial)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(array_tmp, "wb") as file:
            np.save(file, array, allow_pickle=False)
        meta_tmp.write_text(json.dumps(meta))
        # The array first: a reader looks for the metadata, so it never finds a half-renamed pair.
        os.replace(array_tmp, array_path)
        os.replace(meta_tmp, meta_path)
    except OSError:
        for leftover in (array_tmp, meta_tmp):
            with contextlib.suppress(OSError):
                leftover.unlink()
        return array, meta
    return np.load(array_path, mmap_mode="c"), meta
