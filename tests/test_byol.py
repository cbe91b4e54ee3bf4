"""BYOL's pieces against hand computations, and the traps public implementations fell into: a target
that is the online network, heads left out of the optimizer, one crop per batch, averaged symmetric
terms, an EMA schedule that restarts on resume, and target BatchNorm statistics that never move."""

from __future__ import annotations

import csv
import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import byol_nb.module
from byol_nb.augment import AugmentConfig, TwoViewAugment, resized_crop, sample_crop_boxes
from byol_nb.config import TrainConfig
from byol_nb.ema import cosine_momentum, ema_update_
from byol_nb.losses import byol_loss, multi_crop_byol_loss, symmetric_byol_loss
from byol_nb.metrics import collapse_std
from byol_nb.models import Backbone, BYOLNetworks
from byol_nb.module import BYOLModule
from byol_nb.optim import LARS, build_optimizer, warmup_cosine


def small_networks() -> BYOLNetworks:
    torch.manual_seed(0)
    return BYOLNetworks(Backbone("resnet18"), hidden_dim=32, out_dim=16)


# ---- loss ---------------------------------------------------------------------------------------
def test_byol_loss_matches_hand_computation():
    p = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    z = torch.tensor([[0.0, 2.0], [2.0, 2.0]])
    # cos = 0 for the first pair (orthogonal), 1 for the second (parallel)
    torch.testing.assert_close(byol_loss(p, z), torch.tensor([2.0, 0.0]))


def test_symmetric_loss_sums_both_directions_not_their_mean():
    torch.manual_seed(0)
    p1, p2, z1, z2 = (torch.randn(4, 8) for _ in range(4))
    one_way = (2 - 2 * F.cosine_similarity(p1, z2)).mean()
    other_way = (2 - 2 * F.cosine_similarity(p2, z1)).mean()
    loss = symmetric_byol_loss(p1, p2, z1, z2)
    torch.testing.assert_close(loss, one_way + other_way)
    # an averaging implementation would give half of this: the gradient would be halved too
    assert not torch.isclose(loss, (one_way + other_way) / 2)


def test_multi_crop_loss_weighs_every_pair_alike_and_is_byol_without_local_views():
    torch.manual_seed(0)
    p1, p2, z1, z2, q1, q2 = (torch.randn(4, 8) for _ in range(6))
    torch.testing.assert_close(multi_crop_byol_loss(p1, p2, z1, z2, ()), symmetric_byol_loss(p1, p2, z1, z2))

    def term(p, z):
        return (2 - 2 * F.cosine_similarity(p, z)).mean()

    # two local views: each predicts both main views' targets; 6 pairs over 1 + 2 online views
    expected = (term(p1, z2) + term(p2, z1) + term(q1, z1) + term(q1, z2) + term(q2, z1) + term(q2, z2)) / 3
    torch.testing.assert_close(multi_crop_byol_loss(p1, p2, z1, z2, (q1, q2)), expected)


def test_loss_of_bf16_heads_is_computed_in_float32():
    """Near agreement (cos ~0.998) a bf16 cosine is off by more than the loss itself."""
    torch.manual_seed(0)
    p = torch.randn(8, 256)
    z = p + 0.05 * torch.randn(8, 256)
    expected = byol_loss(p, z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = byol_loss(p.bfloat16(), z.bfloat16())
    assert loss.dtype == torch.float32
    # only the inputs' own rounding to bf16 remains (about 1e-4 here), not the cosine's (about 1e-2)
    torch.testing.assert_close(loss, expected, atol=5e-4, rtol=0)


def test_loss_is_stop_gradient_on_the_target():
    p = torch.randn(3, 5, requires_grad=True)
    z = torch.randn(3, 5, requires_grad=True)
    byol_loss(p, z).sum().backward()
    assert p.grad is not None and z.grad is None


# ---- target network and EMA -----------------------------------------------------------------
def test_target_is_a_separate_copy_of_the_online_network():
    nets = small_networks()
    online = dict(nets.online.named_parameters())
    for name, target_param in nets.target.named_parameters():
        assert target_param.data_ptr() != online[name].data_ptr(), f"{name} is shared with the online network"
        assert not target_param.requires_grad
        torch.testing.assert_close(target_param, online[name])  # starts as an exact copy


def test_ema_update_formula_for_parameters_and_bn_buffers():
    nets = small_networks()
    with torch.no_grad():  # make the two networks differ
        for p in nets.online.parameters():
            p.add_(torch.randn_like(p))
        for name, b in nets.online.named_buffers():
            if b.is_floating_point():
                b.add_(1.0)
    before = {k: v.clone() for k, v in nets.target.state_dict().items()}
    online = nets.online.state_dict()
    tau = 0.9
    ema_update_(nets.target, nets.online, tau)
    after = nets.target.state_dict()
    for key, value in after.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, tau * before[key] + (1 - tau) * online[key], msg=key)
    bn_mean = "backbone.body.1.running_mean"
    assert not torch.equal(after[bn_mean], before[bn_mean]), "target BN statistics were not updated"


