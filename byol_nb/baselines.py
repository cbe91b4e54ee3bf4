"""The baseline self-supervision has to beat: the same ResNet-18 trained with labels, from random
initialisation, on as few labeled images (lesson 06's label-budget figure).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from byol_nb.augment import normalize, resized_crop, sample_crop_boxes
from byol_nb.cpu_speed import speed_up_for_cpu
from byol_nb.datasets import dataset_labels
from byol_nb.features import extract_features
from byol_nb.models import Backbone


def supervised_top1(train: Dataset, test: Dataset, index: Tensor, steps: int = 300, batch_size: int = 64,
                    lr: float = 0.05, seed: int = 0, small_stem: bool = False,
                    device: str | torch.device = "cpu") -> float:
    """Top-1 (%) on ``test`` of a ResNet-18 trained from random initialisation, with labels, on the
    images ``index`` of ``train`` (a draw of :func:`byol_nb.metrics.label_draws`): the baseline
    self-supervision has to beat with as few labels. The images get random crops (35-100% of the
    area) and flips, the geometric part of BYOL's views, and SGD with momentum for ``steps`` steps
    on a cosine schedule."""
    images = torch.stack([train[i][0] for i in range(len(train))])
    labels = torch.as_tensor(dataset_labels(train))
    images, labels = images[index].to(device), labels[index].to(device)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    backbone = Backbone("resnet18", small_stem=small_stem)
    network = nn.Sequential(backbone, nn.Linear(backbone.dim, int(labels.max()) + 1)).to(device)
    if torch.device(device).type == "cpu":
        speed_up_for_cpu(network)  # as the training entry points do on the CPU; see cpu_speed.py
    optimizer = torch.optim.SGD(network.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    size = images.shape[-1]
    network.train()
    for _ in range(steps):
        batch = torch.randint(len(images), (min(batch_size, len(images)),), generator=generator).to(device)
        boxes = sample_crop_boxes(len(batch), (0.35, 1.0), (3 / 4, 4 / 3), device)
        flips = torch.rand(len(batch), device=device) < 0.5
        views = resized_crop(images[batch].float() / 255, boxes, flips, size)
        loss = F.cross_entropy(network(normalize(views)), labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    test_x, test_y = extract_features(network, test, device=device)  # the classifier's logits
    return 100.0 * (test_x.argmax(1) == test_y).float().mean().item()
