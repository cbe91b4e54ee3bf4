"""LARS (the paper's and solo-learn's clipped variant) and the target's EMA against their formulas
written out tensor by tensor in float64, with the cases a vectorised implementation can get wrong:
zero weights, parameters without gradients, a learning rate that changes every step, channels_last
weights, momentum buffers restored from a checkpoint, and integer buffers."""

from __future__ import annotations

import io

import pytest
import torch
from torch import Tensor, nn

from byol_nb.ema import ema_update_
from byol_nb.models import Backbone, BYOLNetworks
from byol_nb.optim import LARS, build_optimizer, parameter_groups

MOMENTUM, WD, ETA = 0.9, 0.1, 0.02
LRS = (0.5, 0.05, 0.002, 0.3)  # as a schedule moves it: the clip is active at some steps, not at others


def reference_lars(w: Tensor, b: Tensor, g: Tensor, lr: float, wd: float, lars: bool, clip: bool) -> float:
    """One step of LARS on one tensor, in place on ``w`` and its momentum buffer ``b``; returns the
    trust ratio before the clip (1 for a tensor without adaptation)."""
    d = g + wd * w
    ratio = torch.tensor(1.0, dtype=torch.float64)
    if lars and w.norm() > 0 and d.norm() > 0:
        ratio = ETA * w.norm() / d.norm()
    if lars and clip:
        d = d * torch.clamp(ratio / lr, max=1.0)
    elif lars:
        d = d * ratio
    b.mul_(MOMENTUM).add_(d)
    w.sub_(lr * b)
    return float(ratio)


def lars_parameters() -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Weights (a channels_last conv, a zero matrix, a matrix that is frozen on some steps) and biases."""
    torch.manual_seed(0)
    weights = [nn.Parameter(torch.randn(6, 4, 3, 3, dtype=torch.float64).to(memory_format=torch.channels_last)),
               nn.Parameter(torch.zeros(2, 2, dtype=torch.float64)),
               nn.Parameter(torch.randn(5, 3, dtype=torch.float64) * 10)]
    biases = [nn.Parameter(torch.randn(4, dtype=torch.float64)), nn.Parameter(torch.randn(6, dtype=torch.float64))]
    return weights, biases


@pytest.mark.parametrize("clip", [False, True], ids=["paper", "clip"])
def test_lars_matches_the_float64_formula_tensor_by_tensor(clip):
    """Several steps with the learning rate changed between them; the biases' group decays without
    adaptation; a parameter without a gradient is neither moved nor given state."""
    weights, biases = lars_parameters()
    frozen = weights[2]
    opt = LARS([dict(params=weights), dict(params=biases, lars=False)], lr=LRS[0], momentum=MOMENTUM,
               weight_decay=WD, trust_coefficient=ETA, clip=clip)
    params = weights + biases
    reference = [p.detach().clone() for p in params]
    buffers = [torch.zeros_like(p) for p in params]
    generator = torch.Generator().manual_seed(1)
    clipped = []
    for step, lr in enumerate(LRS):
        for group in opt.param_groups:
            group["lr"] = lr
        grads = [torch.randn(p.shape, dtype=torch.float64, generator=generator) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        if step < 2:
            frozen.grad = None
        opt.step()
        for i, (p, w, b, g) in enumerate(zip(params, reference, buffers, grads)):
            if p is frozen and step < 2:
                continue
            ratio = reference_lars(w, b, g, lr, WD, lars=i < len(weights), clip=clip)
            if i < len(weights):
                clipped.append(ratio > lr)
            torch.testing.assert_close(p.detach(), w, rtol=1e-12, atol=1e-14, msg=f"tensor {i}, step {step}")
            torch.testing.assert_close(opt.state[p]["momentum_buffer"], b, rtol=1e-12, atol=1e-14)
        if step == 0:
            assert frozen not in opt.state
    assert any(clipped) and not all(clipped), "the steps must exercise the clip both active and inactive"
    assert weights[0].is_contiguous(memory_format=torch.channels_last)


def test_lars_moves_a_zero_weight_by_its_plain_update():
    """||w|| = 0 gives the ratio 1 (not 0, which would freeze the tensor at zero for ever)."""
    w = nn.Parameter(torch.zeros(3, 3, dtype=torch.float64))
    w.grad = torch.ones(3, 3, dtype=torch.float64)
    LARS([w], lr=0.1, momentum=0.0, weight_decay=WD, trust_coefficient=ETA).step()
    torch.testing.assert_close(w.detach(), torch.full((3, 3), -0.1, dtype=torch.float64))


def test_clipped_lars_at_a_zero_learning_rate_keeps_finite_momentum():
    """At lr = 0 (where a schedule may end) ratio / lr is infinite and clips to 1: the weight stays
    and the momentum buffer receives the plain update, not inf or NaN."""
    w = nn.Parameter(torch.ones(2, 2, dtype=torch.float64))
    w.grad = torch.full((2, 2), 3.0, dtype=torch.float64)
    opt = LARS([w], lr=0.0, momentum=MOMENTUM, trust_coefficient=ETA, clip=True)
    opt.step()
    torch.testing.assert_close(w.detach(), torch.ones(2, 2, dtype=torch.float64))
    torch.testing.assert_close(opt.state[w]["momentum_buffer"], torch.full((2, 2), 3.0, dtype=torch.float64))


def test_lars_resumed_from_its_state_dict_continues_the_same_trajectory():
    """The momentum buffers live in the optimizer's state under PyTorch's SGD key: a fresh optimizer
    loaded from a state dict takes the same next step as the one that kept running."""
    weights, biases = lars_parameters()
    copies = [nn.Parameter(p.detach().clone()) for p in weights + biases]

    def make(params):
        n = len(weights)
        return LARS([dict(params=params[:n]), dict(params=params[n:], lars=False, weight_decay=0.0)], lr=0.1,
                    momentum=MOMENTUM, weight_decay=WD, trust_coefficient=ETA, clip=True)

    running = make(weights + biases)
    generator = torch.Generator().manual_seed(2)
    grads = [[torch.randn(p.shape, dtype=torch.float64, generator=generator) for p in copies] for _ in range(2)]
    for p, g in zip(weights + biases, grads[0]):
        p.grad = g.clone()
    running.step()
    with torch.no_grad():
        for c, p in zip(copies, weights + biases):
            c.copy_(p)
    resumed = make(copies)
    saved = io.BytesIO()
    torch.save(running.state_dict(), saved)
    saved.seek(0)
    resumed.load_state_dict(torch.load(saved))
    for params, opt in ((weights + biases, running), (copies, resumed)):
        for p, g in zip(params, grads[1]):
            p.grad = g.clone()
        opt.step()
    for p, c in zip(weights + biases, copies):
        torch.testing.assert_close(c.detach(), p.detach(), rtol=0, atol=0)


def test_lars_loads_a_state_dict_saved_before_clip_existed():
    """A checkpoint's optimizer groups replace the new ones when loaded: the options they lack take
    their defaults, so an older run resumes with the paper's LARS."""
    weights, biases = lars_parameters()
    opt = LARS([dict(params=weights), dict(params=biases, lars=False)], lr=0.1, trust_coefficient=ETA, clip=True)
    old = opt.state_dict()
    for group in old["param_groups"]:
        del group["clip"]
    opt.load_state_dict(old)
    assert not any(group["clip"] for group in opt.param_groups)
    for p in weights + biases:
        p.grad = torch.ones_like(p)
    opt.step()