@pytest.mark.parametrize("optimizer", ["lars", "sgd"])
def test_a_training_step_moves_the_target_by_the_ema_formula(optimizer):
    """One Lightning step leaves target = tau target + (1 - tau) online for every parameter and
    BatchNorm buffer, with tau from the schedule, whatever the optimizer; in a second fit too."""
    module = BYOLModule(TrainConfig(image_size=16, proj_hidden=32, proj_dim=16, optimizer=optimizer, tau_base=0.9))
    with torch.no_grad():  # a target that differs from the online network, as after some steps
        for p in module.nets.target.parameters():
            p.add_(torch.randn_like(p))
    images = TensorDataset(torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8), torch.zeros(8, dtype=torch.long))
    for _ in range(2):
        before = {k: v.clone() for k, v in module.nets.target.state_dict().items()}
        pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False).fit(module, DataLoader(images, batch_size=8))
        online, after = module.nets.online.state_dict(), module.nets.target.state_dict()
        for key, value in after.items():
            if value.is_floating_point():
                torch.testing.assert_close(value, 0.9 * before[key] + 0.1 * online[key], msg=key)
        assert not torch.equal(after["backbone.body.0.weight"], before["backbone.body.0.weight"])


def test_target_changes_only_through_the_ema():
    """An optimizer step on the loss moves the online network; the target moves only when the EMA runs."""
    nets = small_networks()
    nets.train()
    optimizer = build_optimizer("sgd", nets, lr=0.1, weight_decay=0.0)
    x = torch.randn(8, 3, 32, 32)
    target_before = [p.clone() for p in nets.target.parameters()]
    online_before = [p.clone() for p in nets.online.parameters()]
    _, z = nets.online(x)
    with torch.no_grad():
        _, t = nets.target(x.flip(-1))
    p = nets.predictor(z)
    symmetric_byol_loss(p[:4], p[4:], t[:4], t[4:]).backward()
    optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(target_before, nets.target.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(online_before, nets.online.parameters()))
    ema_update_(nets.target, nets.online, tau=0.5)
    assert any(not torch.equal(a, b) for a, b in zip(target_before, nets.target.parameters()))


def test_target_running_stats_follow_only_the_ema():
    """The target normalises with batch statistics but its forward does not move its running stats."""
    nets = small_networks()
    nets.train()
    before = nets.target.backbone.body[1].running_mean.clone()
    with torch.no_grad():
        nets.target(torch.randn(4, 3, 32, 32) * 5 + 3)
    torch.testing.assert_close(nets.target.backbone.body[1].running_mean, before)


def test_cosine_momentum_schedule():
    assert cosine_momentum(0, 100, 0.996) == pytest.approx(0.996)
    assert cosine_momentum(50, 100, 0.996) == pytest.approx(0.998)
    assert cosine_momentum(100, 100, 0.996) == pytest.approx(1.0)
    values = [cosine_momentum(k, 100, 0.99) for k in range(101)]
    assert all(a <= b for a, b in zip(values, values[1:]))


