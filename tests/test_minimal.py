"""The plain-PyTorch BYOL loop the lessons use for ablations (byol_nb.minimal)."""

from __future__ import annotations

import math

import pytest
import torch

from byol_nb.augment import AugmentConfig
from byol_nb.losses import byol_loss
from byol_nb.minimal import train_minimal


@pytest.fixture()
def images() -> torch.Tensor:
    return torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_history_and_schedule(images):
    _, history = train_minimal(images, steps=3, batch_size=4, hidden_dim=16, out_dim=8)
    assert set(history) == {"loss", "collapse_std", "tau"}
    assert all(len(v) == 3 for v in history.values())
    assert history["tau"][0] == pytest.approx(0.99) and history["tau"][-1] > history["tau"][0]


def test_without_ema_the_target_is_a_copy_of_the_online_network(images):
    nets, history = train_minimal(images, steps=2, batch_size=4, hidden_dim=16, out_dim=8, use_ema=False)
    assert history["tau"] == [0.0, 0.0]
    for t, o in zip(nets.target.parameters(), nets.online.parameters()):
        torch.testing.assert_close(t, o)
        assert t.data_ptr() != o.data_ptr()


def test_without_predictor_the_predictor_does_not_move(images):
    torch.manual_seed(0)
    nets, _ = train_minimal(images, steps=2, batch_size=4, hidden_dim=16, out_dim=8, use_predictor=False)
    nets_ref, _ = train_minimal(images, steps=0, batch_size=4, hidden_dim=16, out_dim=8)
    for a, b in zip(nets.predictor.parameters(), nets_ref.predictor.parameters()):
        torch.testing.assert_close(a, b)


def test_rejects_float_images():
    with pytest.raises(ValueError, match="uint8"):
        train_minimal(torch.rand(4, 3, 16, 16), steps=1)


def test_knn_monitor_scores_before_during_and_after(images):
    labeled = torch.utils.data.TensorDataset(images, torch.arange(8) % 2)
    labeled.labels = (torch.arange(8) % 2).tolist()
    _, history = train_minimal(images, steps=3, batch_size=4, hidden_dim=16, out_dim=8,
                               monitor=(labeled, labeled), monitor_every=2)
    assert history["knn_step"] == [0, 2, 3]
    assert all(0 <= v <= 100 for v in history["knn"])


def test_without_stop_gradient_the_gradient_flows_through_both_branches():
    p, z = torch.randn(3, 5, requires_grad=True), torch.randn(3, 5, requires_grad=True)
    byol_loss(p, z, stop_gradient=False).sum().backward()
    assert p.grad is not None and z.grad is not None and z.grad.abs().sum() > 0


def test_the_ablations_and_the_course_recipe_train(images):
    recipe = AugmentConfig(16, crop_scale=(0.35, 1.0), jitter=(0.4, 0.4, 0.4, 0.5))
    for switches in ({"use_stop_grad": False}, {"augment": recipe, "optimizer": "lars", "lr": 1.0, "warmup_steps": 1}):
        _, history = train_minimal(images, steps=3, batch_size=4, hidden_dim=16, out_dim=8, **switches)
        assert len(history["loss"]) == 3 and all(math.isfinite(v) for v in history["loss"])
