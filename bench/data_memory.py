"""Peak memory of loading a named dataset of STL-10's unlabeled size, without a download.

    python -m bench.data_memory --size 32
    python -m bench.data_memory --size 96

Builds a uint8 array of STL-10's unlabeled split (100,000 x 3 x 96 x 96, 2.8 GB, random pixels:
what is measured is the resize, not the content), hands it to the class that ``--data stl10``
uses (``byol_nb.datasets.TensorImages``), collates one batch from it, and prints the process's peak
resident memory. The array itself is part of the figure: torchvision holds it too.
"""

from __future__ import annotations

import argparse
import resource

import numpy as np
import torch

from byol_nb.datasets import TensorImages

STL10_UNLABELED = (100_000, 3, 96, 96)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32, help="training image size")
    parser.add_argument("--images", type=int, default=STL10_UNLABELED[0])
    args = parser.parse_args()
    shape = (args.images, *STL10_UNLABELED[1:])
    images = np.empty(shape, dtype=np.uint8)
    for start in range(0, len(images), 10_000):  # touched, so that the array is resident
        images[start:start + 10_000] = np.random.default_rng(start).integers(0, 256, (min(10_000, len(images) - start),
                                                                                    *shape[1:]), dtype=np.uint8)
    array_gb = images.nbytes / 1e9
    dataset = TensorImages(images, [-1] * len(images), args.size, classes=[], channels_first=True)
    batch = torch.stack([dataset[i][0] for i in range(256)])
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    print(f"{len(images)} images of {shape[-1]} px resized to {tuple(batch.shape[1:])}: array {array_gb:.2f} GB, "
          f"peak resident memory {peak_gb:.2f} GB")


if __name__ == "__main__":
    main()
