"""Where a byol_nb step's time goes, part by part, and what each optimisation option gives.

    python -m bench.components --sizes 32 64 --threads 1

Times the parts of one step separately (batch 64, two views) in process CPU time, which a crowded
machine disturbs far less than wall-clock time: the online forward + backward and target forward
on fixed views under each memory-format/precision/convolution option, the two-view augmentation, the LARS step
and the EMA update. The options that :mod:`bench.run` shows paying end to end were chosen from this.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Callable

import torch
from torch import Tensor

from bench import peers
from byol_nb.augment import AugmentConfig, TwoViewAugment
from byol_nb.cpu_speed import speed_up_for_cpu
from byol_nb.ema import ema_update_
from byol_nb.models import Backbone, BYOLNetworks
from byol_nb.optim import build_optimizer

OPTIONS = {  # name: (channels_last weights, bf16 autocast, matmul convolutions on tiny maps)
    "fp32, contiguous weights, oneDNN convs": (False, False, False),
    "fp32, channels_last weights, oneDNN convs": (True, False, False),
    "bf16, contiguous weights, oneDNN convs": (False, True, False),
    "bf16, channels_last weights, oneDNN convs": (True, True, False),
    "fp32, channels_last weights, matmul convs": (True, False, True),
    "bf16, channels_last weights, matmul convs": (True, True, True),
}


def median_ms(fn: Callable[[], object], repeats: int, clock: Callable[[], float] = time.process_time) -> float:
    """Median time of ``fn`` in ms on ``clock`` (process CPU time by default), after one untimed call."""
    fn()
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return 1000 * statistics.median(times)


def networks(channels_last: bool, matmul_convs: bool = True) -> BYOLNetworks:
    torch.manual_seed(0)
    nets = speed_up_for_cpu(BYOLNetworks(Backbone("resnet18"), 1024, 256), enable=matmul_convs)
    return nets.to(memory_format=torch.channels_last) if channels_last else nets


def model_step(nets: BYOLNetworks, both: Tensor, bf16: bool) -> Callable[[], None]:
    """The ideal step of :func:`bench.peers.ideal_step`, as a closure."""
    return lambda: peers.model_step(nets, both, bf16)


def measure(size: int, batch: int, repeats: int) -> dict[str, float]:
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    augment = TwoViewAugment(AugmentConfig(size))
    view1, view2 = augment(images, seed=0)
    both = torch.cat([view1.images, view2.images]).contiguous(memory_format=torch.channels_last)
    result = {}
    for name, (channels_last, bf16, matmul_convs) in OPTIONS.items():
        nets = networks(channels_last, matmul_convs)
        result[f"model step, {name}"] = median_ms(model_step(nets, both, bf16), repeats)
    nets = networks(True)
    model_step(nets, both, False)()  # gradients for the optimizer
    result["augmentation (two views)"] = median_ms(lambda: augment(images, seed=1), repeats)
    optimizer = build_optimizer("lars", nets, 0.5, 1.5e-6)
    result["LARS step"] = median_ms(optimizer.step, repeats)
    result["EMA update"] = median_ms(lambda: ema_update_(nets.target, nets.online, 0.99), repeats)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.components", description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {size: measure(size, args.batch, args.repeats) for size in args.sizes}
    sizes = " | ".join(f"{s} px" for s in args.sizes)
    print(f"| part (CPU ms, {args.threads} thread(s), batch {args.batch}) | {sizes} |")
    print("|---|" + "---:|" * len(args.sizes))
    for key in results[args.sizes[0]]:
        print(f"| {key} | " + " | ".join(f"{results[s][key]:.0f}" for s in args.sizes) + " |")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
