"""Every figure the notebooks show. Functions return a matplotlib Figure and never call show()."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch
from einops import rearrange
from matplotlib.patches import Rectangle

from byol_nb.run_logs import attempt_start, metrics_files, read_metrics

# What each logged metric is, in words: (title, y-axis label).
METRIC_LABELS = {
    "train/loss": ("training loss", "loss"),
    "train/instance_loss": ("instance (BYOL) loss", "loss"),
    "train/pixel_loss": ("pixel (PixPro) loss", "loss"),
    "train/collapse_std": ("spread of the embeddings\n(1: spread out, 0: collapsed)", "collapse_std"),
    "knn_top1": ("kNN accuracy on held-out images", "top-1 (%)"),
    "train/tau": ("EMA momentum", "tau"),
    "train/lr": ("learning rate", "lr"),
}


def plot_training_curves(path: str | Path, keys: tuple[str, ...] = ("train/loss", "train/collapse_std", "knn_top1"),
                         random_init: float | None = None):
    """A run's curves against the global step: by default the loss, the collapse monitor and the kNN
    accuracy (with the random network's score as a dashed line: ``random_init``, or the run's
    metrics.json). A dotted vertical line marks each step where a resumed attempt took over."""
    path = Path(path)
    series = read_metrics(path)
    if random_init is None and (path / "metrics.json").is_file():
        random_init = json.loads((path / "metrics.json").read_text()).get("knn_top1_random_init")
    resumed = [attempt_start(f) for f in metrics_files(path)[1:]]
    present = [k for k in keys if k in series]
    fig, axes = plt.subplots(1, max(1, len(present)), figsize=(4 * max(1, len(present)), 3), squeeze=False)
    for ax, key in zip(axes[0], present):
        steps, values = zip(*series[key])
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3)
        title, ylabel = METRIC_LABELS.get(key, (key, key))
        ax.set(title=title, xlabel="global step", ylabel=ylabel)
        if key == "knn_top1" and random_init is not None:
            ax.axhline(random_init, color="gray", linestyle="--", label=f"random init ({random_init:.1f})")
            ax.legend(fontsize=8)
        for step in resumed:
            ax.axvline(step, color="tab:red", linestyle=":", linewidth=1)
    if resumed:
        fig.suptitle(f"dotted red line: resumed from the checkpoint of step {', '.join(map(str, resumed))}",
                     fontsize=9)
    fig.tight_layout()
    return fig


# ---- course figures: images, views and crop boxes, simple curves --------------------------------

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
               logy: bool = False, logx: bool = False, size: tuple[float, float] = (5, 3)):
    """One axis with a line per entry; values are a list of y, or an (x, y) pair of sequences."""
    fig, ax = plt.subplots(figsize=size)
    for name, values in series.items():
        x, y = values if isinstance(values, tuple) else (range(len(values)), values)
        x, y = list(x), list(y)
        ax.plot(x, y, label=name, marker="o" if len(y) < 25 else None, markersize=3)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if logy:
        ax.set_yscale("log")
    if logx:  # ticks at the values themselves, written as plain numbers
        ax.set_xscale("log")
        ax.set_xticks(sorted({float(v) for values in series.values() if isinstance(values, tuple) for v in values[0]}))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
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


def plot_embeddings(features: dict[str, "torch.Tensor"], labels: "torch.Tensor", classes: list[str],
                    size: float = 3.6):
    """Each representation's features (N, dim) projected on their two principal components, one
    point per image coloured by its class: classes that form separate clusters here are easy for a
    linear probe. The projection is each representation's own (standardised features, PCA)."""
    fig, axes = plt.subplots(1, len(features), figsize=(size * len(features), size), squeeze=False)
    for ax, (name, x) in zip(axes[0], features.items()):
        x = x.float()
        x = (x - x.mean(0)) / (x.std(0) + 1e-6)
        _, _, directions = torch.pca_lowrank(x, q=2, center=False)
        points = (x @ directions).numpy()
        for c, cls in enumerate(classes):
            chosen = (labels == c).numpy()
            ax.scatter(points[chosen, 0], points[chosen, 1], s=4, alpha=0.6, color=f"C{c % 10}", label=cls)
        ax.set(title=name, xticks=[], yticks=[])
    axes[0][-1].legend(fontsize=7, markerscale=3, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return fig


def image_rows(rows: dict[str, "torch.Tensor"], size: float = 1.2, title: str = ""):
    """One row of images (N, 3, H, W) per entry, the entry's name written left of the row."""
    return _named_rows({name: [to_display(image) for image in images] for name, images in rows.items()}, size, title)


def _named_rows(rows: dict[str, list[np.ndarray]], size: float, title: str = ""):
    """A grid of pictures (anything ``imshow`` draws), one named row per entry, no axes."""
    ncols = max(len(pictures) for pictures in rows.values())
    fig, axes = plt.subplots(len(rows), ncols, figsize=(size * ncols + 1.0, size * len(rows)), squeeze=False)
    for r, (name, pictures) in enumerate(rows.items()):
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c < len(pictures):
                ax.imshow(pictures[c], interpolation="nearest")
        axes[r, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=9)
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
    return _columns([[to_display(image) for image in images], [colour_mask(masks[i]) for i in range(len(images))]],
                    titles, size)


def _columns(rows: list[list[np.ndarray]], titles: list[str] | None, size: float):
    """Rows of pictures (anything ``imshow`` draws) of one length, lined up in columns, no axes;
    ``titles`` over the first row."""
    n = len(rows[0])
    fig, axes = plt.subplots(len(rows), n, figsize=(size * n, size * len(rows) + 0.2), squeeze=False)
    for row_axes, pictures in zip(axes, rows):
        for ax, picture in zip(row_axes, pictures):
            ax.imshow(picture, interpolation="nearest")
            ax.axis("off")
    for ax, title in zip(axes[0], titles or []):
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return fig


def plot_mask_predictions(images: "torch.Tensor", masks: "torch.Tensor", predictions: dict[str, "torch.Tensor"],
                          size: float = 1.3):
    """Images (N, 3, H, W), their true masks (N, H, W) and each method's predicted masks, one row
    each, in the colours of :func:`colour_mask` (black: background)."""
    mask_rows = {"true mask": masks, **predictions}
    rows = {"image": [to_display(image) for image in images],
            **{name: [colour_mask(mask) for mask in shown] for name, shown in mask_rows.items()}}
    return _named_rows(rows, size)


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


def without_position(feature_maps: "torch.Tensor") -> "torch.Tensor":
    """Feature maps (B, C, H, W) minus their mean over the images at each cell position.

    A convolutional network's features also say *where* a cell is: zero padding makes the borders
    differ from the middle, so the strongest directions of untrained (and many trained) features
    are a ramp from one corner to the other, the same in every image. What stays after removing the
    average map of the batch is what differs between images at the same place: their content.
    """
    fmap = feature_maps.detach().float().cpu()
    return fmap - fmap.mean(0, keepdim=True) if len(fmap) > 1 else fmap


def feature_pca_rgb(feature_maps: "torch.Tensor", remove_position: bool = True) -> "torch.Tensor":
    """Feature maps (B, C, H, W) or (C, H, W) as colours (B, H, W, 3) in [0, 1]: the first three
    principal components of all cells of the batch together (so colours are comparable across
    images), each scaled to [0, 1]. ``remove_position`` first subtracts the mean map of the batch
    (:func:`without_position`), so that the colours show content rather than where a cell is.
    Signs are fixed so the same features always give the same colours.
    """
    fmap = feature_maps.detach().float().cpu()
    if fmap.ndim == 3:
        fmap = fmap.unsqueeze(0)
    if remove_position:
        fmap = without_position(fmap)
    batch, channels, height, width = fmap.shape
    cells = rearrange(fmap, "b c h w -> (b h w) c")
    cells = cells - cells.mean(0)
    _, _, directions = torch.linalg.svd(cells, full_matrices=False)
    directions = directions[:3]
    directions = directions * directions.gather(1, directions.abs().argmax(1, keepdim=True)).sign()
    components = cells @ directions.T
    if components.shape[1] < 3:  # fewer channels or cells than three components
        components = torch.cat([components, components.new_zeros(len(components), 3 - components.shape[1])], 1)
    low, high = components.min(0).values, components.max(0).values
    scaled = (components - low) / (high - low).clamp_min(1e-6)
    return rearrange(scaled, "(b h w) rgb -> b h w rgb", b=batch, h=height, w=width)


def plot_feature_pca(feature_maps: "torch.Tensor", images: "torch.Tensor | None" = None,
                     titles: list[str] | None = None, panel: float = 1.6, remove_position: bool = True):
    """A feature map per image shown as colours (:func:`feature_pca_rgb`), under the images when given
    (uint8 or [0, 1] float (B, 3, S, S)): cells that show the same kind of thing share a colour."""
    rgb = [colours.numpy() for colours in feature_pca_rgb(feature_maps, remove_position)]
    shown = [] if images is None else [[to_display(images[i]) for i in range(len(rgb))]]
    return _columns([*shown, rgb], titles, panel)


def cell_similarity(feature_maps: "torch.Tensor", index: int, cell: tuple[int, int],
                    remove_position: bool = True) -> "torch.Tensor":
    """Cosine similarity (B, H, W) of every cell of every image to one chosen cell: ``cell`` (row,
    column) of image ``index``. With ``remove_position`` (:func:`without_position`) a high value
    means "shows the same kind of thing", not "sits at the same place"."""
    fmap = without_position(feature_maps) if remove_position else feature_maps.detach().float().cpu()
    unit = torch.nn.functional.normalize(fmap, dim=1)
    chosen = unit[index, :, cell[0], cell[1]]
    return torch.einsum("c,bchw->bhw", chosen, unit)


def plot_cell_similarity(feature_maps: "torch.Tensor", images: "torch.Tensor", index: int, cell: tuple[int, int],
                         remove_position: bool = True, panel: float = 1.6):
    """The images, the chosen cell outlined on image ``index``, and under each a heat map of every
    cell's :func:`cell_similarity` to the chosen one: where the network sees what it sees there."""
    similarity = cell_similarity(feature_maps, index, cell, remove_position)
    n, (height, width), side = len(images), similarity.shape[-2:], images.shape[-1]
    fig, axes = plt.subplots(2, n, figsize=(panel * n + 0.8, 2 * panel + 0.2), squeeze=False)
    for i in range(n):
        axes[0, i].imshow(to_display(images[i]), interpolation="nearest")
        shown = axes[1, i].imshow(similarity[i].numpy(), cmap="magma", vmin=-1, vmax=1, interpolation="nearest")
        for ax in axes[:, i]:
            ax.axis("off")
    row, col = cell
    cell_h, cell_w = side / height, side / width
    axes[0, index].add_patch(Rectangle((col * cell_w - 0.5, row * cell_h - 0.5), cell_w, cell_h, fill=False,
                                       edgecolor="cyan", linewidth=2))
    axes[1, index].add_patch(Rectangle((col - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="cyan", linewidth=2))
    fig.colorbar(shown, ax=axes[1].tolist(), fraction=0.02, label="cosine to the outlined cell")
    return fig