def test_lars_keeps_to_the_formula_with_a_momentum_buffer_restored_in_another_layout():
    """A channels_last weight whose momentum buffer comes back contiguous (as a checkpoint written
    elsewhere may give it) still gets the float64 formula, and stays channels_last."""
    weights, biases = lars_parameters()
    opt = LARS([dict(params=weights), dict(params=biases, lars=False)], lr=0.1, momentum=MOMENTUM, weight_decay=WD,
               trust_coefficient=ETA)
    reference = [p.detach().clone() for p in weights + biases]
    buffers = [torch.zeros_like(p) for p in reference]
    generator = torch.Generator().manual_seed(3)
    for step in range(3):
        grads = [torch.randn(p.shape, dtype=torch.float64, generator=generator) for p in reference]
        for p, g in zip(weights + biases, grads):
            p.grad = g.clone()
        opt.step()
        for i, (w, b, g) in enumerate(zip(reference, buffers, grads)):
            reference_lars(w, b, g, 0.1, WD, lars=i < len(weights), clip=False)
        if step == 0:
            state = opt.state[weights[0]]
            state["momentum_buffer"] = state["momentum_buffer"].contiguous()
    for p, w in zip(weights + biases, reference):
        torch.testing.assert_close(p.detach(), w, rtol=1e-12, atol=1e-14)
    assert weights[0].is_contiguous(memory_format=torch.channels_last)


def test_lars_step_reads_no_value_on_the_host(monkeypatch):
    """Each read of a device value is a GPU synchronisation: the step makes none, clip included."""
    reads = []
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _name=name, _original=original, **k: (
            reads.append(_name), _original(self, *a, **k))[1])
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    opt = LARS(parameter_groups(model, WD), lr=0.1, weight_decay=WD, trust_coefficient=ETA, clip=True)
    model(torch.randn(4, 4)).sum().backward()
    reads.clear()
    for _ in range(2):
        opt.step()
    assert reads == []


def test_build_optimizer_passes_the_trust_coefficient_and_clip_to_lars():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
    opt = build_optimizer("lars", model, lr=1.0, weight_decay=1e-5, trust_coefficient=0.02, clip=True)
    lars_group, plain_group = opt.param_groups
    assert (lars_group["trust_coefficient"], lars_group["clip"], lars_group["lars"]) == (0.02, True, True)
    assert not plain_group["lars"] and plain_group["weight_decay"] == 0.0
    defaults = build_optimizer("lars", model, lr=1.0, weight_decay=1e-5).defaults
    assert (defaults["trust_coefficient"], defaults["clip"]) == (0.001, False)


# ---- EMA ----------------------------------------------------------------------------------------
def test_ema_update_is_exactly_the_per_tensor_lerp_for_parameters_and_float_buffers():
    """Bit for bit ``t.lerp_(o, 1 - tau)`` on every parameter and float buffer of a channels_last
    BYOL network, and a copy of the integer ones (BatchNorm's batch counters)."""
    torch.manual_seed(0)
    nets = BYOLNetworks(Backbone("resnet18", small_stem=True), 32, 16).to(memory_format=torch.channels_last)
    with torch.no_grad():
        for p in nets.online.parameters():
            p.add_(torch.randn_like(p))
        for b in nets.online.buffers():
            b.add_(torch.rand_like(b) if b.is_floating_point() else 3)
    tau = 0.99
    expected = {k: (v.lerp(nets.online.state_dict()[k], 1 - tau) if v.is_floating_point()
                    else nets.online.state_dict()[k].clone()) for k, v in nets.target.state_dict().items()}
    ema_update_(nets.target, nets.online, tau)
    after = nets.target.state_dict()
    assert any(not v.is_floating_point() for v in after.values())
    for key, value in after.items():
        assert torch.equal(value, expected[key]), key
    assert nets.target.backbone.body[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_ema_update_rejects_networks_of_different_architectures():
    with pytest.raises(ValueError, match="different parameter lists"):
        ema_update_(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), 0.9)
