"""Every figure the notebooks show. Functions return a matplotlib Figure and never call show()."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use(matplotlib.get_backend() if "inline" in matplotlib.get_backend() else "Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics_csv(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Lightning's CSV log as {metric: [(step, value), ...]}, empty cells dropped."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            step = int(row.get("step") or 0)
            for key, value in row.items():
                if key not in ("step", "epoch") and value not in ("", None):
                    series.setdefault(key, []).append((step, float(value)))
    return series


def plot_training_curves(path: str | Path, keys: tuple[str, ...] = ("train/loss", "train/collapse_std", "knn_top1")):
    """Loss, collapse monitor and kNN accuracy against the global step."""
    series = read_metrics_csv(path)
    present = [k for k in keys if k in series]
    fig, axes = plt.subplots(1, max(1, len(present)), figsize=(4 * max(1, len(present)), 3), squeeze=False)
    for ax, key in zip(axes[0], present):
        steps, values = zip(*series[key])
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
    fig.tight_layout()
    return fig


# ---- course figures: images, views and crop boxes, simple curves --------------------------------
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

VIEW_COLOURS = ("tab:orange", "tab:blue")


def to_display(image: "torch.Tensor") -> np.ndarray:
    """One image (3, H, W), uint8 or float in [0, 1], as an (H, W, 3) float array for imshow.

    Normalised network inputs must go through :func:`byol_nb.augment.denormalize` first.
    """
    image = image.detach().cpu()
    if image.dtype == torch.uint8:
        image = image.float() / 255
    return image.clamp(0, 1).permute(1, 2, 0).numpy()


def image_grid(images: "torch.Tensor", titles: list[str] | None = None, ncols: int = 8,
               size: float = 1.4, suptitle: str | None = None):
    """A grid of images (N, 3, H, W) (uint8 or [0, 1] float), optionally titled."""
    n = len(images)
    ncols = max(1, min(ncols, n))
    nrows = max(1, -(-n // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + (0.3 if suptitle else 0)),
                             squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(to_display(images[i]), interpolation="nearest")
            if titles is not None:
                ax.set_title(titles[i], fontsize=8)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    return fig


def draw_box(ax, box: "torch.Tensor", image_size: int, colour: str, flipped: bool = False,
             label: str | None = None) -> None:
    """Draw a crop box (x0, y0, x1, y1) in [0, 1] coordinates on an image axis; dashed when flipped."""
    x0, y0, x1, y1 = (float(v) * image_size - 0.5 for v in box)
    ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=2,
                           linestyle="--" if flipped else "-"))
    if label:
        ax.text(x0 + 1, y0 + 1, label, color="white", fontsize=7, va="top",
                bbox=dict(facecolor=colour, alpha=0.8, pad=1, linewidth=0))


def plot_views(originals: "torch.Tensor", view1, view2, n: int = 6, size: float = 1.6):
    """Originals with both crop boxes drawn on them (dashed = flipped view), then view 1 and view 2.

    ``view1``/``view2`` are :class:`byol_nb.augment.View` s of ``originals`` (normalised images).
    """
    from byol_nb.augment import denormalize

    n = min(n, len(originals))
    fig, axes = plt.subplots(3, n, figsize=(size * n, size * 3 + 0.2), squeeze=False)
    rows = (("original", None), ("view 1", view1), ("view 2", view2))
    for r, (name, view) in enumerate(rows):
        for i in range(n):
            ax = axes[r, i]
            ax.axis("off")
            if view is None:
                ax.imshow(to_display(originals[i]), interpolation="nearest")
                for k, v in enumerate((view1, view2)):
                    draw_box(ax, v.boxes[i], originals.shape[-1], VIEW_COLOURS[k], bool(v.flips[i]), str(k + 1))
            else:
                ax.imshow(to_display(denormalize(view.images[i:i + 1])[0]), interpolation="nearest")
                for spine in ax.spines.values():
                    spine.set_edgecolor(VIEW_COLOURS[r - 1])
            if i == 0:
                ax.set_title(name, fontsize=9, loc="left")
    fig.tight_layout()
    return fig


def explorer_config(image_size: int, crop_min_scale: float = 0.08, jitter_strength: float = 1.0,
                    blur_p: float = 0.5, solarize_p: float = 0.1):
    """The :class:`byol_nb.augment.AugmentConfig` behind the augmentation explorer's sliders.

    ``jitter_strength`` scales BYOL's (0.4, 0.4, 0.2, 0.1) jitter; ``blur_p`` and ``solarize_p`` are
    used for *both* views (the recipe itself uses 1.0 / 0.1 and 0.0 / 0.2) so their effect is visible.
    """
    from byol_nb.augment import AugmentConfig, ViewRecipe

    if not 0 < crop_min_scale <= 1:
        raise ValueError(f"crop_min_scale must be in (0, 1], got {crop_min_scale}")
    s = float(jitter_strength)
    recipe = ViewRecipe(blur_p=float(blur_p), solarize_p=float(solarize_p))
    return AugmentConfig(image_size, crop_scale=(float(crop_min_scale), 1.0),
                         jitter=(0.4 * s, 0.4 * s, 0.2 * s, min(0.1 * s, 0.5)), views=(recipe, recipe))


def augment_explorer(originals: "torch.Tensor", crop_min_scale: float = 0.08, jitter_strength: float = 1.0,
                     blur_p: float = 0.5, solarize_p: float = 0.1, seed: int = 0, n: int = 6):
    """Two views of ``originals`` (uint8) drawn with the explorer's settings, as :func:`plot_views`."""
    from byol_nb.augment import TwoViewAugment

    config = explorer_config(originals.shape[-1], crop_min_scale, jitter_strength, blur_p, solarize_p)
    view1, view2 = TwoViewAugment(config)(originals[:n], seed=int(seed))
    return plot_views(originals, view1, view2, n=n)