def test_momentum_is_read_from_the_global_step_so_a_resumed_run_continues_it():
    """A resumed module (global step restored from the checkpoint) continues the schedule."""

    class FakeTrainer:
        global_step = 0
        max_epochs, max_steps = -1, 200

    module = BYOLModule(TrainConfig(proj_hidden=32, tau_base=0.99))
    module.trainer = FakeTrainer()  # Lightning's public setter; global_step is read through it
    FakeTrainer.global_step = 150
    assert module.current_tau() == pytest.approx(cosine_momentum(150, 200, 0.99))
    assert module.current_tau() > 0.998  # far from tau_base = 0.99, where a restarted schedule would be


# ---- heads and optimizer ------------------------------------------------------------------------
def test_all_online_heads_are_in_the_optimizer_and_target_is_not():
    module = BYOLModule(TrainConfig(proj_hidden=32))
    optimizer = build_optimizer("lars", module.nets, lr=0.1, weight_decay=1e-6)
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for part in (module.nets.online.backbone, module.nets.online.projector, module.nets.predictor):
        assert all(id(p) in optimized for p in part.parameters())
    assert not any(id(p) in optimized for p in module.nets.target.parameters())


def test_lars_skips_adaptation_for_biases_and_scales_weights():
    w = nn.Parameter(torch.ones(4, 4))
    b = nn.Parameter(torch.ones(4))
    w.grad, b.grad = torch.full((4, 4), 2.0), torch.full((4,), 2.0)
    opt = LARS([dict(params=[w]), dict(params=[b], lars=False, weight_decay=0.0)], lr=1.0, momentum=0.0,
               trust_coefficient=0.001)
    opt.step()
    # weight: step = lr * trust * ||w|| / ||g|| * g = 0.001 * 4 / 8 * 2 = 0.001
    torch.testing.assert_close(w.detach(), torch.full((4, 4), 1 - 0.001))
    torch.testing.assert_close(b.detach(), torch.full((4,), 1 - 2.0))


def test_lars_matches_the_per_tensor_formula_over_several_steps():
    """LARS written out tensor by tensor: SGD momentum on trust * (g + wd w), trust = eta ||w|| /
    ||g + wd w|| (1 where a norm is 0), no adaptation for the lars=False group, and no update or
    state for a parameter without a gradient. The learning rate changes every step, as under the
    schedule."""
    torch.manual_seed(0)
    weights = [nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.zeros(2, 2)), nn.Parameter(torch.randn(3, 3))]
    biases = [nn.Parameter(torch.randn(4))]
    reference = [p.detach().clone() for p in weights + biases]
    momenta = [torch.zeros_like(p) for p in reference]
    momentum, wd, eta = 0.9, 0.1, 0.02
    opt = LARS([dict(params=weights), dict(params=biases, lars=False, weight_decay=0.0)], lr=0.5, momentum=momentum,
               weight_decay=wd, trust_coefficient=eta)
    for lr in (0.5, 0.3, 0.1):
        for group in opt.param_groups:
            group["lr"] = lr
        grads = [torch.randn_like(p) for p in reference]
        for p, g in zip(weights + biases, grads):
            p.grad = g.clone()
        weights[2].grad = None  # frozen this step
        opt.step()
        for i, (w, g) in enumerate(zip(reference, grads)):
            if i == 2:
                continue
            if i < 3:
                g = g + wd * w
                w_norm, g_norm = w.norm(), g.norm()
                g = g * (eta * w_norm / g_norm if w_norm > 0 and g_norm > 0 else 1.0)
            momenta[i] = momentum * momenta[i] + g
            w -= lr * momenta[i]
    for p, expected in zip(weights + biases, reference):
        torch.testing.assert_close(p.detach(), expected)
    assert weights[2] not in opt.state


