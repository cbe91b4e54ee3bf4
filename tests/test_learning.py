"""BYOL learns, and the test can tell: a short run on the built-in shapes beats the same network at
random initialisation by a kNN margin that the method with one piece broken does not reach.

What is measured: kNN top-1 (k = 20, six shape classes, chance 16.7 %) of the backbone's pooled
features, bank = every 5th train image (600), queries = the 600 test images, all at 32 px, after
training minus before training (the same seeded network, scored by the same kNN). The views are cut
from the 64 px train images and resized to 32 px (cut from 32 px images the network learned far
less). One recipe for every case; the breakage is the only difference:

- ``sign``: the loss is ``2 + 2 cos`` (``byol_nb.losses.byol_loss`` patched, the name that
  ``multi_crop_byol_loss`` looks up): the two views of an image are pushed apart.
- ``target_is_online``: ``use_ema=False``, tau = 0: after every step the target is a copy of the
  online network (stop-gradient kept, no moving average).
- ``no_stop_gradient``: ``use_stop_grad=False``: the gradient flows through the target branch too
  and the projections collapse to one point.

So passing means more than "the weights moved": the moving-average target, the stop-gradient and
the loss's direction each matter, and a regression in any of them (or in the augmentations, the
networks, LARS, the EMA schedule) shows up as a gain under the margin.

Why the margin (MARGIN = 10 points). With this recipe the real method gained +17.7 to +28.2 points
on the seeds where it took off (seed 1: +17.7, and +25.5 after the augmentation's random stream
changed), and each broken variant measured (seed 0) lost 5 to 7 points: its kNN fell below the
random network's. 10 points sit about 15 under the chosen seed's gain and over 15 above the broken
variants. The recipe's known weakness: on some seeds (2 of the 7 runs so far) the real method does
not take off within the run and gains about 0, so another seed, or a change to a random stream
(the augmentation's draws), can fail this test without a bug. Every step is seeded (the data, the
views, the batches, the initialisation, two torch threads), so on one machine the result is exact;
SEEDS may list two seeds, whose gains are averaged, to make it sturdier at twice the cost.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import byol_nb.losses
from byol_nb.augment import AugmentConfig
from byol_nb.datasets import ImageFolder
from byol_nb.minimal import train_minimal
from byol_nb.shapes import generate_shapes

SEEDS = (1,)
MARGIN = 10.0  # kNN top-1 points over the same network at random initialisation
BANK_EVERY = 5  # every 5th train image (600) is the kNN bank; the 600 test images are the queries


class Shapes:
    """The training images (64 px, uint8) and the kNN bank and queries (32 px, labelled)."""

    def __init__(self, root: Path) -> None:
        train = ImageFolder(root / "train", image_size=64, cache=False)
        self.images = torch.stack([train[i][0] for i in range(len(train))])
        bank = ImageFolder(root / "train", image_size=32, cache=False)
        queries = ImageFolder(root / "test", image_size=32, cache=False)
        self.bank = [bank[i] for i in range(0, len(bank), BANK_EVERY)]
        self.queries = [queries[i] for i in range(len(queries))]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Shapes:
    root = generate_shapes(tmp_path_factory.mktemp("learning_shapes"), train_per_class=500, test_per_class=100,
                           size=64, seed=0)
    return Shapes(root)


@pytest.fixture(autouse=True)
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def sign_flipped(byol_loss):
    def loss(prediction, target, stop_gradient=True):
        return 4 - byol_loss(prediction, target, stop_gradient)  # 2 + 2 cos: views pushed apart
    return loss


def knn_gain(shapes: Shapes, monkeypatch: pytest.MonkeyPatch, breakage: str | None) -> float:
    """kNN top-1 after training minus before (the same seeded network), averaged over SEEDS."""
    options = {}
    if breakage == "sign":
        monkeypatch.setattr(byol_nb.losses, "byol_loss", sign_flipped(byol_nb.losses.byol_loss))
    elif breakage == "target_is_online":
        options["use_ema"] = False
    elif breakage == "no_stop_gradient":
        options["use_stop_grad"] = False
    else:
        assert breakage is None, breakage
    gains = []
    for seed in SEEDS:
        _, history = train_minimal(
            shapes.images, steps=250, batch_size=64, tau_base=0.7,
            augment=AugmentConfig(32, crop_scale=(0.35, 1.0), jitter=(0.4, 0.4, 0.4, 0.5)),
            optimizer="lars", lr=1.0, weight_decay=1e-3, warmup_steps=25, hidden_dim=256, out_dim=64,
            seed=seed, monitor=(shapes.bank, shapes.queries), monitor_every=250, **options)
        gains.append(history["knn"][-1] - history["knn"][0])
    return sum(gains) / len(gains)


def test_byol_beats_the_random_network_by_the_margin(shapes, monkeypatch):
    gain = knn_gain(shapes, monkeypatch, None)
    assert gain >= MARGIN, f"BYOL gained {gain:+.1f} kNN points, under the margin {MARGIN}"


@pytest.mark.slow
@pytest.mark.parametrize("breakage", ["sign", "target_is_online", "no_stop_gradient"])
def test_a_broken_method_stays_below_the_margin(shapes, monkeypatch, breakage):
    gain = knn_gain(shapes, monkeypatch, breakage)
    assert gain < MARGIN, f"with {breakage} broken the network still gained {gain:+.1f} kNN points"
