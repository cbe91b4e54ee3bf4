"""PixPro's pixel branch: positive pairs against a slow loop, PPM and losses against hand
computations, gradients, masks computed per sample from each step's own views, training and the
segmentation probe."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from byol_nb import train
from byol_nb.augment import AugmentConfig, TwoViewAugment, sample_crop_boxes
from byol_nb.checkpoint import save_backbone
from byol_nb.config import TrainConfig
from byol_nb.ema import ema_update_
from byol_nb.evaluate import main as evaluate_main
from byol_nb.losses import cell_distances, pixel_contrast_loss, pixpro_loss, positive_pixel_mask, symmetric_pixpro_loss
from byol_nb.metrics import segmentation_probe_miou
from byol_nb.models import Backbone, BYOLNetworks, PixelPropagation
from byol_nb.module import BYOLModule
from byol_nb.viz import cell_similarity, feature_pca_rgb, plot_cell_similarity, plot_positive_pairs

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


def test_mask_is_computed_per_sample():
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
    module = BYOLModule(TrainConfig(method="pixpro", small_stem=True, image_size=32, proj_hidden=16, proj_dim=8))
    seen = []
    real = cell_distances

    def spy(*args, **kwargs):
        seen.append(args[:4])
        return real(*args, **kwargs)

    monkeypatch.setattr("byol_nb.models.cell_distances", spy)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    for seed in (1, 2):
        view1, view2 = module.augment(images, seed=seed)
        module.nets.pixel_loss(module.nets(torch.cat([view1.images, view2.images])), view1, view2, module.config)
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


def test_pixel_contrast_matches_explicit_infonce_with_the_neutral_band():
    """Positives: the other view's cells closer than 0.7 cell diagonals; negatives: its cells farther
    than 1.0 and every cell of every other image (here also "other processes'" keys); cells in
    between are neither, as in the official code."""
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 1, 2), torch.randn(2, 3, 1, 2)
    others = torch.randn(3, 3, 1, 2)  # keys of "other processes"
    distance = torch.tensor([[[0.5, 0.8], [1.5, 2.0]], [[0.1, 0.6], [0.9, 0.3]]])
    all_keys = torch.cat([k, others])
    qn = F.normalize(q.flatten(2), dim=1)
    kn = F.normalize(k.flatten(2), dim=1)
    terms = []
    for b in range(2):
        for i in range(2):
            positives = [j for j in range(2) if distance[b, i, j] < 0.7]
            if not positives:
                continue
            own = [j for j in range(2) if distance[b, i, j] < 0.7 or distance[b, i, j] > 1.0]
            numerator = sum(torch.exp(qn[b, :, i] @ kn[b, :, j] / 0.3) for j in positives)
            other_keys = F.normalize(torch.cat([all_keys[:b], all_keys[b + 1:]]).flatten(2), dim=1)
            denominator = (sum(torch.exp(qn[b, :, i] @ kn[b, :, j] / 0.3) for j in own)
                           + torch.exp(torch.einsum("c,mcn->mn", qn[b, :, i], other_keys) / 0.3).sum())
            terms.append(-torch.log(numerator / denominator))
    expected = torch.stack(terms).mean()
    torch.testing.assert_close(pixel_contrast_loss(q, k, distance, 0.3, all_keys), expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 features: logits stay fp32
        in_bf16 = pixel_contrast_loss(q.bfloat16(), k.bfloat16(), distance, 0.3, all_keys.bfloat16())
    assert in_bf16.dtype == torch.float32
    torch.testing.assert_close(in_bf16, expected, rtol=0.02, atol=0.02)
    # the neutral band matters: counted as negatives, the loss is larger
    assert pixel_contrast_loss(q, k, distance, 0.3, all_keys, negative_above=0.7) > expected
    # without gathered keys the negatives are the local batch only: a different (smaller) loss
    assert pixel_contrast_loss(q, k, distance, 0.3) < expected
    # this process's keys sit where the gather puts them: at offset 3 instead of 0, the same loss
    shifted = torch.cat([others, k])
    torch.testing.assert_close(pixel_contrast_loss(q, k, distance, 0.3, shifted, offset=3), expected)
    far = torch.full_like(distance, 5.0)
    assert pixel_contrast_loss(q, k, far).item() == 0.0
    q.requires_grad_(True)
    pixel_contrast_loss(q, k, far).backward()
    assert torch.isfinite(q.grad).all()


# ---- networks: gradients and the EMA copy -------------------------------------------------------
@pytest.mark.parametrize("method", ["pixpro", "pixcontrast"])
def test_gradients_reach_only_the_online_network(method):
    torch.manual_seed(0)
    module = BYOLModule(TrainConfig(method=method, small_stem=True, image_size=32, proj_hidden=16, proj_dim=8))
    views = module.augment(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), seed=0)
    outputs = module.nets(torch.cat([v.images for v in views]))
    loss, _ = module.nets.loss(outputs, *views, module.config)
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
    nets = BYOLNetworks(Backbone("resnet18", small_stem=True), hidden_dim=16, out_dim=8, method="pixpro")
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
@pytest.mark.parametrize("flags, message", [
    (["--image-size", "32"], "1x1 with the standard stem: add --small-stem"),
    (["--image-size", "64"], "2x2 with the standard stem: add --small-stem"),  # half of all pairs positive
    (["--image-size", "24", "--small-stem"], "3x3 with the small stem: use --image-size 32 or more"),
])
def test_grids_under_4x4_stop_before_training_proposing_the_small_stem_first(tiny_shapes, tmp_path, flags, message):
    with pytest.raises(SystemExit) as stop:
        train.main(["--data", str(tiny_shapes / "train"), "--method", "pixpro", "--max-steps", "1",
                    "--out", str(tmp_path / "out"), *TINY, *flags])
    assert "at least 4x4 cells" in str(stop.value) and message in str(stop.value)
    assert not (tmp_path / "out").exists()


def test_the_smallest_accepted_grids_and_instance_only_byol_need_no_grid():
    for method in ("pixpro", "pixcontrast"):
        BYOLModule(TrainConfig(method=method, image_size=32, small_stem=True, proj_hidden=16))  # 4x4
        with pytest.raises(ValueError, match="--small-stem"):
            BYOLModule(TrainConfig(method=method, image_size=96, proj_hidden=16))  # 3x3
    BYOLModule(TrainConfig(method="byol", image_size=32, proj_hidden=16))


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


def test_feature_pca_of_a_map_that_encodes_only_position_is_flat():
    """The same position code in every image (what zero padding gives a network) is removed: the
    colours show only what differs between images at a place."""
    rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    position = torch.stack([rows, cols, rows * cols]).unsqueeze(0).repeat(6, 1, 1, 1)  # (6, 3, 4, 4)
    assert feature_pca_rgb(position, remove_position=False).std() > 0.2  # a ramp, the same in all six
    assert feature_pca_rgb(position).std() < 1e-4
    content = torch.zeros(6, 3, 4, 4)
    content[:3, :, :2] = 1.0  # an "object" in the top half of three images
    rgb = feature_pca_rgb(position + content)
    torch.testing.assert_close(rgb, feature_pca_rgb(content))  # the colours of the content alone
    object_colour, rest_colour = rgb[0, :2, :, 0].mean(), rgb[0, 2:, :, 0].mean()
    assert (object_colour - rest_colour).abs() > 0.4


def test_cell_similarity_finds_the_same_content_elsewhere_not_the_same_place():
    rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    maps = torch.stack([rows, cols, torch.zeros(4, 4)]).unsqueeze(0).repeat(4, 1, 1, 1)
    maps[0, 2, 0, 0] = maps[1, 2, 3, 3] = 5.0  # the same thing at opposite corners of two images
    similarity = cell_similarity(maps, index=0, cell=(0, 0))
    assert similarity.shape == (4, 4, 4)
    assert similarity[1].argmax() == 15  # image 1's most similar cell is the far corner
    fig = plot_cell_similarity(maps, torch.zeros(4, 3, 16, 16, dtype=torch.uint8), index=0, cell=(0, 0))
    assert len(fig.axes[0].patches) == 1  # the chosen cell is outlined