def test_lars_updates_channels_last_weights_like_contiguous_ones():
    """On channels_last weights (and on a momentum buffer restored in another layout) the update
    lands element for element, as on contiguous ones."""
    torch.manual_seed(0)
    plain = nn.Parameter(torch.randn(6, 4, 3, 3))
    last = nn.Parameter(plain.detach().clone().to(memory_format=torch.channels_last))
    optimizers = [LARS([dict(params=[p])], lr=0.5, weight_decay=0.1, trust_coefficient=0.02) for p in (plain, last)]
    for step in range(3):
        grad = torch.randn(6, 4, 3, 3)
        plain.grad, last.grad = grad.clone(), grad.clone().to(memory_format=torch.channels_last)
        for opt in optimizers:
            opt.step()
        if step == 0:  # as if restored from a checkpoint that saved the buffer contiguous
            state = optimizers[1].state[last]
            state["momentum_buffer"] = state["momentum_buffer"].contiguous()
    assert last.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(last.detach(), plain.detach())
    assert not torch.equal(plain.detach(), torch.zeros_like(plain))


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, 10, 100) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(55, 10, 100) == pytest.approx(0.5)
    assert warmup_cosine(100, 10, 100) == pytest.approx(0.0)


# ---- augmentation -------------------------------------------------------------------------------
def test_every_sample_gets_its_own_crop_and_flip():
    torch.manual_seed(0)
    boxes = sample_crop_boxes(64, (0.08, 1.0), (3 / 4, 4 / 3))
    assert len({tuple(b.tolist()) for b in boxes}) == 64
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    assert areas.min() >= 0.08 - 1e-6 and areas.max() <= 1 + 1e-6
    assert boxes.min() >= 0 and boxes.max() <= 1
    augment = TwoViewAugment(AugmentConfig(16))
    same = torch.full((32, 3, 16, 16), 128, dtype=torch.uint8)
    view1, view2 = augment(same, seed=0)
    assert 0 < view1.flips.sum() < 32, "flip decided once per batch"
    # identical inputs, yet the views differ between samples (colour parameters per sample)
    per_sample = view1.images.flatten(1).mean(1)
    assert per_sample.unique().numel() > 16


def test_two_views_use_their_own_recipes_and_seed_is_reproducible():
    augment = TwoViewAugment(AugmentConfig(16))
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    a1, a2 = augment(images, seed=3)
    b1, _ = augment(images, seed=3)
    c1, _ = augment(images, seed=4)
    torch.testing.assert_close(a1.images, b1.images)
    assert not torch.equal(a1.images, c1.images)
    assert not torch.equal(a1.boxes, a2.boxes)


def test_a_seeded_call_seeds_torch_and_leaves_the_global_stream_alone():
    """A seed gives the crops that torch.manual_seed(seed) draws (and the same views every time),
    and the caller's random stream is untouched."""
    augment = TwoViewAugment(AugmentConfig(16))
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        expected_boxes = sample_crop_boxes(8, augment.config.crop_scale, augment.config.crop_ratio)
    state = torch.get_rng_state()
    got = augment(images, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(got[0].boxes, expected_boxes)
    for view, again in zip(got, augment(images, seed=3)):
        assert torch.equal(view.images, again.images) and torch.equal(view.boxes, again.boxes)


def test_local_views_are_small_per_sample_reproducible_and_leave_the_main_views_alone():
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    plain = TwoViewAugment(AugmentConfig(16))
    multi = TwoViewAugment(AugmentConfig(16, local_views=3, local_size=8, local_crop_scale=(0.05, 0.3)))
    for a, b in zip(plain(images, seed=5), multi(images, seed=5)):
        torch.testing.assert_close(a.images, b.images)
    local = multi.local_views(images, seed=5)
    assert len(local) == 3 and all(v.images.shape == (8, 3, 8, 8) for v in local)
    areas = torch.cat([(v.boxes[:, 2] - v.boxes[:, 0]) * (v.boxes[:, 3] - v.boxes[:, 1]) for v in local])
    assert areas.min() >= 0.05 - 1e-6 and areas.max() <= 0.3 + 1e-6
    assert len({tuple(b.tolist()) for v in local for b in v.boxes}) == 24, "one box per sample and view"
    again = multi.local_views(images, seed=5)
    for a, b in zip(local, again):
        torch.testing.assert_close(a.images, b.images)
    assert not torch.equal(local[0].images, multi.local_views(images, seed=6)[0].images)


def test_training_step_feeds_local_views_to_the_online_network_only():
    module = BYOLModule(TrainConfig(image_size=16, proj_hidden=32, proj_dim=16, local_views=2, local_size=8))
    sizes: dict[str, list] = {"online": [], "target": []}
    for name in sizes:
        getattr(module.nets, name).register_forward_hook(
            lambda _, inputs, __, name=name: sizes[name].append(tuple(inputs[0].shape)))
    images = TensorDataset(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), torch.zeros(4, dtype=torch.long))
    pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False).fit(module, DataLoader(images, batch_size=4))
    assert sizes == {"online": [(8, 3, 16, 16), (8, 3, 8, 8)], "target": [(8, 3, 16, 16)]}


