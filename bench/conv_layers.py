"""oneDNN's convolution against the matmul path, layer by layer: where ``MAX_MATMUL_CELLS`` comes from.

    python -m bench.conv_layers --size 32 --batch 256 --threads 1

For every distinct convolution of a ResNet-18 (standard stem) at one input size, times forward plus
backward (input and weight gradients) of ``F.conv2d`` and of
:func:`byol_nb.cpu_speed.patch_matmul_conv2d`, in fp32 and under bf16 autocast, on random
channels_last inputs. Run it on another CPU to see whether the threshold holds there.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from bench.components import median_ms
from byol_nb.cpu_speed import MAX_MATMUL_CELLS, patch_matmul_conv2d

# (in channels, out channels, kernel, stride, input side / image side, how many ResNet-18 has)
RESNET18_CONVS = [
    (3, 64, 7, 2, 1, 1), (64, 64, 3, 1, 1 / 4, 4),
    (64, 128, 3, 2, 1 / 4, 1), (64, 128, 1, 2, 1 / 4, 1), (128, 128, 3, 1, 1 / 8, 3),
    (128, 256, 3, 2, 1 / 8, 1), (128, 256, 1, 2, 1 / 8, 1), (256, 256, 3, 1, 1 / 16, 3),
    (256, 512, 3, 2, 1 / 16, 1), (256, 512, 1, 2, 1 / 16, 1), (512, 512, 3, 1, 1 / 32, 3),
]


def forward_backward(conv: Callable[[Tensor, Tensor], Tensor], x: Tensor, weight: Tensor, bf16: bool) -> None:
    x, weight = x.detach().requires_grad_(), weight.detach().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = conv(x, weight)
    out.backward(torch.ones_like(out))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.conv_layers", description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=32, help="image side (px)")
    p.add_argument("--batch", type=int, default=256, help="images per forward (a step's two views of 128)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"| conv (in->out, kxk/stride) | input | output | fp32 oneDNN | fp32 matmul | bf16 oneDNN | bf16 matmul |"
          f"  (ms, forward + backward, batch {args.batch}, {args.threads} thread(s))")
    print("|---|---|---|---:|---:|---:|---:|")
    totals = {"oneDNN only": [0.0, 0.0], f"MatmulConv2d (matmul up to {MAX_MATMUL_CELLS} output cells)": [0.0, 0.0]}
    for c_in, c_out, kernel, stride, side_ratio, count in RESNET18_CONVS:
        side = max(1, round(args.size * side_ratio))
        padding = kernel // 2
        out_side = (side + 2 * padding - kernel) // stride + 1
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(args.batch, c_in, side, side, generator=generator).contiguous(memory_format=torch.channels_last)
        weight = torch.randn(c_out, c_in, kernel, kernel, generator=generator) * 0.05
        onednn = lambda x, w: F.conv2d(x, w, None, stride, padding)  # noqa: E731
        matmul = lambda x, w: patch_matmul_conv2d(x, w, None, (stride, stride), (padding, padding))  # noqa: E731
        times = [median_ms(lambda: forward_backward(conv, x, weight, bf16), args.repeats, time.perf_counter)
                 for bf16 in (False, True) for conv in (onednn, matmul)]
        print(f"| {c_in}->{c_out}, {kernel}x{kernel}/{stride} | {side}x{side} | {out_side}x{out_side} | "
              + " | ".join(f"{t:.1f}" for t in times) + " |")
        use_matmul = out_side * out_side <= MAX_MATMUL_CELLS
        for precision, (t_onednn, t_matmul) in enumerate((times[:2], times[2:])):
            totals["oneDNN only"][precision] += count * t_onednn
            totals[f"MatmulConv2d (matmul up to {MAX_MATMUL_CELLS} output cells)"][precision] += (
                count * (t_matmul if use_matmul else t_onednn))
    for name, (fp32, bf16) in totals.items():
        print(f"all ResNet-18 convolutions, {name}: fp32 {fp32:.0f} ms, bf16 {bf16:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
