"""Optimizers and the learning-rate schedule.

The learning rate is given per 256 images and scaled with the *global* batch (all processes and
nodes), so a run keeps its dynamics when it moves to more GPUs. The schedule is per optimizer step:
linear warmup, then cosine decay to zero.
"""

from __future__ import annotations

import math
from typing import Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn

OPTIMIZERS = ("lars", "sgd", "adamw")


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as used by BYOL: SGD with momentum whose step for each weight matrix
    is rescaled by ``trust * ||w|| / ||g + wd w||``. Parameter groups with ``lars=False`` (biases
    and normalisation layers) get neither the rescaling nor weight decay, as in the paper.
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, compiled: bool = False) -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, lars=True)
        super().__init__(params, defaults)
        # torch.compile fuses lars_update_ into two passes per tensor; the eager path below makes
        # nine with PyTorch's own kernels. Both compute the same update (tests/test_byol.py).
        if compiled and any(p.device.type == "cpu" for group in self.param_groups for p in group["params"]):
            check_compiler()
        self._compiled_update = torch.compile(torch.no_grad()(lars_update_)) if compiled else None

    @torch.no_grad()
    def step(self, closure=None, follow: Mapping[Tensor, Tensor] | None = None,  # type: ignore[override]
             follow_weight: float = 0.0):
        """One update of every parameter with a gradient.

        The step is memory-bound (each pass over ResNet-18's weights moves 50 MB), so it makes as
        few passes as it can: the dot products ``<w, w>``, ``<g, g>`` and ``<g, w>`` give ``||w||`` and
        ``||g + wd w||`` without forming ``g + wd w``; then PyTorch's fused SGD kernel applies
        weight decay, momentum and the update in one pass per tensor, with the trust ratio folded
        into its gradient scale and weight decay: nine passes instead of fifteen. On CPU each
        tensor's dot products, update and follow (below) run back to back, so all but the first
        pass find it in cache (timings in BENCHMARKS.md). Like apex's LARC, ``p.grad`` may be
        rescaled in place.

        ``follow`` maps parameters to tensors that trail them, BYOL's target network:
        ``follow[p].lerp_(p, follow_weight)`` right after ``p``'s update, while the new weights are
        still in cache, instead of in a pass of its own after the step (the EMA update, with
        ``follow_weight = 1 - tau``). Every parameter of this optimizer that ``follow`` names is
        followed, including those without a gradient this step.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        follow = follow or {}
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            _follow([(follow[p], p) for p in group["params"] if p.grad is None and p in follow], follow_weight)
            if not params:
                continue
            followers = [follow.get(p) for p in params]
            if self._compiled_update is not None:
                device = params[0].device
                self._compiled_update(params, [p.grad for p in params], self._momentum_buffers(params),
                                      torch.tensor(group["lr"], device=device), group["momentum"],
                                      group["weight_decay"], group["trust_coefficient"], group["lars"],
                                      followers, torch.tensor(follow_weight, device=device))
                continue
            buffers = self._momentum_buffers(params) if group["momentum"] else [None] * len(params)
            # 1-D views in each parameter's memory order: the fused kernel and the dot product are
            # 3-6x slower on channels_last tensors than on the same memory seen as a flat vector.
            flat = [[_flat(t, p) for t in (p, p.grad, b) if t is not None] for p, b in zip(params, buffers)]
            sgd = dict(momentum=group["momentum"], lr=group["lr"], dampening=0.0, nesterov=False, maximize=False,
                       is_first_step=False)
            if not group["lars"]:
                p, g, *b = (list(column) for column in zip(*flat))
                torch._fused_sgd_(p, g, b[0] if b else [], weight_decay=group["weight_decay"], **sgd)
                _follow([(f, p) for f, p in zip(followers, params) if f is not None], follow_weight)
                continue
            dots = _dot_products([f[0] for f in flat], [f[1] for f in flat], lazy=params[0].device.type == "cpu")
            for (p, g, *b), param, follower, (w_w, g_g, g_w) in zip(flat, params, followers, dots):
                trust = _trust_ratio(w_w, g_g, g_w, group["weight_decay"], group["trust_coefficient"])
                # fused SGD steps with g / grad_scale + weight_decay * w = trust * (g + wd w)
                torch._fused_sgd_([p], [g], b, weight_decay=group["weight_decay"] * trust,
                                  grad_scale=torch.tensor(1 / trust, device=p.device), **sgd)
                if follower is not None:
                    follower.lerp_(param, follow_weight)
        return loss

    def _momentum_buffers(self, params: list[Tensor]) -> list[Tensor]:
        """Each parameter's momentum, created as zeros (after the first step it holds that step),
        in its parameter's memory layout even when a checkpoint stored another one."""
        for p in params:
            buffer = self.state[p].get("momentum_buffer")
            if buffer is None:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            elif buffer.stride() != p.stride():
                self.state[p]["momentum_buffer"] = torch.empty_like(p).copy_(buffer)
        return [self.state[p]["momentum_buffer"] for p in params]


