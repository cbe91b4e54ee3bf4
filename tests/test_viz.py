"""The course's figure functions (byol_nb.viz), called directly as the notebooks' widgets call them."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch

from byol_nb import diagrams, viz
from byol_nb.augment import AugmentConfig, TwoViewAugment


@pytest.fixture()
def images() -> torch.Tensor:
    return torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def _close(fig) -> None:
    assert isinstance(fig, matplotlib.figure.Figure)
    matplotlib.pyplot.close(fig)


def test_image_grid_titles_and_layout(images):
    fig = viz.image_grid(images, titles=[str(i) for i in range(6)], ncols=4, suptitle="x")
    assert len(fig.axes) == 8  # 2 rows x 4 columns, last two blank
    assert [ax.get_title() for ax in fig.axes[:6]] == [str(i) for i in range(6)]
    _close(fig)


def test_to_display_accepts_uint8_and_float(images):
    a = viz.to_display(images[0])
    b = viz.to_display(images[0].float() / 255)
    assert a.shape == (32, 32, 3) and abs(a - b).max() < 1e-6 and a.max() <= 1


def test_plot_views_draws_one_box_per_view_on_each_original(images):
    view1, view2 = TwoViewAugment(AugmentConfig(32))(images, seed=0)
    fig = viz.plot_views(images, view1, view2, n=4)
    axes = fig.axes
    assert len(axes) == 12
    for ax in axes[:4]:
        assert len(ax.patches) == 2
    # a flipped view's box is dashed
    styles = [p.get_linestyle() for p in axes[0].patches]
    flips = [bool(view1.flips[0]), bool(view2.flips[0])]
    assert [s == "--" for s in styles] == flips
    _close(fig)


def test_explorer_config_maps_sliders_to_the_recipe():
    config = viz.explorer_config(32, crop_min_scale=0.5, jitter_strength=0.5, blur_p=0.3, solarize_p=0.2)
    assert config.crop_scale == (0.5, 1.0)
    assert config.jitter == pytest.approx((0.2, 0.2, 0.1, 0.05))
    assert all(v.blur_p == 0.3 and v.solarize_p == 0.2 for v in config.views)
    with pytest.raises(ValueError, match="crop_min_scale"):
        viz.explorer_config(32, crop_min_scale=0)


def test_augment_explorer_boxes_respect_the_crop_scale(images):
    fig = viz.augment_explorer(images, crop_min_scale=1.0, jitter_strength=0, blur_p=0, solarize_p=0, seed=3)
    for ax in fig.axes[:6]:
        for patch in ax.patches:  # scale 1 and ratio 1 still allowed: the whole image (aspect may vary)
            assert patch.get_width() * patch.get_height() == pytest.approx(32 * 32, rel=0.35)
    _close(fig)


def test_augment_explorer_is_reproducible_from_its_seed(images):
    def pixels(seed):
        fig = viz.augment_explorer(images, seed=seed)
        data = fig.axes[6].images[0].get_array().copy()
        _close(fig)
        return data

    assert (pixels(1) == pixels(1)).all()
    assert not (pixels(1) == pixels(2)).all()


def test_plot_lines_and_bars():
    _close(viz.plot_lines({"a": [1, 2, 3], "b": ([0, 10], [3, 1])}, title="t", logy=True))
    fig = viz.plot_bars({"x": 1.0, "y": 2.5}, fmt="{:.1f}")
    assert [t.get_text() for t in fig.axes[0].texts] == ["1.0", "2.5"]
    _close(fig)


def test_image_rows_one_row_per_entry(images):
    fig = viz.image_rows({"a": images[:3], "b": images[:5]}, title="neighbours")
    assert len(fig.axes) == 10 and fig.axes[0].get_ylabel() == "a" and fig.axes[5].get_ylabel() == "b"
    assert fig._suptitle.get_text() == "neighbours"
    _close(fig)


def test_plot_mask_predictions_shows_images_true_masks_and_each_prediction():
    masks = torch.tensor([[[0, 1], [2, 3]], [[0, 0], [1, 1]]])
    fig = viz.plot_mask_predictions(torch.zeros(2, 3, 2, 2, dtype=torch.uint8), masks, {"probe": masks.flip(-1)})
    assert [fig.axes[r * 2].get_ylabel() for r in range(3)] == ["image", "true mask", "probe"]
    np.testing.assert_array_equal(fig.axes[2].images[0].get_array(), viz.colour_mask(masks[0]))
    np.testing.assert_array_equal(fig.axes[5].images[0].get_array(), viz.colour_mask(masks[1].flip(-1)))
    _close(fig)


def test_colour_mask_background_black_and_classes_distinct():
    mask = torch.tensor([[0, 1], [2, 3]])
    rgb = viz.colour_mask(mask)
    assert rgb.shape == (2, 2, 3) and (rgb[0, 0] == 0).all()
    assert len({tuple(rgb[i, j]) for i in range(2) for j in range(2)}) == 4
    _close(viz.plot_image_masks(torch.zeros(2, 3, 2, 2, dtype=torch.uint8), torch.stack([mask, mask]), ["x", "y"]))


def test_plot_box_sets_draws_every_box():
    fig = viz.plot_box_sets({"a": torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.2, 0.2, 1.0, 1.0]]),
                             "b": torch.tensor([[0.1, 0.1, 0.9, 0.9]])})
    assert [len(ax.patches) for ax in fig.axes] == [2, 1]
    _close(fig)


def test_plot_matrix_keeps_the_values():
    m = torch.eye(3)
    fig = viz.plot_matrix(m, title="cos")
    assert (fig.axes[0].images[0].get_array() == m.numpy()).all() and fig.axes[0].get_title() == "cos"
    _close(fig)


def test_plot_agreement_reports_the_largest_difference():
    fig = viz.plot_agreement({"same": (torch.arange(4.0), torch.arange(4.0)),
                              "off": (torch.zeros(3), torch.tensor([0.0, 0.5, -2.0]))})
    titles = [ax.get_title() for ax in fig.axes]
    assert "max |diff| = 0.0e+00" in titles[0] and "max |diff| = 2.0e+00" in titles[1]
    _close(fig)


def _texts(fig) -> str:
    """Every word a diagram writes (texts, titles, legend entries), joined into one line."""
    texts = [t.get_text() for ax in fig.axes for t in ax.texts] + [ax.get_title() for ax in fig.axes]
    texts += [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    return " ".join(" ".join(texts).split())


def _arrows(fig) -> list:
    return [p for ax in fig.axes for p in ax.patches if isinstance(p, matplotlib.patches.FancyArrowPatch)]


def test_diagram_byol_names_both_networks_the_stop_gradient_and_the_ema():
    fig = diagrams.diagram_byol()
    text = _texts(fig)
    for part in ("backbone", "projector", "predictor", "stop-gradient", "EMA", "ξ ← τξ + (1−τ)θ",
                 "symmetrised", r"\mathrm{sg}(z')"):
        assert part in text, part
    assert text.count("predictor") == 2  # the online predictor box, and "no predictor" on the target branch
    arrows = _arrows(fig)
    assert len(arrows) >= 12
    dashed = [a for a in arrows if a.get_linestyle() == "--"]
    assert len(dashed) == 3  # the target's arrow into the loss (stop-gradient) and two EMA arrows
    colours = {matplotlib.colors.to_hex(a.get_edgecolor()) for a in arrows}
    assert {matplotlib.colors.to_hex("tab:orange"), matplotlib.colors.to_hex("tab:blue")} <= colours
    _close(fig)


def test_diagram_pixpro_draws_the_pipeline_and_the_positive_pair_rule():
    fig = diagrams.diagram_pixpro()
    text = _texts(fig)
    for part in ("PPM", "Pixel Propagation Module", "0.7 cell diagonals", "positive pairs", "crop boxes",
                 "stop-gradient", "EMA", "pixel projector", r"-\cos(y_i, x'_j)"):
        assert part in text, part
    assert len(_arrows(fig)) >= 14
    ax = fig.axes[0]
    cells = [p for p in ax.patches if type(p) is matplotlib.patches.Rectangle and p.get_fill()]
    assert len(cells) >= 2 * 16  # two 4x4 feature maps (and the original image)
    _close(fig)


@pytest.mark.parametrize("world", [2, 3])
def test_diagram_ddp_one_column_per_rank_and_both_collectives(world):
    fig = diagrams.diagram_ddp(world=world)
    text = _texts(fig)
    for part in ("all-gather", "all-reduce (sum)", "all-reduce (average)", "optimizer.step()", "forward",
                 "backward", "its own slice"):
        assert part in text, part
    assert all(f"rank {r}" in text for r in range(world)) and f"rank {world}" not in text
    assert text.count("model copy") == world
    # every rank shows the gathered tensor [x_0, ..., x_{world-1}]: world slots on each of the world ranks
    assert sum(t.get_text() == f"$x_{k}$" for t in fig.axes[0].texts for k in range(world)) == world * world
    arrows = _arrows(fig)
    solid = [a for a in arrows if a.get_linestyle() == "-"]
    dashed = [a for a in arrows if a.get_linestyle() == "--"]
    assert len(solid) >= world * (3 + world) and len(dashed) >= world * 3  # all-gather: world x world arrows
    _close(fig)
