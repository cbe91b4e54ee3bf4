"""PixPro's pixel branch: positive pairs against a slow loop, PPM and losses against hand
computations, gradients, per-sample masks (DESIGN.md trap 8), training and the segmentation probe."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from byol_nb import train
from byol_nb.augment import AugmentConfig, TwoViewAugment, sample_crop_boxes
from byol_nb.checkpoint import save_backbone
from byol_nb.ema import ema_update_
from byol_nb.evaluate import main as evaluate_main
from byol_nb.evaluate import segmentation_probe_miou
from byol_nb.losses import (pixel_contrast_loss, pixpro_loss, positive_pixel_mask, symmetric_pixel_contrast_loss,
                            symmetric_pixpro_loss)
from byol_nb.models import Backbone, BYOLNetworks, PixelPropagation
from byol_nb.module import BYOLModule, TrainConfig
from byol_nb.viz import feature_pca_rgb, plot_positive_pairs

TINY = ["--image-size", "32", "--batch-size", "8", "--proj-hidden", "64", "--no-progress", "--accelerator", "cpu"]


# ---- positive pixel pairs -------------------------------------------------------------------------
def loop_mask(boxes1, flips1, boxes2, flips2, size, threshold=0.7):
    """The definition, one cell pair at a time in Python floats: cell (r, c) of an (H, W) map has its
    centre at u = (c + 0.5) / W, v = (r + 0.5) / H of the view, i.e. x0 + u (x1 - x0) in the original
    (x1 - u (x1 - x0) when flipped); distances are divided by the larger cell diagonal."""
    height, width = size
    out = torch.zeros(len(boxes1), height * width, height * width, dtype=torch.bool)
    for b in range(len(boxes1)):
        views = []
        for box, flip in ((boxes1[b].tolist(), bool(flips1[b])), (boxes2[b].tolist(), bool(flips2[b]))):
            x0, y0, x1, y1 = box
            centres = []
            for r in range(height):
                for c in range(width):
                    u, v = (c + 0.5) / width, (r + 0.5) / height
                    x = x1 - u * (x1 - x0) if flip else x0 + u * (x1 - x0)
                    centres.append((x, y0 + v * (y1 - y0)))
            diagonal = math.hypot((x1 - x0) / width, (y1 - y0) / height)
            views.append((centres, diagonal))
        (first, d1), (second, d2) = views
        for i, (xa, ya) in enumerate(first):
            for j, (xb, yb) in enumerate(second):
                out[b, i, j] = math.hypot(xa - xb, ya - yb) / max(d1, d2) < threshold
    return out


@pytest.mark.parametrize("size,threshold", [((4, 4), 0.7), ((3, 5), 0.7), ((7, 7), 1.5)])
@pytest.mark.parametrize("flip_p", [0.0, 0.5, 1.0])
def test_mask_matches_slow_loop_on_random_boxes(size, threshold, flip_p):
    torch.manual_seed(100 * size[0] + 10 * size[1] + int(2 * flip_p))
    batch = 24
    boxes1 = sample_crop_boxes(batch, (0.08, 1.0), (3 / 4, 4 / 3)).double()
    boxes2 = sample_crop_boxes(batch, (0.08, 1.0), (3 / 4, 4 / 3)).double()
    flips1, flips2 = torch.rand(batch) < flip_p, torch.rand(batch) < flip_p
    mask = positive_pixel_mask(boxes1, flips1, boxes2, flips2, size, threshold)
    assert mask.shape == (batch, size[0] * size[1], size[0] * size[1]) and mask.dtype == torch.bool
    expected = loop_mask(boxes1, flips1, boxes2, flips2, size, threshold)
    assert torch.equal(mask, expected)
    assert expected.any() and not expected.all()  # the draw covers both outcomes


def test_mask_without_overlap_is_empty():
    boxes1 = torch.tensor([[0.0, 0.0, 0.3, 0.3]])
    boxes2 = torch.tensor([[0.6, 0.6, 1.0, 1.0]])
    for flips in (torch.tensor([False]), torch.tensor([True])):
        assert not positive_pixel_mask(boxes1, flips, boxes2, flips, (4, 4)).any()
        assert not loop_mask(boxes1, flips, boxes2, flips, (4, 4)).any()


def test_mask_with_full_overlap_pairs_each_cell_with_itself():
    box = torch.tensor([[0.1, 0.2, 0.9, 1.0]])  # square: neighbours are 1/sqrt(2) = 0.707 diagonals apart
    same = positive_pixel_mask(box, torch.tensor([False]), box, torch.tensor([False]), (4, 4))[0]
    assert torch.equal(same, torch.eye(16, dtype=torch.bool))
    mirrored = positive_pixel_mask(box, torch.tensor([False]), box, torch.tensor([True]), (4, 4))[0]
    # one view mirrored: cell (r, c) of view 1 shows what cell (r, W - 1 - c) of view 2 shows
    expected = torch.zeros(16, 16, dtype=torch.bool)
    for r in range(4):
        for c in range(4):
            expected[r * 4 + c, r * 4 + 3 - c] = True
    assert torch.equal(mirrored, expected)


def test_mask_is_per_sample_trap8():
    boxes1 = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    boxes2 = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.5, 0.5]])
    flips = torch.tensor([False, False])
    mask = positive_pixel_mask(boxes1, flips, boxes2, flips, (4, 4))
    assert not torch.equal(mask[0], mask[1])
    for b in range(2):  # each sample's mask is what that sample alone would get
        alone = positive_pixel_mask(boxes1[b:b + 1], flips[b:b + 1], boxes2[b:b + 1], flips[b:b + 1], (4, 4))
        assert torch.equal(mask[b], alone[0])
    # the second view is the top-left quarter: the top-left cells of view 1 have partners there,
    # the last row and column (centres at 0.875, > 0.7 diagonals from anything in it) have none
    paired = mask[1].any(1).view(4, 4)
    assert paired[:2, :2].all() and not paired[3].any() and not paired[:, 3].any()


def test_training_step_builds_the_mask_from_that_steps_views(monkeypatch):
    module = BYOLModule(TrainConfig(method="pixpro", small_stem=True, image_size=16, proj_hidden=16, proj_dim=8))
    seen = []
    real = positive_pixel_mask

    def spy(*args, **kwargs):
        seen.append(args[:4])
        return real(*args, **kwargs)

    monkeypatch.setattr("byol_nb.module.positive_pixel_mask", spy)
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    for seed in (1, 2):
        view1, view2 = module.augment(images, seed=seed)
        fmap, _ = module.nets.online(torch.cat([view1.images, view2.images]))
        with torch.no_grad():
            target_fmap, _ = module.nets.target(torch.cat([view1.images, view2.images]))
        module.pixel_loss(fmap, target_fmap, view1, view2)
        for got, want in zip(seen[-1], (view1.boxes, view1.flips, view2.boxes, view2.flips)):
            assert torch.equal(got, want)
    assert not torch.equal(seen[0][0], seen[1][0])


# ---- PPM and losses -----------------------------------------------------------------------------
def test_ppm_matches_hand_computation():
    ppm = PixelPropagation(2, gamma=2.0)
    with torch.no_grad():
        ppm.transform.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
        ppm.transform.bias.zero_()
    # three pixels in a row: (1, 0), (1, 1), (-1, 0)
    x = torch.tensor([[1.0, 1.0, -1.0], [0.0, 1.0, 0.0]]).view(1, 2, 1, 3)
    y = ppm(x).view(2, 3).T
    # s = max(cos, 0)^2: s01 = (1/sqrt2)^2 = 0.5, s02 = 0, s12 = 0; s_ii = 1
    # g(x) = x, L2-normalised: v0 = (1, 0), v1 = (1, 1)/sqrt2, v2 = (-1, 0)
    r = 1 / math.sqrt(2)
    y0 = torch.tensor([1 + 0.5 * r, 0.5 * r])
    y1 = torch.tensor([0.5 + r, r])
    y2 = torch.tensor([-1.0, 0.0])
    expected = torch.stack([v / v.norm() for v in (y0, y1, y2)])
    torch.testing.assert_close(y, expected)


def test_pixpro_loss_matches_hand_computation():
    # image 0: two pixels, positives (0, 0) and (1, 1); image 1: no positive pair at all
    prediction = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]]).view(2, 2, 1, 2)
    target = torch.tensor([[[2.0, 1.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]]).view(2, 2, 1, 2)
    mask = torch.tensor([[[True, False], [False, True]], [[False, False], [False, False]]])
    # image 0: cos(p0, t0) = cos((1,0),(2,0)) = 1; cos(p1, t1) = cos((0,1),(1,1)) = 1/sqrt2
    image0 = (1 + 1 / math.sqrt(2)) / 2
    loss = pixpro_loss(prediction, target, mask)
    torch.testing.assert_close(loss, torch.tensor(-2 * (image0 + 0.0) / 2))
    empty = pixpro_loss(prediction, target, torch.zeros_like(mask))
    assert torch.isfinite(empty) and empty.item() == 0.0


def test_pixpro_loss_under_bf16_autocast_keeps_float32_cosines():
    torch.manual_seed(0)
    prediction = torch.randn(4, 64, 2, 2)
    target = prediction + 0.05 * torch.randn(4, 64, 2, 2)
    mask = torch.rand(4, 4, 4) < 0.5
    expected = pixpro_loss(prediction.bfloat16().float(), target.bfloat16().float(), mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = pixpro_loss(prediction.bfloat16(), target.bfloat16(), mask)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=0)


def test_symmetric_pixpro_loss_sums_both_directions_with_transposed_mask():
    torch.manual_seed(0)
    y1, y2, t1, t2 = (torch.randn(3, 4, 2, 3) for _ in range(4))
    mask = torch.rand(3, 6, 6) < 0.3
    expected = pixpro_loss(y1, t2, mask) + pixpro_loss(y2, t1, mask.transpose(1, 2))
    torch.testing.assert_close(symmetric_pixpro_loss(y1, y2, t1, t2, mask), expected)


def test_pixel_contrast_matches_explicit_infonce():
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 1, 2), torch.randn(2, 3, 1, 2)
    others = torch.randn(3, 3, 1, 2)  # keys of "other processes"
    mask = torch.tensor([[[True, False], [False, False]], [[True, True], [False, True]]])
    all_keys = torch.cat([k, others])
    qn = F.normalize(q.flatten(2), dim=1)
    kn = F.normalize(k.flatten(2), dim=1)
    bank = F.normalize(all_keys.flatten(2), dim=1).permute(0, 2, 1).reshape(-1, 3)
    terms = []
    for b in range(2):
        for i in range(2):
            if mask[b, i].any():
                positives = sum(torch.exp(qn[b, :, i] @ kn[b, :, j] / 0.3) for j in range(2) if mask[b, i, j])
                everything = torch.exp(bank @ qn[b, :, i] / 0.3).sum()
                terms.append(-torch.log(positives / everything))
    expected = torch.stack(terms).mean()
    torch.testing.assert_close(pixel_contrast_loss(q, k, mask, 0.3, all_keys), expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 features, as on AMX CPUs: logits stay fp32
        in_bf16 = pixel_contrast_loss(q.bfloat16(), k.bfloat16(), mask, 0.3, all_keys.bfloat16())
    assert in_bf16.dtype == torch.float32
    torch.testing.assert_close(in_bf16, expected, rtol=0.02, atol=0.02)
    # without gathered keys the negatives are the local batch only: a different (smaller) loss
    assert pixel_contrast_loss(q, k, mask, 0.3) < expected
    none = pixel_contrast_loss(q, k, torch.zeros_like(mask))
    assert none.item() == 0.0
    q.requires_grad_(True)
    pixel_contrast_loss(q, k, mask & False).backward()
    assert torch.isfinite(q.grad).all()


# ---- networks: gradients and the EMA copy -------------------------------------------------------
@pytest.mark.parametrize("method", ["pixpro", "pixcontrast"])
def test_gradients_reach_only_the_online_network(method):
    torch.manual_seed(0)
    module = BYOLModule(TrainConfig(method=method, small_stem=True, image_size=16, proj_hidden=16, proj_dim=8))
    views = module.augment(torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8), seed=0)
    both = torch.cat([v.images for v in views])
    fmap, projection = module.nets.online(both)
    with torch.no_grad():
        target_fmap, target = module.nets.target(both)
    loss = module.pixel_loss(fmap, target_fmap, *views) + module.instance_loss(projection, target)
    loss.backward()
    for name, p in module.nets.target.named_parameters():
        assert p.grad is None and not p.requires_grad, name
    heads = [module.nets.online.backbone, module.nets.online.pixel_projector, module.nets.online.projector]
    if method == "pixpro":
        heads.append(module.nets.propagation)
    for head in heads:
        grads = [p.grad for p in head.parameters()]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads), type(head).__name__


def test_pixel_only_freezes_the_unused_instance_heads():
    module = BYOLModule(TrainConfig(method="pixpro", small_stem=True, instance_weight=0.0, proj_hidden=16))
    assert not any(p.requires_grad for p in module.nets.online.projector.parameters())
    assert not any(p.requires_grad for p in module.nets.predictor.parameters())
    assert all(p.requires_grad for p in module.nets.online.pixel_projector.parameters())


def test_target_pixel_projector_is_an_ema_copy():
    nets = BYOLNetworks(Backbone("resnet18", small_stem=True), hidden_dim=16, out_dim=8, pixel=True)
    online, target = nets.online.pixel_projector, nets.target.pixel_projector
    assert target is not online and nets.propagation is not None
    for t, o in zip(target.parameters(), online.parameters()):
        assert t.data_ptr() != o.data_ptr() and not t.requires_grad
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    before = [t.clone() for t in target.parameters()]
    ema_update_(nets.target, nets.online, tau=0.5)
    for b, t, o in zip(before, target.parameters(), online.parameters()):
        torch.testing.assert_close(t, 0.5 * b + 0.5 * o)


# ---- command line -------------------------------------------------------------------------------
def test_too_small_feature_map_stops_before_training(tiny_shapes, tmp_path):
    with pytest.raises(SystemExit) as stop:
        train.main(["--data", str(tiny_shapes / "train"), "--method", "pixpro", "--max-steps", "1",
                    "--out", str(tmp_path), *TINY])
    message = str(stop.value)
    assert "1x1" in message and "--small-stem" in message and "--image-size 64" in message
    assert not (tmp_path / "last.ckpt").exists()
    with pytest.raises(ValueError, match="--small-stem"):
        BYOLModule(TrainConfig(method="pixcontrast", image_size=32))
    BYOLModule(TrainConfig(method="byol", image_size=32, proj_hidden=16))  # instance-only needs no map


@pytest.mark.slow
@pytest.mark.parametrize("method", ["pixpro", "pixcontrast"])
def test_three_step_pixel_training_run(method, tiny_shapes, tmp_path):
    code = train.main(["--data", str(tiny_shapes / "train"), "--method", method, "--small-stem",
                       "--max-steps", "3", "--out", str(tmp_path), *TINY])
    assert code == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["global_step"] == 3 and metrics["method"] == method
    assert metrics["config"]["instance_weight"] == TrainConfig().instance_weight
    assert metrics["final_loss"] is not None and math.isfinite(metrics["final_loss"])
    assert (tmp_path / "backbone.pt").is_file()


# ---- segmentation probe -------------------------------------------------------------------------
def test_segmentation_probe_learns_masks_encoded_in_features():
    torch.manual_seed(0)
    masks = torch.randint(0, 3, (40, 4, 4)).repeat_interleave(4, 1).repeat_interleave(4, 2)  # 16x16 masks
    informative = F.one_hot(masks[:, ::4, ::4], 3).permute(0, 3, 1, 2).float() + 0.05 * torch.randn(40, 3, 4, 4)
    noise = torch.randn(40, 3, 4, 4)
    good, accuracy = segmentation_probe_miou(informative[:30], masks[:30], informative[30:], masks[30:], epochs=60)
    bad, _ = segmentation_probe_miou(noise[:30], masks[:30], noise[30:], masks[30:], epochs=60)
    assert good > 80 and accuracy > 85
    assert bad < 50


def test_segmentation_evaluate_command(tiny_shapes, tmp_path, capsys):
    torch.manual_seed(0)
    path = save_backbone(Backbone("resnet18", small_stem=True), tmp_path / "backbone.pt", image_size=32)
    code = evaluate_main(["--task", "segmentation", "--backbone", str(path), "--train", str(tiny_shapes / "train"),
                          "--test", str(tiny_shapes / "test"), "--device", "cpu"])
    assert code == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["task"] == "segmentation" and 0 < line["miou"] <= 100 and 0 < line["pixel_accuracy"] <= 100


def test_segmentation_needs_masks(tmp_path, capsys, tiny_shapes):
    folder = tmp_path / "plain"
    for cls in ("a", "b"):
        (folder / cls).mkdir(parents=True)
        for f in list((tiny_shapes / "train" / "circle").iterdir())[:2]:
            (folder / cls / f.name).write_bytes(f.read_bytes())
    path = save_backbone(Backbone("resnet18", small_stem=True), tmp_path / "backbone.pt", image_size=32)
    code = evaluate_main(["--task", "segmentation", "--backbone", str(path), "--train", str(folder),
                          "--test", str(folder), "--device", "cpu"])
    assert code == 2 and "no mask for" in capsys.readouterr().err


# ---- figures ------------------------------------------------------------------------------------
def test_positive_pairs_figure_lights_the_masks_cells():
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    view1, view2 = TwoViewAugment(AugmentConfig(32))(images, seed=3)
    mask = positive_pixel_mask(view1.boxes, view1.flips, view2.boxes, view2.flips, (4, 4))
    row = int(mask[1].sum(1).argmax())
    fig = plot_positive_pairs(view1, view2, (4, 4), (row // 4, row % 4), index=1)
    assert len(fig.axes[1].patches) == int(mask[1, row].sum()) > 0
    assert len(fig.axes[0].patches) == 1
    with pytest.raises(ValueError, match="outside"):
        plot_positive_pairs(view1, view2, (4, 4), (4, 0))


def test_feature_pca_colours_separate_regions():
    fmap = torch.zeros(8, 4, 4)
    fmap[:, :, :2] = torch.randn(8, 1, 1)
    fmap[:, :, 2:] = torch.randn(8, 1, 1)
    rgb = feature_pca_rgb(fmap + 0.01 * torch.randn(8, 4, 4))
    assert rgb.shape == (1, 4, 4, 3) and rgb.min() >= 0 and rgb.max() <= 1
    # the first component (red) is the one direction that separates the halves; the others are noise
    left, right = rgb[0, :, :2, 0], rgb[0, :, 2:, 0]
    assert (left.mean() - right.mean()).abs() > 0.9
    assert left.std() < 0.05 and right.std() < 0.05
