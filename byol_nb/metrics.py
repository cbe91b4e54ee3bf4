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


def segmentation_probe(train_x: Tensor, train_masks: Tensor, epochs: int = 30, batch_size: int = 128,
                       lr: float = 1e-2, weight_decay: float = 1e-4) -> nn.Module:
    """A linear 1x1-conv head trained on frozen feature maps (N, C, h, w) against per-pixel labels
    (N, H, W); it maps feature maps to per-pixel class logits at the masks' size.

    Features are standardised per channel (train statistics). The head's logits, one map per class,
    are upsampled bilinearly to the mask size before the per-pixel cross-entropy, so a coarse
    feature map is scored against full-resolution masks.
    """
    mean = train_x.mean((0, 2, 3), keepdim=True)
    std = train_x.std((0, 2, 3), keepdim=True) + 1e-6
    num_classes = int(train_masks.max()) + 1
    generator = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(train_x.shape[1], num_classes, 1)
    with torch.no_grad():
        conv.weight.normal_(0, 0.01, generator=generator)
        conv.bias.zero_()
    head = _SegmentationHead(mean, std, conv, tuple(train_masks.shape[-2:]))
    optimizer = torch.optim.AdamW(conv.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        for index in torch.randperm(len(train_x), generator=generator).split(batch_size):
            optimizer.zero_grad()
            F.cross_entropy(head(train_x[index]), train_masks[index]).backward()
            optimizer.step()
    return head.eval()


class _SegmentationHead(nn.Module):
    def __init__(self, mean: Tensor, std: Tensor, conv: nn.Conv2d, size: tuple[int, int]) -> None:
        super().__init__()
        self.mean, self.std, self.conv, self.size = mean, std, conv, size

    def forward(self, x: Tensor) -> Tensor:
        logits = self.conv((x - self.mean) / self.std)
        return F.interpolate(logits, size=self.size, mode="bilinear", align_corners=False)


@torch.no_grad()
def predict_masks(head: nn.Module, feature_maps: Tensor, batch_size: int = 128) -> Tensor:
    """Per-pixel classes (N, H, W) that a :func:`segmentation_probe` head predicts."""
    return torch.cat([head(x).argmax(1) for x in feature_maps.split(batch_size)])


def segmentation_scores(predicted: Tensor, masks: Tensor) -> tuple[float, float]:
    """(mean IoU, pixel accuracy) in percent of predicted against true per-pixel classes. IoU is
    accumulated over all images per class (background included) and averaged over the classes that
    occur or are predicted."""
    num_classes = int(max(predicted.max(), masks.max())) + 1
    confusion = torch.bincount(masks.flatten() * num_classes + predicted.flatten(),
                               minlength=num_classes**2).view(num_classes, num_classes)
    hits = confusion.diag().double()
    union = confusion.sum(0) + confusion.sum(1) - confusion.diag()
    present = union > 0
    return 100.0 * (hits[present] / union[present]).mean().item(), 100.0 * (hits.sum() / confusion.sum()).item()


def segmentation_probe_miou(train_x: Tensor, train_masks: Tensor, test_x: Tensor, test_masks: Tensor,
                            epochs: int = 30) -> tuple[float, float]:
    """The test set's (mean IoU, pixel accuracy) in percent of a :func:`segmentation_probe` trained
    on the training feature maps and masks."""
    head = segmentation_probe(train_x, train_masks, epochs)
    return segmentation_scores(predict_masks(head, test_x), test_masks)


def collapse_std(projection: Tensor) -> Tensor:
    """Per-dimension std of L2-normalised projections, times sqrt(dim): about 1 for spread-out
    embeddings, 0 when every image maps to the same point (collapse). Pass the global batch (every
    process's projections), so that the value does not depend on how the batch is split."""
    z = F.normalize(projection.float(), dim=1)
    return z.std(dim=0).mean() * math.sqrt(z.shape[1])


def first_per_class(labels: Tensor, per_class: int) -> Tensor:
    """Indices of the first ``per_class`` examples of every class (in the data's order)."""
    return torch.cat([(labels == c).nonzero().flatten()[:per_class] for c in labels.unique()])


def random_per_class(labels: Tensor, per_class: int, generator: torch.Generator) -> Tensor:
    """Indices of ``per_class`` examples of every class, drawn at random: one draw of the labeled
    images of a label-budget experiment (the same draw for every method compared)."""
    return torch.cat([members[torch.randperm(len(members), generator=generator)[:per_class]]
                      for c in labels.unique() for members in [(labels == c).nonzero().flatten()]])


def label_draws(labels: Tensor, budgets: tuple[int, ...], draws: int = 5, seed: int = 0) -> dict[int, list[Tensor]]:
    """For each budget ``n``, ``draws`` random draws of ``n`` labeled images per class (indices into
    ``labels``), the same for every representation and baseline compared; a budget that covers every
    image of a class is drawn once."""
    generator = torch.Generator().manual_seed(seed)
    largest = int(torch.bincount(labels).max())
    return {n: [random_per_class(labels, n, generator) for _ in range(1 if n >= largest else draws)]
            for n in budgets}


def linear_probe_by_labels(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor,
                           budgets: tuple[int, ...] = (1, 5, 10, 50), draws: int = 5,
                           seed: int = 0) -> dict[int, list[float]]:
    """Linear-probe top-1 (%) with only ``n`` labeled training images per class, for each ``n``, one
    score per draw of :func:`label_draws`: how many labels a representation needs, and how much the
    score depends on which images are labeled."""
    return {n: [linear_probe_top1(train_x[index], train_y[index], test_x, test_y) for index in indices]
            for n, indices in label_draws(train_y, budgets, draws, seed).items()}
