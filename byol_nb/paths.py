"""Where byol_nb keeps files on disk, in one place.

By default everything lives under the repository's ``data/`` folder. Three environment variables
move one part each:

* ``BYOL_NB_DATA``: the downloaded sets (``cifar10/``, ``stl10/``), e.g. a shared, read-only copy on
  a cluster that every job reads and none downloads again;
* ``BYOL_NB_SHAPES``: the built-in dataset (the lessons and tests point it at their own folders);
* ``BYOL_NB_CACHE``: the shared decode cache (:mod:`byol_nb.disk_cache`), which must be writable.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data"


def downloads_root() -> Path:
    """The folder that holds the torchvision sets, one sub-folder each (``BYOL_NB_DATA``)."""
    return Path(os.environ.get("BYOL_NB_DATA", DATA)).expanduser()


def shapes_root() -> Path:
    """The built-in dataset's folder (``BYOL_NB_SHAPES``)."""
    return Path(os.environ.get("BYOL_NB_SHAPES", DATA / "shapes")).expanduser()


def cache_root() -> Path:
    """The decode cache's folder (``BYOL_NB_CACHE``)."""
    return Path(os.environ.get("BYOL_NB_CACHE", DATA / "cache")).expanduser()
