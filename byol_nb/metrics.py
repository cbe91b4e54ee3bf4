"""Scores of learned features: the kNN and linear probes (classification), the linear
segmentation probe (per pixel) and the collapse monitor. Functions of feature tensors only: how
the features are extracted from a dataset is :mod:`byol_nb.evaluate`'s job.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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


def collapse_std(projection: Tensor) -> Tensor:
    """Per-dimension std of L2-normalised projections, times sqrt(dim): about 1 for spread-out
    embeddings, 0 when every image maps to the same point (collapse). Pass the global batch (every
    process's projections), so that the value does not depend on how the batch is split."""
    z = F.normalize(projection.float(), dim=1)
    return z.std(dim=0).mean() * math.sqrt(z.shape[1])
