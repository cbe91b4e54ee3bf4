"""The evaluation of a backbone beyond kNN: labels per class, the supervised baseline, predicted masks."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

from byol_nb.baselines import supervised_top1
from byol_nb.evaluate import segmentation_predictions
from byol_nb.metrics import first_per_class, label_draws, linear_probe_by_labels, segmentation_scores
from byol_nb.models import Backbone


class Images(Dataset):
    def __init__(self, pixels: torch.Tensor, labels: list[int]) -> None:
        self.pixels, self.labels = pixels, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.pixels[index], self.labels[index]


def test_first_per_class_takes_the_first_n_of_every_class():
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 2, 2])
    assert first_per_class(labels, 2).tolist() == [0, 2, 1, 4, 3, 6]
    assert first_per_class(labels, 10).numel() == 8


def test_more_labels_per_class_do_not_hurt_a_linear_probe_on_clear_features():
    torch.manual_seed(0)
    labels = torch.arange(3).repeat(40)
    features = torch.nn.functional.one_hot(labels, 3).float() + 0.3 * torch.randn(120, 3)
    scores = linear_probe_by_labels(features[:90], labels[:90], features[90:], labels[90:], budgets=(1, 20, 30),
                                    draws=4)
    assert set(scores) == {1, 20, 30} and [len(scores[n]) for n in (1, 20, 30)] == [4, 4, 1]  # 30: every image
    assert min(scores[20]) >= sum(scores[1]) / 4 and min(scores[20]) > 80


def test_label_draws_are_random_per_class_and_the_same_for_every_caller():
    labels = torch.arange(4).repeat(10)
    a, b = label_draws(labels, (2, 10), draws=3, seed=5), label_draws(labels, (2, 10), draws=3, seed=5)
    assert all(torch.equal(x, y) for n in a for x, y in zip(a[n], b[n]))
    assert all(torch.bincount(labels[index]).tolist() == [2, 2, 2, 2] for index in a[2])
    assert len({tuple(index.tolist()) for index in a[2]}) == 3 and len(a[10]) == 1


def test_supervised_baseline_learns_what_the_labels_say():
    """Dark images are class 0, bright ones class 1: a few steps of supervised training find it."""
    torch.manual_seed(0)
    pixels = torch.cat([torch.randint(0, 60, (20, 3, 16, 16)), torch.randint(190, 256, (20, 3, 16, 16))]).to(torch.uint8)
    data = Images(pixels, [0] * 20 + [1] * 20)
    index = label_draws(torch.tensor(data.labels), (5,), draws=1)[5][0]
    assert supervised_top1(data, data, index, steps=80, batch_size=10) == 100.0


def test_predicted_masks_have_the_masks_shape_and_the_background_baseline_is_scored(tiny_shapes):
    from byol_nb.datasets import ImageFolder

    train, test = ImageFolder(tiny_shapes / "train", 32), ImageFolder(tiny_shapes / "test", 32)
    torch.manual_seed(0)
    predicted, masks = segmentation_predictions(Backbone("resnet18", small_stem=True).body, train, test, 32)
    assert predicted.shape == masks.shape == (len(test), 32, 32)
    background_only = torch.zeros_like(masks)
    miou, accuracy = segmentation_scores(background_only, masks)
    assert accuracy == pytest.approx(100.0 * (masks == 0).float().mean().item())
    assert miou < accuracy  # the shapes' classes score 0
