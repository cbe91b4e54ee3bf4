"""Frozen-feature evaluation: kNN and linear probe on a labeled train/test pair, and a dense
(segmentation) probe on the built-in dataset's masks.

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
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from byol_nb.augment import normalize
from byol_nb.data import DataError, dataset_labels, open_dataset
from byol_nb.shapes import mask_path

TASKS = ("knn", "linear", "segmentation")


@torch.no_grad()
def extract_features(backbone: nn.Module, dataset: Dataset, batch_size: int = 256,
                     device: str | torch.device = "cpu") -> tuple[Tensor, Tensor]:
    """Pooled features (N, dim) and labels (N,) of a dataset of uint8 images, in eval mode."""
    was_training = backbone.training
    backbone.eval()
    features, labels = [], []
    for images, targets in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        features.append(backbone(normalize(images.to(device))).float().cpu())
        labels.append(torch.as_tensor(targets))
    backbone.train(was_training)
    return torch.cat(features), torch.cat(labels)


def knn_classify(bank: Tensor, bank_labels: Tensor, queries: Tensor, k: int = 20,
                 temperature: float = 0.1, num_classes: int | None = None) -> Tensor:
    """Weighted kNN on cosine similarity (Wu et al. 2018): each of the ``k`` nearest bank features
    votes for its class with weight ``exp(sim / temperature)``. Returns predicted labels (Q,)."""
    num_classes = num_classes or int(bank_labels.max()) + 1
    bank, queries = F.normalize(bank.float(), dim=1), F.normalize(queries.float(), dim=1)
    k = min(k, bank.shape[0])
    predictions = []
    for chunk in queries.split(1024):
        similarity, index = (chunk @ bank.T).topk(k, dim=1)
        votes = torch.zeros(chunk.shape[0], num_classes, device=chunk.device)
        votes.scatter_add_(1, bank_labels[index], (similarity / temperature).exp())
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)


def knn_top1(bank: Tensor, bank_labels: Tensor, queries: Tensor, query_labels: Tensor, k: int = 20,
             temperature: float = 0.1) -> float:
    """kNN top-1 accuracy in percent."""
    num_classes = int(max(bank_labels.max(), query_labels.max())) + 1
    predicted = knn_classify(bank, bank_labels, queries, k, temperature, num_classes)
    return 100.0 * (predicted == query_labels).float().mean().item()


def linear_probe_top1(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor,
                      epochs: int = 200, lr: float = 0.05, weight_decay: float = 1e-4) -> float:
    """Top-1 (percent) of a linear classifier trained with AdamW on frozen, standardised features.

    Full-batch training on features in memory: seconds on a CPU for a few thousand images.
    """
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    generator = torch.Generator().manual_seed(0)
    head = nn.Linear(train_x.shape[1], num_classes)
    with torch.no_grad():
        head.weight.normal_(0, 0.01, generator=generator)
        head.bias.zero_()
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        optimizer.zero_grad()
        F.cross_entropy(head(train_x), train_y).backward()
        optimizer.step()
    with torch.no_grad():
        return 100.0 * (head(test_x).argmax(1) == test_y).float().mean().item()


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


@torch.no_grad()
def extract_feature_maps(backbone: nn.Module, dataset: Dataset, batch_size: int = 256,
                         device: str | torch.device = "cpu") -> Tensor:
    """Last feature maps (N, dim, H, W) of a dataset of uint8 images, in eval mode.

    ``backbone`` is a :class:`byol_nb.models.Backbone` (anything with ``feature_map``).
    """
    was_training = backbone.training
    backbone.eval()
    maps = [backbone.feature_map(normalize(images.to(device))).float().cpu()
            for images, _ in DataLoader(dataset, batch_size=batch_size, shuffle=False)]
    backbone.train(was_training)
    return torch.cat(maps)


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


def segmentation_probe_miou(train_x: Tensor, train_masks: Tensor, test_x: Tensor, test_masks: Tensor,
                            epochs: int = 30, batch_size: int = 128, lr: float = 1e-2,
                            weight_decay: float = 1e-4) -> tuple[float, float]:
    """Train a linear 1x1-conv head on frozen feature maps against per-pixel labels; return the
    test set's (mean IoU, pixel accuracy), both in percent.

    Features are standardised per channel (train statistics). The head's logits, one map per class,
    are upsampled bilinearly to the mask size before the per-pixel cross-entropy, so a coarse
    feature map is scored against full-resolution masks. IoU is accumulated over the whole test set
    per class (background included) and averaged over classes that occur in it or are predicted.
    """
    mean = train_x.mean((0, 2, 3), keepdim=True)
    std = train_x.std((0, 2, 3), keepdim=True) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    num_classes = int(max(train_masks.max(), test_masks.max())) + 1
    size = tuple(train_masks.shape[-2:])
    generator = torch.Generator().manual_seed(0)
    head = nn.Conv2d(train_x.shape[1], num_classes, 1)
    with torch.no_grad():
        head.weight.normal_(0, 0.01, generator=generator)
        head.bias.zero_()
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)

    def logits(x: Tensor) -> Tensor:
        return F.interpolate(head(x), size=size, mode="bilinear", align_corners=False)

    for _ in range(epochs):
        for index in torch.randperm(len(train_x), generator=generator).split(batch_size):
            optimizer.zero_grad()
            F.cross_entropy(logits(train_x[index]), train_masks[index]).backward()
            optimizer.step()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    with torch.no_grad():
        for x, y in zip(test_x.split(batch_size), test_masks.split(batch_size)):
            predicted = logits(x).argmax(1)
            confusion += torch.bincount(y.flatten() * num_classes + predicted.flatten(),
                                        minlength=num_classes**2).view(num_classes, num_classes)
    hits = confusion.diag().double()
    union = confusion.sum(0) + confusion.sum(1) - confusion.diag()
    present = union > 0
    miou = 100.0 * (hits[present] / union[present]).mean().item()
    return miou, 100.0 * (hits.sum() / confusion.sum()).item()


def evaluate_segmentation(backbone: nn.Module, train: Dataset, test: Dataset, image_size: int,
                          device: str | torch.device = "cpu") -> tuple[float, float]:
    """(mean IoU, pixel accuracy) in percent of a linear probe on ``backbone``'s frozen feature maps."""
    train_masks, test_masks = dataset_masks(train, image_size), dataset_masks(test, image_size)
    train_x = extract_feature_maps(backbone, train, device=device)
    test_x = extract_feature_maps(backbone, test, device=device)
    return segmentation_probe_miou(train_x, train_masks, test_x, test_masks)


def main(argv: list[str] | None = None) -> int:
    from byol_nb.checkpoint import load_backbone, read_backbone_file

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
        backbone = load_backbone(args.backbone).to(args.device)
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
