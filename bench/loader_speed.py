"""How fast the DataLoader decodes full-size photos, per worker: what a GPU run on a folder of JPEGs needs.

    python -m bench.loader_speed                       # 96 and 224 px, 1 and 2 workers
    python -m bench.loader_speed --sizes 224 --workers 1 2 4

Writes a folder of 500 x 375 JPEGs (the built-in generator's scenes, quality 90, under
bench/results/photos) and streams it through ``byol_nb.datasets.ImageFolder`` without the decode cache,
as a folder too large for the cache is trained: each worker opens, decodes (in JPEG draft mode) and
resizes every whole photo into a square of the crop source size (twice the view size), batches of 64. Reports images
per second after a warm-up batch, for each worker count; one worker's rate tells how many workers a
GPU step of that size needs (the GPU's images/s divided by it).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader

from byol_nb.datamodule import CROP_SOURCE_FACTOR
from byol_nb.datasets import ImageFolder
from byol_nb.shapes import render_shape_image

PHOTOS = Path(__file__).resolve().parent / "results" / "photos"
WIDTH, HEIGHT = 500, 375


def write_photos(folder: Path, count: int) -> Path:
    """``count`` JPEGs of 500 x 375 px (written once)."""
    if len(list(folder.glob("*.jpg"))) >= count:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        scene, _ = render_shape_image(rng, i % 6, WIDTH)
        Image.fromarray(scene[:HEIGHT]).save(folder / f"{i:05d}.jpg", quality=90)
    return folder


def images_per_second(folder: Path, view_size: int, workers: int, batches: int) -> float:
    dataset = ImageFolder(folder, CROP_SOURCE_FACTOR * view_size, cache=False, whole_photos=True)
    loader = DataLoader(dataset, batch_size=64, shuffle=True, num_workers=workers, persistent_workers=workers > 0,
                        prefetch_factor=4 if workers else None, drop_last=True)
    iterator = iter(loader)
    next(iterator)  # workers started, first batch decoded
    started, seen = time.perf_counter(), 0
    for _ in range(batches):
        seen += len(next(iterator)[0])
    return seen / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[96, 224], help="view sizes")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--images", type=int, default=1024)
    args = parser.parse_args()
    folder = write_photos(PHOTOS, args.images)
    batches = args.images // 64 - 2
    print(f"{args.images} JPEGs of {WIDTH}x{HEIGHT} in {folder}; batches of 64")
    print("| view px | decoded at | workers | images/s | per worker |")
    print("|---|---|---|---|---|")
    for size in args.sizes:
        for workers in args.workers:
            rate = images_per_second(folder, size, workers, batches)
            row = (size, CROP_SOURCE_FACTOR * size, workers, f"{rate:.0f}", f"{rate / workers:.0f}")
            print("| " + " | ".join(str(v) for v in row) + " |", flush=True)


if __name__ == "__main__":
    main()