def plot_lines(series: dict, title: str = "", xlabel: str = "step", ylabel: str = "",
               logy: bool = False, size: tuple[float, float] = (5, 3)):
    """One axis with a line per entry; values are a list of y, or an (x, y) pair of sequences."""
    fig, ax = plt.subplots(figsize=size)
    for name, values in series.items():
        x, y = values if isinstance(values, tuple) else (range(len(values)), values)
        x, y = list(x), list(y)
        ax.plot(x, y, label=name, marker="o" if len(y) < 25 else None, markersize=3)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if logy:
        ax.set_yscale("log")
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_bars(values: dict[str, float], title: str = "", ylabel: str = "", fmt: str = "{:.0f}",
              size: tuple[float, float] = (5, 3)):
    """A labelled bar per entry, with its value written on top."""
    fig, ax = plt.subplots(figsize=size)
    names, heights = list(values), [float(v) for v in values.values()]
    bars = ax.bar(names, heights, color=[f"C{i}" for i in range(len(names))])
    for bar, h in zip(bars, heights):
        ax.text(bar.get_x() + bar.get_width() / 2, h, fmt.format(h), ha="center", va="bottom", fontsize=8)
    ax.set(title=title, ylabel=ylabel)
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    return fig


def image_rows(rows: dict[str, "torch.Tensor"], size: float = 1.2):
    """One row of images (N, 3, H, W) per entry, the entry's name written left of the row."""
    ncols = max(len(images) for images in rows.values())
    fig, axes = plt.subplots(len(rows), ncols, figsize=(size * ncols + 1.0, size * len(rows)), squeeze=False)
    for r, (name, images) in enumerate(rows.items()):
        for c in range(ncols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c < len(images):
                ax.imshow(to_display(images[c]), interpolation="nearest")
        axes[r, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
    fig.tight_layout()
    return fig


MASK_COLOURS = np.array([[0, 0, 0], [228, 26, 28], [55, 126, 184], [77, 175, 74], [152, 78, 163],
                         [255, 127, 0], [255, 255, 51], [166, 86, 40], [247, 129, 191], [153, 153, 153]],
                        dtype=np.float64) / 255


def colour_mask(mask: "torch.Tensor | np.ndarray") -> np.ndarray:
    """An integer mask (H, W), 0 = background, as an (H, W, 3) RGB array (black background)."""
    mask = np.asarray(mask, dtype=np.int64)
    return MASK_COLOURS[mask % len(MASK_COLOURS)]


def plot_image_masks(images: "torch.Tensor", masks: "torch.Tensor | np.ndarray", titles: list[str] | None = None,
                     size: float = 1.5):
    """Images (N, 3, H, W) above their segmentation masks (N, H, W)."""
    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(size * n, size * 2 + 0.2), squeeze=False)
    for i in range(n):
        axes[0, i].imshow(to_display(images[i]), interpolation="nearest")
        axes[1, i].imshow(colour_mask(masks[i]), interpolation="nearest")
        if titles is not None:
            axes[0, i].set_title(titles[i], fontsize=8)
        for ax in axes[:, i]:
            ax.axis("off")
    fig.tight_layout()
    return fig


def plot_box_sets(box_sets: dict[str, "torch.Tensor"], size: float = 3.0):
    """Crop boxes (N, 4) in [0, 1] coordinates drawn over a unit square, one panel per entry."""
    fig, axes = plt.subplots(1, len(box_sets), figsize=(size * len(box_sets), size), squeeze=False)
    for ax, (name, boxes) in zip(axes[0], box_sets.items()):
        for i, box in enumerate(boxes):
            x0, y0, x1, y1 = (float(v) for v in box)
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=f"C{i % 10}", linewidth=1.5))
        ax.set(xlim=(0, 1), ylim=(1, 0), aspect="equal", title=name)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return fig


