"""How many operations one LARS step, one EMA update and one whole BYOL training step launch on a
ResNet-18 BYOL network.

    python -m bench.launches             # byol_nb's LARS step, EMA update and training step
    python -m bench.launches --compare   # and with the previous per-tensor loops, kept below for reference

On a GPU these two steps are bound by the host: every operation costs a kernel launch of a few
microseconds, whatever the tensor's size. The count is taken on the CPU with torch.profiler, over the
aten operations called from Python (the operations an operation calls inside itself are not counted
again). Views and empty allocations launch no kernel and are counted apart. A multi-tensor
``_foreach`` operation counts once here; on a GPU it launches one kernel per chunk of tensors (a few
for the whole network), not one per tensor.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from typing import Callable

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from byol_nb.augment import AugmentConfig, TwoViewAugment
from byol_nb.ema import ema_update_
from byol_nb.minimal import byol_step
from byol_nb.models import Backbone, BYOLNetworks
from byol_nb.optim import LARS, build_optimizer

NO_KERNEL = {"aten::empty", "aten::empty_like", "aten::empty_strided", "aten::view", "aten::select",
             "aten::unbind", "aten::detach", "aten::alias", "aten::as_strided", "aten::lift_fresh"}
TAU, LR, WEIGHT_DECAY = 0.99, 0.5, 1.5e-6
STEP_BATCH, STEP_SIZE = 32, 32  # the training step's images: the cifar10 preset's shape, a smaller batch


def networks() -> BYOLNetworks:
    """The networks as training builds them (ResNet-18, small stem, channels_last), with a random
    gradient on every trained parameter."""
    torch.manual_seed(0)
    nets = BYOLNetworks(Backbone("resnet18", small_stem=True), 4096, 256)
    nets.to(memory_format=torch.channels_last)
    for p in nets.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    return nets


def top_level_ops(fn: Callable[[], object]) -> Counter:
    """The aten operations ``fn`` calls from Python, by name, as torch.profiler records them."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    ops = Counter()
    for event in prof.events():
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if event.name.startswith("aten::") and parent is None:
            ops[event.name] += 1
    return ops


def median_cpu_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median process CPU time of ``fn`` in ms, after one untimed call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return 1000 * statistics.median(times)


# ---- the previous implementations, per-tensor loops, for --compare -------------------------------
@torch.no_grad()
def previous_lars_step(optimizer: LARS) -> None:
    """byol_nb.optim.LARS.step as it was before the multi-tensor version: ~13 operations per
    adapted tensor, 4 per other tensor."""
    for group in optimizer.param_groups:
        for w in group["params"]:
            if w.grad is None:
                continue
            d = w.grad.add(w, alpha=group["weight_decay"])
            if group["lars"]:
                w_norm, d_norm = torch.linalg.vector_norm(w), torch.linalg.vector_norm(d)
                trust = torch.where((w_norm > 0) & (d_norm > 0), group["trust_coefficient"] * w_norm / d_norm, 1.0)
                if group["clip"]:
                    trust = (trust / group["lr"]).clamp(max=1.0)
                d.mul_(trust)
            state = optimizer.state[w]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(w)
            b = state["momentum_buffer"]
            b.mul_(group["momentum"]).add_(d)
            w.add_(b, alpha=-group["lr"])


@torch.no_grad()
def previous_ema_update_(target: nn.Module, online: nn.Module, tau: float) -> None:
    """byol_nb.ema.ema_update_ as it was before the multi-tensor version: one lerp_ or copy_ per tensor."""
    for t, o in zip(target.parameters(), online.parameters()):
        t.lerp_(o, 1 - tau)
    for t, o in zip(target.buffers(), online.buffers()):
        if t.is_floating_point():
            t.lerp_(o, 1 - tau)
        else:
            t.copy_(o)


def training_step(nets: BYOLNetworks, update: Callable[[], object], ema: Callable[[], object]) -> Callable[[], object]:
    """One whole BYOL step as ``byol_nb.minimal`` runs it: two views of a batch, the forward pass and
    the loss, the backward pass, the optimiser's ``update`` and the ``ema`` of the target."""
    augment = TwoViewAugment(AugmentConfig(STEP_SIZE))
    images = torch.rand(STEP_BATCH, 3, STEP_SIZE, STEP_SIZE, generator=torch.Generator().manual_seed(0))

    def step() -> None:
        loss, _ = byol_step(nets, augment, images)
        loss.backward()
        update()
        ema()
    return step


def implementations(nets: BYOLNetworks, compare: bool) -> dict[tuple[str, str], Callable[[], object]]:
    """(operation, implementation): one call of it, each LARS with its own momentum buffers and
    past its first step (which creates them)."""
    lars, previous = (build_optimizer("lars", nets, LR, WEIGHT_DECAY) for _ in range(2))
    lars.step()
    ema = lambda: ema_update_(nets.target, nets.online, TAU)  # noqa: E731
    result = {("LARS step", "byol_nb"): lars.step, ("EMA update", "byol_nb"): ema,
              ("training step", "byol_nb"): training_step(nets, lars.step, ema)}
    if compare:
        previous_lars_step(previous)
        previous_ema = lambda: previous_ema_update_(nets.target, nets.online, TAU)  # noqa: E731
        result[("LARS step", "previous loop")] = lambda: previous_lars_step(previous)
        result[("EMA update", "previous loop")] = previous_ema
        result[("training step", "previous loop")] = training_step(nets, lambda: previous_lars_step(previous),
                                                                   previous_ema)
    return dict(sorted(result.items()))


def tensor_counts(nets: BYOLNetworks) -> str:
    optimizer = build_optimizer("lars", nets, LR, WEIGHT_DECAY)
    adapted, plain = (len(group["params"]) for group in optimizer.param_groups)
    buffers = list(nets.target.buffers())
    floats = sum(b.is_floating_point() for b in buffers)
    return (f"LARS: {adapted} adapted tensors, {plain} others; EMA: {len(list(nets.target.parameters()))} "
            f"parameters, {floats} float buffers, {len(buffers) - floats} integer buffers")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.launches", description=__doc__.split("\n")[0])
    p.add_argument("--compare", action="store_true", help="also count the previous per-tensor loops")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per implementation (0: no timing)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    nets = networks()
    print(f"torch {torch.__version__}; {tensor_counts(nets)}")
    header = "| operation | implementation | aten ops | of which launch kernels | views, allocations |"
    print(header + (f" CPU ms ({args.threads} thread(s)) |" if args.repeats else ""))
    print("|---|---|---:|---:|---:|" + ("---:|" if args.repeats else ""))
    for (operation, name), fn in implementations(nets, args.compare).items():
        ops = top_level_ops(fn)
        total, free = sum(ops.values()), sum(n for op, n in ops.items() if op in NO_KERNEL)
        timing = f" {median_cpu_ms(fn, args.repeats):.1f} |" if args.repeats else ""
        print(f"| {operation} | {name} | {total} | {total - free} | {free} |{timing}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