def test_monitors_are_computed_and_logged_only_on_the_steps_the_loggers_write(tmp_path, monkeypatch):
    """collapse_std (which gathers across processes), tau and lr: every log_every_n_steps steps, on
    exactly the steps Lightning writes to metrics.csv; the loss every step."""
    from pytorch_lightning.loggers import CSVLogger

    computed = []
    monkeypatch.setattr(byol_nb.module, "collapse_std", lambda z: (computed.append(1), collapse_std(z))[1])
    module = BYOLModule(TrainConfig(image_size=16, proj_hidden=32, proj_dim=16))
    images = TensorDataset(torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8), torch.zeros(8, dtype=torch.long))
    pl.Trainer(max_steps=6, accelerator="cpu", logger=CSVLogger(tmp_path, name="", version=""), log_every_n_steps=3,
               enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False).fit(module, DataLoader(images, batch_size=4))
    with open(tmp_path / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [int(r["step"]) for r in rows] == [2, 5]
    assert all(r["train/collapse_std"] and r["train/tau"] and r["train/lr"] and r["train/loss"] for r in rows)
    assert len(computed) == 2


def coordinate_image(size: int) -> torch.Tensor:
    """A float image whose channel 0 holds each pixel centre's x and channel 1 its y, in [0, 1]."""
    centres = (torch.arange(size) + 0.5) / size
    y, x = torch.meshgrid(centres, centres, indexing="ij")
    return torch.stack([x, y, torch.zeros_like(x)]).unsqueeze(0)


@pytest.mark.parametrize("flip", [False, True])
def test_crop_boxes_locate_each_view_in_the_original(flip):
    """Each view pixel shows the original point that the box (and flip) says it should."""
    size, out = 64, 16
    image = coordinate_image(size).repeat(4, 1, 1, 1)
    torch.manual_seed(1)
    boxes = sample_crop_boxes(4, (0.2, 1.0), (3 / 4, 4 / 3))
    flips = torch.full((4,), flip)
    view = resized_crop(image, boxes, flips, out)
    u = (torch.arange(out) + 0.5) / out
    for i, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        expected_x = x1 - u * (x1 - x0) if flip else x0 + u * (x1 - x0)
        expected_y = y0 + u * (y1 - y0)
        # bilinear interpolation of a linear ramp is exact away from the border
        torch.testing.assert_close(view[i, 0, 3], expected_x, atol=1 / size, rtol=0)
        torch.testing.assert_close(view[i, 1, :, 3], expected_y, atol=1 / size, rtol=0)


def test_augment_returns_views_boxes_and_flips_for_a_uint8_batch():
    augment = TwoViewAugment(AugmentConfig(24))
    v1, v2 = augment(torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8), seed=0)
    for v in (v1, v2):
        assert v.images.shape == (5, 3, 24, 24) and v.images.dtype == torch.float32
        assert v.boxes.shape == (5, 4) and v.flips.shape == (5,) and v.flips.dtype == torch.bool
        assert torch.isfinite(v.images).all()


def test_collapse_monitor_detects_collapse():
    spread = torch.randn(256, 64)
    collapsed = torch.ones(256, 64) + 1e-4 * torch.randn(256, 64)
    assert collapse_std(spread) == pytest.approx(1.0, abs=0.15)
    assert collapse_std(collapsed) < 0.05
    assert math.isfinite(float(collapse_std(collapsed)))