def plot_matrix(matrix: "torch.Tensor | np.ndarray", title: str = "", xlabel: str = "", ylabel: str = "",
                vmin: float | None = -1, vmax: float | None = 1, size: float = 3.2):
    """A heat map with a colour bar, e.g. cosine similarities between two sets of embeddings."""
    matrix = matrix.detach().cpu().numpy() if isinstance(matrix, torch.Tensor) else np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(size * 1.2, size))
    shown = ax.imshow(matrix, cmap="viridis", vmin=vmin, vmax=vmax, interpolation="nearest")
    fig.colorbar(shown, ax=ax, fraction=0.046)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    fig.tight_layout()
    return fig


def plot_agreement(panels: dict[str, tuple["torch.Tensor", "torch.Tensor"]], xlabel: str = "reference",
                   ylabel: str = "compared", size: float = 3.0):
    """One scatter panel per entry, ``(reference, compared)`` values against the diagonal y = x, with the
    largest absolute difference in the title: points on the line mean the two computations agree."""
    fig, axes = plt.subplots(1, len(panels), figsize=(size * len(panels), size + 0.3), squeeze=False)
    for ax, (name, (x, y)) in zip(axes[0], panels.items()):
        x = torch.as_tensor(x).detach().flatten().float()
        y = torch.as_tensor(y).detach().flatten().float()
        low, high = float(torch.minimum(x.min(), y.min())), float(torch.maximum(x.max(), y.max()))
        ax.plot([low, high], [low, high], color="gray", linewidth=1, linestyle=":")
        ax.scatter(x.numpy(), y.numpy(), s=6, alpha=0.6)
        ax.set_title(f"{name}\nmax |diff| = {float((x - y).abs().max()):.1e}", fontsize=9)
        ax.set(xlabel=xlabel, ylabel=ylabel)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return fig


# ---- PixPro figures: positive pixel pairs, feature maps as colours --------------------------------


