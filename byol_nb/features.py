"""Frozen features of a dataset: what every probe, monitor and figure of a trained backbone starts
from. Only torch and the images' normalisation: the plain training loop (:mod:`byol_nb.minimal`)
scores its backbone with these without importing Lightning or the dataset stack.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from byol_nb.augment import normalize


@torch.no_grad()
def extract_features(backbone: nn.Module, dataset: Dataset, batch_size: int = 256,
                     device: str | torch.device = "cpu") -> tuple[Tensor, Tensor]:
    """Pooled features (N, dim) and labels (N,) of a dataset of uint8 images, in eval mode, computed
    on ``device`` (where ``backbone`` lives) and returned on the CPU."""
    was_training = backbone.training
    backbone.eval()
    features, labels = [], []
    for images, targets in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        features.append(backbone(normalize(images.to(device))).float().cpu())
        labels.append(torch.as_tensor(targets))
    backbone.train(was_training)
    return torch.cat(features), torch.cat(labels)


@torch.no_grad()
def extract_feature_maps(dense: nn.Module, dataset: Dataset, batch_size: int = 256,
                         device: str | torch.device = "cpu") -> Tensor:
    """Feature maps (N, dim, H, W) of a dataset of uint8 images, in eval mode, from ``dense``, a
    network that returns maps (``load_backbone(..., dense=True)``, ``Backbone.body``)."""
    was_training = dense.training
    dense.eval()
    maps = [dense(normalize(images.to(device))).float().cpu()
            for images, _ in DataLoader(dataset, batch_size=batch_size, shuffle=False)]
    dense.train(was_training)
    return torch.cat(maps)
