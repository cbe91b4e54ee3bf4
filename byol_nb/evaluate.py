"""Frozen-feature evaluation: kNN and linear probe on a labeled train/test pair.

    python -m byol_nb.evaluate --backbone runs/byol/backbone.pt --train data/shapes/train \
        --test data/shapes/test --task knn

prints one JSON line, e.g. ``{"task": "knn", "top1": 71.2, ...}``.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from byol_nb.augment import normalize
from byol_nb.data import DataError, dataset_labels, open_dataset

TASKS = ("knn", "linear")


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
        score = evaluate_backbone(backbone, open_dataset(args.train, size), open_dataset(args.test, size),
                                  args.task, args.device)
    except (DataError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps({"task": args.task, "top1": round(score, 2), "backbone": args.backbone,
                      "train": args.train, "test": args.test}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