def plot_positive_pairs(view1, view2, size: tuple[int, int], cell: tuple[int, int], index: int = 0,
                        threshold: float = 0.7, panel: float = 2.6):
    """PixPro's positive pairs for one feature-map cell: ``cell`` = (row, column) of view 1 outlined,
    and every cell of view 2 that :func:`byol_nb.losses.positive_pixel_mask` pairs with it lit up.

    ``view1``/``view2`` are :class:`byol_nb.augment.View` s, ``index`` picks the sample and ``size``
    is the feature map's (H, W), e.g. ``Backbone.feature_map(images).shape[-2:]``.
    """
    from byol_nb.augment import denormalize
    from byol_nb.losses import positive_pixel_mask

    height, width = size
    row, col = cell
    if not (0 <= row < height and 0 <= col < width):
        raise ValueError(f"cell {cell} is outside the {height}x{width} feature map")
    pick = slice(index, index + 1)
    mask = positive_pixel_mask(view1.boxes[pick], view1.flips[pick], view2.boxes[pick], view2.flips[pick],
                               size, threshold)[0]
    positives = mask[row * width + col].view(height, width)
    side = view1.images.shape[-1]
    cell_w, cell_h = side / width, side / height
    fig, axes = plt.subplots(1, 2, figsize=(2 * panel, panel + 0.3))
    for ax, view in zip(axes, (view1, view2)):
        ax.imshow(to_display(denormalize(view.images[pick])[0]), interpolation="nearest")
        for k in range(1, width):
            ax.axvline(k * cell_w - 0.5, color="white", linewidth=0.5, alpha=0.5)
        for k in range(1, height):
            ax.axhline(k * cell_h - 0.5, color="white", linewidth=0.5, alpha=0.5)
        ax.axis("off")
    axes[0].add_patch(Rectangle((col * cell_w - 0.5, row * cell_h - 0.5), cell_w, cell_h, facecolor=VIEW_COLOURS[0],
                                alpha=0.45, edgecolor=VIEW_COLOURS[0], linewidth=2))
    for r, c in positives.nonzero().tolist():
        axes[1].add_patch(Rectangle((c * cell_w - 0.5, r * cell_h - 0.5), cell_w, cell_h, facecolor=VIEW_COLOURS[0],
                                    alpha=0.45, edgecolor=VIEW_COLOURS[0], linewidth=2))
    flips = ", ".join(f"view {k + 1} flipped" for k, v in enumerate((view1, view2)) if bool(v.flips[index]))
    axes[0].set_title(f"view 1, cell {tuple(cell)}", fontsize=9)
    axes[1].set_title(f"view 2: {int(positives.sum())} positive cell(s)", fontsize=9)
    if flips:
        fig.suptitle(flips, fontsize=8)
    fig.tight_layout()
    return fig


def feature_pca_rgb(feature_maps: "torch.Tensor") -> "torch.Tensor":
    """Feature maps (B, C, H, W) or (C, H, W) as colours (B, H, W, 3) in [0, 1]: the first three
    principal components of all cells of the batch together (so colours are comparable across
    images), each scaled to [0, 1]. Signs are fixed so the same features always give the same colours.
    """
    fmap = feature_maps.detach().float().cpu()
    if fmap.ndim == 3:
        fmap = fmap.unsqueeze(0)
    batch, channels, height, width = fmap.shape
    cells = fmap.permute(0, 2, 3, 1).reshape(-1, channels)
    cells = cells - cells.mean(0)
    _, _, directions = torch.linalg.svd(cells, full_matrices=False)
    directions = directions[:3]
    directions = directions * directions.gather(1, directions.abs().argmax(1, keepdim=True)).sign()
    components = cells @ directions.T
    if components.shape[1] < 3:  # fewer channels or cells than three components
        components = torch.cat([components, components.new_zeros(len(components), 3 - components.shape[1])], 1)
    low, high = components.min(0).values, components.max(0).values
    scaled = (components - low) / (high - low).clamp_min(1e-12)
    return scaled.view(batch, height, width, 3)


def plot_feature_pca(feature_maps: "torch.Tensor", images: "torch.Tensor | None" = None,
                     titles: list[str] | None = None, panel: float = 1.6):
    """A feature map per image shown as colours (:func:`feature_pca_rgb`), under the images when given
    (uint8 or [0, 1] float (B, 3, S, S)): cells of one object should share a colour."""
    rgb = feature_pca_rgb(feature_maps)
    n = len(rgb)
    rows = 1 if images is None else 2
    fig, axes = plt.subplots(rows, n, figsize=(panel * n, panel * rows + 0.2), squeeze=False)
    for i in range(n):
        if images is not None:
            axes[0, i].imshow(to_display(images[i]), interpolation="nearest")
        axes[-1, i].imshow(rgb[i].numpy(), interpolation="nearest")
        if titles is not None:
            axes[0, i].set_title(titles[i], fontsize=8)
        for ax in axes[:, i]:
            ax.axis("off")
    fig.tight_layout()
    return fig