def _dot_products(params: list[Tensor], grads: list[Tensor], lazy: bool) -> Iterator[tuple[float, float, float]]:
    """``<w, w>``, ``<g, g>`` and ``<g, w>`` for each (flat) parameter and gradient, in order.

    BLAS's dot reads a vector twice as fast as ``vector_norm``. ``lazy`` (CPU) computes each triple
    only when the loop asks for it, right before that tensor's update, which then finds the weight
    and gradient still in cache (4-5 ms of a 16 ms step on ResNet-18, BENCHMARKS.md). On a GPU,
    all at once: one wait for the device instead of one per tensor.
    """
    triples = ((torch.vdot(w, w), torch.vdot(g, g), torch.vdot(g, w)) for w, g in zip(params, grads))
    if lazy:
        return (tuple(dot.item() for dot in triple) for triple in triples)
    return iter(map(tuple, torch.stack([torch.stack(triple) for triple in triples]).tolist()))


def _trust_ratio(w_w: float, g_g: float, g_w: float, weight_decay: float, trust_coefficient: float) -> float:
    """``eta ||w|| / ||g + wd w||`` from the three dot products (1 where either norm is 0)."""
    w_norm = math.sqrt(w_w)
    step_norm = math.sqrt(max(g_g + 2 * weight_decay * g_w + weight_decay**2 * w_w, 0.0))
    if w_norm > 0 and step_norm > 0:
        return trust_coefficient * w_norm / step_norm
    return 1.0


def lars_update_(params: list[Tensor], grads: list[Tensor], buffers: list[Tensor], lr: Tensor, momentum: float,
                 weight_decay: float, trust_coefficient: float, adapt: bool,
                 followers: list[Tensor | None] | None = None, follow_weight: Tensor | None = None) -> None:
    """One LARS (``adapt``) or plain momentum-SGD step, written tensor by tensor as the paper states
    it: ``d = g + wd w``, ``d *= eta ||w|| / ||d||`` (1 where a norm is 0), ``b = m b + d``,
    ``w -= lr b``; then each follower ``f`` (None: none) moves to ``lerp(f, w, follow_weight)``.
    This is the form ``torch.compile`` turns into two fused loops per tensor, the EMA included."""
    for w, g, b, f in zip(params, grads, buffers, followers or [None] * len(params)):
        step = g + weight_decay * w
        if adapt:
            w_norm, step_norm = torch.linalg.vector_norm(w), torch.linalg.vector_norm(step)
            usable = (w_norm > 0) & (step_norm > 0)
            step = step * torch.where(usable, trust_coefficient * w_norm / step_norm, torch.ones_like(w_norm))
        b.mul_(momentum).add_(step)
        w.sub_(lr * b)
        if f is not None:
            f.lerp_(w, follow_weight)


def _follow(pairs: list[tuple[Tensor, Tensor]], weight: float) -> None:
    """``follower.lerp_(param, weight)`` for every pair, in one fused call."""
    if pairs:
        torch._foreach_lerp_([f for f, _ in pairs], [p for _, p in pairs], weight)


def check_compiler() -> None:
    """Stop before the first step, with one clear message, when torch.compile has no C++ compiler
    to build CPU kernels with (GPU kernels need none)."""
    from torch._inductor import cpp_builder

    try:
        cpp_builder.get_cpp_compiler()
    except RuntimeError as error:  # torch._inductor.exc.InvalidCxxCompiler
        raise RuntimeError(f"--compile needs a C++ compiler for torch.compile's CPU kernels ({error}): "
                           f"install g++ (or clang), or drop --compile") from None


def _flat(tensor: Tensor, like: Tensor) -> Tensor:
    """``tensor`` (a parameter ``like``, its gradient or its momentum) as 1-D in ``like``'s memory
    order: a view of a contiguous or channels_last (NHWC in memory) parameter and of anything laid
    out like it. Any other layout would make it a copy, and updating a copy updates nothing."""
    if like.dim() == 4 and not like.is_contiguous() and like.is_contiguous(memory_format=torch.channels_last):
        tensor = tensor.permute(0, 2, 3, 1)
    elif not like.is_contiguous():
        raise ValueError(f"LARS needs contiguous or channels_last parameters, got strides {like.stride()}")
    return tensor.reshape(-1)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weights of linear and conv layers decay; biases and normalisation parameters (1-D) do not."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [dict(params=decay, weight_decay=weight_decay),
            dict(params=no_decay, weight_decay=0.0, lars=False)]


def build_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float,
                    compiled: bool = False) -> torch.optim.Optimizer:
    """``compiled`` compiles LARS's update with torch.compile; the other optimizers already use
    PyTorch's fused or foreach kernels."""
    groups = parameter_groups(model, weight_decay)
    if name == "lars":
        return LARS(groups, lr=lr, weight_decay=weight_decay, compiled=compiled)
    for group in groups:
        group.pop("lars", None)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}: choose one of {', '.join(OPTIMIZERS)}")


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate multiplier at ``step``: linear warmup to 1, then cosine decay to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
