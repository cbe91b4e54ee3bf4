"""Scoring a trained backbone on labeled data: kNN and linear probes on a labeled train/test pair,
and a dense (segmentation) probe on the built-in dataset's masks; ``python -m byol_nb.evaluate``
scores a backbone file.

    python -m byol_nb.evaluate --backbone runs/byol/backbone.pt --train data/shapes/train \
        --test data/shapes/test --task knn

prints one JSON line, e.g. ``{"task": "knn", "top1": 71.2, ...}`` (``--task segmentation``:
``{"task": "segmentation", "miou": 41.3, ...}``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import Dataset

from byol_nb.checkpoint import load_backbone, read_backbone_file
from byol_nb.datasets import dataset_labels, open_dataset
from byol_nb.features import extract_feature_maps, extract_features
from byol_nb.images import DataError
from byol_nb.metrics import knn_top1, linear_probe_top1, predict_masks, segmentation_probe, segmentation_scores
from byol_nb.shapes import mask_path

TASKS = ("knn", "linear", "segmentation")


def evaluate_backbone(backbone: nn.Module, train: Dataset, test: Dataset, task: str = "knn",
                      device: str | torch.device = "cpu") -> float:
    """Score a backbone on a labeled train/test pair with ``task`` (knn or linear)."""
    for name, ds in (("train", train), ("test", test)):
        if min(dataset_labels(ds)) < 0:
            raise DataError(f"the {name} images need one sub-folder per class to be scored")
    train_x, train_y = extract_features(backbone, train, device=device)
    test_x, test_y = extract_features(backbone, test, device=device)
    if task == "knn":
        return knn_top1(train_x, train_y, test_x, test_y)
    if task == "linear":
        return linear_probe_top1(train_x, train_y, test_x, test_y)
    raise ValueError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")


def load_mask(path: str | Path, size: int) -> np.ndarray:
    """A label mask (size, size) int64 with the geometry of :func:`byol_nb.data.load_image`: the
    centre square, resized (nearest neighbour, so labels are never blended)."""
    with Image.open(path) as mask:
        width, height = mask.size
        side = min(width, height)
        left, top = (width - side) / 2, (height - side) / 2
        return np.asarray(mask.resize((size, size), Image.Resampling.NEAREST,
                                      box=(left, top, left + side, top + side)), dtype=np.int64)


def dataset_masks(dataset: Dataset, size: int) -> Tensor:
    """The built-in dataset's masks (N, size, size) for the images of an image-folder dataset, in order."""
    files = getattr(dataset, "files", None)
    if files is None:
        raise DataError("--task segmentation needs a folder of the built-in dataset (its masks live next to "
                        "it); generate one with python -m byol_nb.shapes")
    masks = []
    for image in files:
        path = mask_path(image)
        if not path.is_file():
            raise DataError(f"no mask for {str(image)!r} (expected {str(path)!r}): --task segmentation needs "
                            f"the built-in dataset's masks; generate it with python -m byol_nb.shapes")
        masks.append(load_mask(path, size))
    return torch.from_numpy(np.stack(masks))


def segmentation_predictions(dense: nn.Module, train: Dataset, test: Dataset, image_size: int,
                             device: str | torch.device = "cpu") -> tuple[Tensor, Tensor]:
    """The masks (N, S, S) that a linear probe on ``dense``'s frozen feature maps predicts for the
    test images, and their true masks. ``dense`` returns feature maps (``load_backbone(...,
    dense=True)``, ``Backbone.body``); the images must be the built-in dataset's (with masks)."""
    train_masks, test_masks = dataset_masks(train, image_size), dataset_masks(test, image_size)
    head = segmentation_probe(extract_feature_maps(dense, train, device=device), train_masks)
    return predict_masks(head, extract_feature_maps(dense, test, device=device)), test_masks


def evaluate_segmentation(dense: nn.Module, train: Dataset, test: Dataset, image_size: int,
                          device: str | torch.device = "cpu") -> tuple[float, float]:
    """(mean IoU, pixel accuracy) in percent of a linear probe on the frozen feature maps of
    ``dense`` (see :func:`segmentation_predictions`)."""
    return segmentation_scores(*segmentation_predictions(dense, train, test, image_size, device))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m byol_nb.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", required=True, help="backbone.pt written by byol_nb.train")
    parser.add_argument("--train", required=True, help="labeled folder (one sub-folder per class) or cifar10:train")
    parser.add_argument("--test", required=True, help="labeled folder or cifar10:test")
    parser.add_argument("--task", choices=TASKS, default="knn")
    parser.add_argument("--image-size", type=int, default=None,
                        help="resize images to this size (default: the size the backbone was trained at)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    try:
        backbone = load_backbone(args.backbone, dense=args.task == "segmentation").to(args.device)
        size = args.image_size or int(read_backbone_file(args.backbone).get("image_size", 32))
        train, test = open_dataset(args.train, size), open_dataset(args.test, size)
        if args.task == "segmentation":
            miou, accuracy = evaluate_segmentation(backbone, train, test, size, args.device)
            result = {"miou": round(miou, 2), "pixel_accuracy": round(accuracy, 2)}
        else:
            result = {"top1": round(evaluate_backbone(backbone, train, test, args.task, args.device), 2)}
    except (DataError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps({"task": args.task, **result, "backbone": args.backbone, "train": args.train,
                      "test": args.test}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
