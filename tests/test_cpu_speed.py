"""byol_nb.cpu_speed: the matmul path for convolutions on tiny maps computes what ``F.conv2d``
computes, forward and backward, takes over only where it should, and leaves a network's
parameters and checkpoints as they were."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from byol_nb import cpu_speed
from byol_nb.cpu_speed import MAX_MATMUL_CELLS, MatmulConv2d, patch_matmul_conv2d, speed_up_for_cpu
from byol_nb.models import Backbone


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("in_channels, out_channels, size, kernel, stride, padding, bias", [
    (8, 16, 1, 3, 1, 1, False),  # ResNet's 3x3 on a 1x1 map: only the centre tap sees data
    (8, 16, 2, 3, 2, 1, False),  # stride-2 3x3 into a 1x1 output
    (8, 16, 4, 1, 2, 0, True),  # 1x1 stride-2 shortcut, with a bias
    (3, 5, 5, 3, 2, 0, True),  # no padding, odd size
    (4, 6, 7, 7, 2, 3, False),  # the stem's 7x7
])
def test_patch_matmul_equals_conv2d_forward_and_backward(in_channels, out_channels, size, kernel, stride, padding,
                                                        bias, channels_last):
    torch.manual_seed(0)
    x = torch.randn(3, in_channels, size, size + 1, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(out_channels, in_channels, kernel, kernel, dtype=torch.float64)
    if channels_last:
        weight = weight.contiguous(memory_format=torch.channels_last)
    b = torch.randn(out_channels, dtype=torch.float64) if bias else None
    leaves = [t.requires_grad_() for t in (x, weight) + ((b,) if bias else ())]

    expected = F.conv2d(x, weight, b, stride, padding)
    got = patch_matmul_conv2d(x, weight, b, (stride, stride), (padding, padding))
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected)

    grad_out = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, leaves, grad_out)
    got_grads = torch.autograd.grad(got, leaves, grad_out)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("size", [1, 2, 4])
def test_weight_gradient_comes_back_in_the_weights_layout(size):
    """A channels_last weight (how BYOLModule keeps its convolutions) gets a channels_last gradient,
    which autograd stores as it is; any other layout costs a full copy of the gradient per step
    (three 9 MB copies per step for ResNet-18's last stage)."""
    weight = torch.randn(16, 8, 3, 3).contiguous(memory_format=torch.channels_last).requires_grad_()
    x = torch.randn(2, 8, size, size).contiguous(memory_format=torch.channels_last)
    (grad,) = torch.autograd.grad(patch_matmul_conv2d(x, weight, None, (1, 1), (1, 1)).sum(), [weight])
    assert grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("kernel", [1, 3])
def test_a_layer_used_twice_gets_one_gradient_with_the_weights_strides(kernel):
    """The main views (2x2 maps) and a multi-crop view (1x1 maps) through one layer: the summed
    gradient that reaches the weight has the weight's own strides, also where a 1x1 kernel makes
    channels_last and contiguous strides differ though the memory is the same; DDP compares
    strides exactly and otherwise copies the gradient into its bucket every step, with a warning."""
    conv = speed_up_for_cpu(nn.Conv2d(8, 16, kernel, padding=kernel // 2, bias=False))
    conv.to(memory_format=torch.channels_last)
    seen = []
    conv.weight.register_hook(lambda grad: seen.append(grad.stride()))
    views = [torch.randn(2, 8, size, size).contiguous(memory_format=torch.channels_last) for size in (2, 1)]
    sum(conv(view).sum() for view in views).backward()
    assert seen == [conv.weight.stride()]


def test_dropping_taps_that_only_see_padding_keeps_every_small_case_exact():
    """Every combination of tiny height/width, kernel, stride and padding, forward and backward."""
    torch.manual_seed(0)
    for height in (1, 2, 3, 4):
        for width in (1, 2, 3):
            for kernel in (1, 2, 3):
                for stride in (1, 2):
                    for padding in range(kernel):
                        if height + 2 * padding < kernel or width + 2 * padding < kernel:
                            continue
                        x = torch.randn(2, 3, height, width, dtype=torch.float64, requires_grad=True)
                        w = torch.randn(4, 3, kernel, kernel, dtype=torch.float64, requires_grad=True)
                        expected = F.conv2d(x, w, None, stride, padding)
                        got = patch_matmul_conv2d(x, w, None, (stride, stride), (padding, padding))
                        case = f"{height}x{width} input, {kernel}x{kernel}/{stride}, padding {padding}"
                        torch.testing.assert_close(got, expected, msg=case)
                        grad = torch.randn_like(expected)
                        for g, e in zip(torch.autograd.grad(got, (x, w), grad),
                                        torch.autograd.grad(expected, (x, w), grad)):
                            torch.testing.assert_close(g, e, msg=case)


def _count_matmul_calls(monkeypatch) -> list[tuple[int, ...]]:
    calls: list[tuple[int, ...]] = []
    real = cpu_speed.patch_matmul_conv2d

    def counting(x, *args):
        calls.append(tuple(x.shape))
        return real(x, *args)

    monkeypatch.setattr(cpu_speed, "patch_matmul_conv2d", counting)
    return calls


def test_matmul_path_only_for_tiny_outputs(monkeypatch):
    calls = _count_matmul_calls(monkeypatch)
    conv = speed_up_for_cpu(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1)))[0]
    assert isinstance(conv, MatmulConv2d)
    conv(torch.randn(2, 4, 2, 2))  # 2x2 output: 4 cells, at most MAX_MATMUL_CELLS
    assert len(calls) == 1 and 4 <= MAX_MATMUL_CELLS < 9
    conv(torch.randn(2, 4, 3, 3))  # 3x3 output: 9 cells, oneDNN's kernel
    assert len(calls) == 1


def test_swap_keeps_parameters_and_skips_unsupported_convs():
    net = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Conv2d(8, 8, 3, groups=2), nn.Conv2d(8, 8, 3, dilation=2),
                        nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"), nn.Conv2d(8, 8, 3, padding="same"))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    weight = net[0].weight
    speed_up_for_cpu(net)
    assert [type(m) for m in net] == [MatmulConv2d] + [nn.Conv2d] * 4
    assert net[0].weight is weight
    assert net.state_dict().keys() == before.keys()


def test_backbone_matches_plain_convolutions_on_tiny_maps():
    """A whole ResNet-18 at 32 px (layer3 at 2x2, layer4 at 1x1): same features, same gradients."""
    torch.manual_seed(0)
    fast = speed_up_for_cpu(Backbone("resnet18").double())
    plain = Backbone("resnet18").double()
    plain.load_state_dict(fast.state_dict())
    assert any(isinstance(m, MatmulConv2d) for m in fast.modules())
    assert not any(isinstance(m, MatmulConv2d) for m in plain.modules())
    images = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(fast(images), plain(images))
    fast(images).square().sum().backward()
    plain(images).square().sum().backward()
    for (name, p_fast), p_plain in zip(fast.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p_fast.grad, p_plain.grad, msg=name)


def test_autocast_runs_the_matmul_in_bfloat16():
    conv = speed_up_for_cpu(nn.Sequential(nn.Conv2d(4, 8, 3, padding=1)))[0]
    x = torch.randn(2, 4, 1, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), F.conv2d(x, conv.weight, conv.bias, padding=1), atol=0.05, rtol=0.05)
