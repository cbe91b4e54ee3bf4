"""Every figure the notebooks show. Functions return a matplotlib Figure and never call show()."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use(matplotlib.get_backend() if "inline" in matplotlib.get_backend() else "Agg")
import matplotlib.pyplot as plt  # noqa: E402
from einops import rearrange  # noqa: E402


def _attempt_start(csv_file: Path) -> int:
    """The global step a logged attempt starts from (``logs/from_step_<k>/metrics.csv``), else 0."""
    name = csv_file.parent.name
    return int(name.rsplit("_", 1)[1]) if name.startswith("from_step_") else 0


def metrics_files(path: str | Path) -> list[Path]:
    """The metrics.csv files of a run folder (one per attempt: a resumed run adds one), in order;
    or ``path`` itself when it is a CSV file."""
    path = Path(path)
    if path.is_file():
        return [path]
    return sorted((path / "logs").glob("from_step_*/metrics.csv"), key=_attempt_start)


def read_metrics(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """A run's logged metrics as {metric: [(step, value), ...]}, empty cells dropped.

    ``path`` is a run folder (OUT of ``python -m byol_nb.train``) or one metrics.csv. The attempts
    of a resumed run are joined: each attempt's rows replace the earlier ones from its first step on
    (a run killed between two checkpoints logged steps that the resumed attempt trains again).
    """
    series: dict[str, list[tuple[int, float]]] = {}
    for csv_file in metrics_files(path):
        start = _attempt_start(csv_file)
        series = {key: [(step, v) for step, v in values if step < start] for key, values in series.items()}
        with open(csv_file, newline="") as handle:
            for row in csv.DictReader(handle):
                step = int(row.get("step") or 0)
                for key, value in row.items():
                    if key not in ("step", "epoch") and value not in ("", None):
                        series.setdefault(key, []).append((step, float(value)))
    return series


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
    resumed = [_attempt_start(f) for f in metrics_files(path)[1:]]
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


# ---- diagrams: the methods drawn as boxes and arrows ----------------------------------------------
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

ONLINE_COLOUR, TARGET_COLOUR, EMA_COLOUR, STOP_COLOUR = "tab:orange", "tab:blue", "tab:purple", "crimson"


def _canvas(width: float, height: float, title: str) -> tuple[Figure, Axes]:
    """An empty axis, axes off, on a ``width`` x ``height`` inch figure: one data unit is about an inch."""
    fig, ax = plt.subplots(figsize=(width, height))
    ax.set(xlim=(0, width), ylim=(0, height), aspect="equal")
    ax.axis("off")
    ax.set_title(title, fontsize=12)
    return fig, ax


def _box(ax: Axes, xy: tuple[float, float], text: str, colour: str = "0.35", size: tuple[float, float] = (1.5, 0.6),
         fontsize: float = 9, alpha: float = 0.15) -> FancyBboxPatch:
    """A rounded box centred on ``xy`` (inches), tinted with ``colour``, with ``text`` written inside."""
    (x, y), (w, h) = xy, size
    box = FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0,rounding_size=0.08",
                         facecolor=matplotlib.colors.to_rgba(colour, alpha), edgecolor=colour, linewidth=1.5)
    ax.add_patch(box)
    ax.text(x, y, text, ha="center", va="center", fontsize=fontsize, linespacing=1.3)
    return box


def _centre(end) -> tuple[float, float]:
    """A point, or the centre of a box."""
    if isinstance(end, tuple):
        return end
    return end.get_x() + end.get_width() / 2, end.get_y() + end.get_height() / 2


def _along(start, end, at: float) -> tuple[float, float]:
    """The point ``at`` of the way from ``start`` to ``end`` (points or boxes' centres)."""
    (x0, y0), (x1, y1) = _centre(start), _centre(end)
    return x0 + at * (x1 - x0), y0 + at * (y1 - y0)


def _arrow(ax: Axes, start, end, colour: str = "0.35", label: str = "", dashed: bool = False,
           connection: str = "arc3", label_at: float | tuple[float, float] = 0.5,
           fontsize: float = 8) -> FancyArrowPatch:
    """An arrow from ``start`` to ``end`` (each a point or a box, an arrow to a box stops at its edge),
    dashed if asked; ``label`` is written on it, ``label_at`` of the way along or at that point."""
    (x0, y0), (x1, y1) = _centre(start), _centre(end)
    arrow = FancyArrowPatch((x0, y0), (x1, y1), arrowstyle="-|>", mutation_scale=13, color=colour,
                            linewidth=1.5, linestyle="--" if dashed else "-", connectionstyle=connection,
                            patchA=None if isinstance(start, tuple) else start,
                            patchB=None if isinstance(end, tuple) else end, shrinkA=1, shrinkB=1)
    ax.add_patch(arrow)
    if label:
        xy = label_at if isinstance(label_at, tuple) else _along(start, end, label_at)
        ax.text(*xy, label, ha="center", va="center",
                fontsize=fontsize, color=colour, linespacing=1.2,
                bbox=dict(facecolor="white", edgecolor="none", pad=1.0))
    return arrow


def _stop_gradient(ax: Axes, arrow_ends: tuple, at: float, label_xy: tuple[float, float]) -> None:
    """A cross ``at`` of the way along the target's arrow into the loss, and the words saying that no
    gradient flows back through it."""
    ax.plot(*_along(*arrow_ends, at), marker="X", markersize=11, color=STOP_COLOUR, markeredgecolor="white",
            zorder=5)
    ax.text(*label_xy, "stop-gradient\n(no backward)", ha="center", va="center", fontsize=8.5,
            color=STOP_COLOUR, fontweight="bold")


def diagram_byol() -> Figure:
    """BYOL's two networks, from one image to the loss.

    Two augmented views of the image go through an *online* network (backbone, projector, predictor;
    weights θ, trained) and a *target* network (backbone, projector; weights ξ, not trained): the
    online prediction q must match the target's projection z' (cosine). No gradient flows into the
    target (stop-gradient); its weights follow the online ones by an exponential moving average. The
    predictor and the slowly moving target are what keep the two networks from collapsing to a constant.
    """
    fig, ax = _canvas(12, 5, "BYOL: an online network learns to predict a slowly moving target network")
    top, bottom = 3.8, 1.2
    image = _box(ax, (0.6, 2.5), "image\nx", size=(0.9, 0.8))
    v1 = _box(ax, (2.0, top), "view v", ONLINE_COLOUR, size=(1.0, 0.6))
    v2 = _box(ax, (2.0, bottom), "view v'", TARGET_COLOUR, size=(1.0, 0.6))
    _arrow(ax, image, v1, label="augment t")
    _arrow(ax, image, v2, label="augment t'")
    online = [v1, _box(ax, (3.7, top), "backbone\n" + r"$f_\theta$", ONLINE_COLOUR),
              _box(ax, (5.4, top), "projector\n" + r"$g_\theta$", ONLINE_COLOUR),
              _box(ax, (7.1, top), "predictor\n" + r"$q_\theta$", ONLINE_COLOUR),
              _box(ax, (8.8, top), "prediction\nq", ONLINE_COLOUR, size=(1.2, 0.6))]
    target = [v2, _box(ax, (3.7, bottom), "backbone\n" + r"$f_\xi$", TARGET_COLOUR),
              _box(ax, (5.4, bottom), "projector\n" + r"$g_\xi$", TARGET_COLOUR),
              _box(ax, (8.8, bottom), "projection\nz'", TARGET_COLOUR, size=(1.2, 0.6))]
    for branch, colour in ((online, ONLINE_COLOUR), (target, TARGET_COLOUR)):
        for a, b in zip(branch, branch[1:]):
            _arrow(ax, a, b, colour, label="no predictor" if b is target[-1] else "")
    loss = _box(ax, (10.85, 2.5), "loss\n" + r"$2 - 2\cos(q, \mathrm{sg}(z'))$", size=(2.1, 0.8), fontsize=10)
    _arrow(ax, online[-1], loss, ONLINE_COLOUR)
    _arrow(ax, target[-1], loss, TARGET_COLOUR, dashed=True)
    _stop_gradient(ax, (target[-1], loss), 0.5, (10.75, 1.45))
    for a, b in zip(online[1:3], target[1:3]):
        _arrow(ax, a, b, EMA_COLOUR, dashed=True)
    ax.text(4.55, 2.5, "EMA\nξ ← τξ + (1−τ)θ", ha="center", va="center", fontsize=9, color=EMA_COLOUR)
    ax.text(3.0, 4.5, "online network (θ): trained by gradient descent", color=ONLINE_COLOUR, fontsize=9.5)
    ax.text(3.0, 0.4, "target network (ξ): no gradient, follows θ by EMA", color=TARGET_COLOUR, fontsize=9.5)
    ax.text(11.9, 4.5, "symmetrised: the views swap roles,\nthe two losses are summed", ha="right",
            fontsize=9, style="italic", color="0.3")
    fig.tight_layout()
    return fig


def _feature_grid(ax: Axes, centre: tuple[float, float], colour: str, cells: int = 4,
                  side: float = 0.9) -> Rectangle:
    """A feature map drawn as ``cells`` x ``cells`` squares; returns its outline (for arrows)."""
    x0, y0 = centre[0] - side / 2, centre[1] - side / 2
    step = side / cells
    for i in range(cells):
        for j in range(cells):
            ax.add_patch(Rectangle((x0 + j * step, y0 + i * step), step, step, facecolor=colour,
                                   alpha=0.2 + 0.5 * ((i * 3 + j * 5) % 7) / 7, edgecolor="white", linewidth=1))
    outline = Rectangle((x0, y0), side, side, fill=False, edgecolor=colour, linewidth=1.5)
    ax.add_patch(outline)
    return outline


def diagram_pixpro() -> Figure:
    """PixPro's pipeline, from two crops of one image to the pixel loss.

    Each view's feature map is kept as a grid of cells (no pooling). A pixel projector maps every
    cell; on the online side the PPM smooths each cell with the cells it resembles. A cell of view 1
    must predict the target cells of view 2 that show the same place of the original image: the
    positive pairs, found from the crop boxes alone. The target side gets no gradient and follows the
    online weights by EMA, as in BYOL.
    """
    fig, ax = _canvas(13, 5.0, "PixPro: every cell of one view predicts the cells of the other view "
                               "that show the same place")
    top, bottom = 4.1, 1.3
    ax.add_patch(Rectangle((0.2, 1.95), 1.6, 1.6, facecolor="0.9", edgecolor="0.35", linewidth=1.5))
    ax.text(1.0, 3.7, "original image", ha="center", fontsize=9)
    crop1 = Rectangle((0.3, 2.35), 1.05, 1.05, fill=False, edgecolor=ONLINE_COLOUR, linewidth=2)
    crop2 = Rectangle((0.7, 2.05), 0.95, 0.95, fill=False, edgecolor=TARGET_COLOUR, linewidth=2, linestyle="--")
    for crop, name, xy in ((crop1, "1", (0.4, 3.2)), (crop2, "2", (1.5, 2.15))):
        ax.add_patch(crop)
        ax.text(*xy, name, ha="center", va="center", fontsize=9, fontweight="bold", color=crop.get_edgecolor())
    v1 = _box(ax, (3.0, top), "view 1", ONLINE_COLOUR, size=(1.0, 0.6))
    v2 = _box(ax, (3.0, bottom), "view 2", TARGET_COLOUR, size=(1.0, 0.6))
    _arrow(ax, crop1, v1, ONLINE_COLOUR, label="crop 1")
    _arrow(ax, crop2, v2, TARGET_COLOUR, label="crop 2")
    ax.text(6.1, top + 0.55, "feature map (4×4)", ha="center", fontsize=8.5)
    ax.text(6.1, bottom + 0.55, "feature map (4×4)", ha="center", fontsize=8.5)
    chains = []
    for y, view, colour, weights in ((top, v1, ONLINE_COLOUR, r"\theta"), (bottom, v2, TARGET_COLOUR, r"\xi")):
        chain = [view, _box(ax, (4.5, y), f"backbone\n$f_{weights}$", colour, size=(1.3, 0.6)),
                 _feature_grid(ax, (6.1, y), colour),
                 _box(ax, (7.7, y), f"pixel projector\n$g_{weights}$", colour, size=(1.4, 0.6))]
        for a, b in zip(chain, chain[1:]):
            _arrow(ax, a, b, colour)
        chains.append(chain)
    for a, b in zip(chains[0][1::2], chains[1][1::2]):
        _arrow(ax, a, b, EMA_COLOUR, dashed=True)
    ax.text(6.1, 2.7, "EMA\nξ ← τξ + (1−τ)θ", ha="center", va="center", fontsize=9, color=EMA_COLOUR)
    ppm = _box(ax, (10.2, top), "PPM (Pixel Propagation Module)\n" + r"$y_i = \Sigma_j\, s_{ij}\, g(x_j)$"
               + "\nonline only", ONLINE_COLOUR, size=(2.5, 1.0))
    _arrow(ax, chains[0][-1], ppm, ONLINE_COLOUR)
    loss = _box(ax, (12.25, 2.7), "loss\n" + r"$-\cos(y_i, x'_j)$" + "\nover positive\npairs",
                size=(1.4, 1.1), fontsize=9.5)
    _arrow(ax, ppm, loss, ONLINE_COLOUR, label=r"$y_i$")
    _arrow(ax, chains[1][-1], loss, TARGET_COLOUR, dashed=True, label=r"$x'_j$", label_at=0.2)
    _stop_gradient(ax, (chains[1][-1], loss), 0.55, (10.0, 1.55))
    pairs = _box(ax, (10.75, 0.5), "positive pairs: cells whose centres, placed in the original\n"
                 "image through each view's crop box, are closer than\n0.7 cell diagonals",
                 size=(4.2, 0.8), fontsize=8.5)
    _arrow(ax, (12.45, 0.9), loss)
    _arrow(ax, (1.0, 1.95), pairs, label="crop boxes", connection="angle,angleA=-90,angleB=180,rad=0.1",
           label_at=(4.5, 0.5))
    fig.tight_layout()
    return fig


def diagram_ddp(world: int = 2) -> Figure:
    """Training on ``world`` processes (ranks) with DistributedDataParallel, one column per rank.

    Each rank takes its own slice of the global batch through its own copy of the model. The forward
    all-gather puts every rank's features into one tensor [x_0, x_1, ...] on every rank (so a loss or
    a statistic can see the whole batch); its backward sums the gradients of that tensor over the
    ranks (all-reduce) and each rank keeps the slice of its own features. Finally DDP averages the
    weight gradients over the ranks (all-reduce) before the optimizer step, so the copies stay identical.
    """
    column, margin, size = 3.1, 2.5, (2.65, 0.6)
    width = margin + column * world + 0.2
    fig, ax = _canvas(width, 6.3, f"Data-parallel training on {world} processes (ranks)")
    rows = {"batch": 5.6, "model": 4.4, "features": 3.3, "gathered": 1.75, "loss": 0.6}
    for y, text in ((rows["model"], "DDP, after backward:\nall-reduce (average)\nof the weight gradients,\n"
                     "then optimizer.step():\nthe copies stay identical"),
                    (rows["gathered"], "forward: all-gather,\nevery rank gets [$x_0$, $x_1$, ...]\n\n"
                     "backward: all-reduce\n(sum) of the gradients,\nthen each rank keeps\nits own slice")):
        ax.add_patch(FancyBboxPatch((0.15, y - 0.75), width - 0.3, 1.5, boxstyle="round,pad=0,rounding_size=0.1",
                                    facecolor="0.93", edgecolor="0.6", linewidth=1))
        ax.text(0.3, y, text, ha="left", va="center", fontsize=8.5, linespacing=1.25)
    centres = [margin + column * (r + 0.5) for r in range(world)]
    step = size[0] / world
    for r, cx in enumerate(centres):
        _box(ax, (cx, rows["batch"]), f"rank {r}\nbatch slice {r} of the global batch", f"C{r}", size)
        _box(ax, (cx, rows["model"]), f"model copy {r}\n(same weights on every rank)", "0.35", size, alpha=0.3)
        _box(ax, (cx, rows["features"]), f"features $x_{r}$ of this rank's slice", f"C{r}", size)
        for k in range(world):
            _box(ax, (cx - size[0] / 2 + (k + 0.5) * step, rows["gathered"]), f"$x_{k}$", f"C{k}", (step, 0.5),
                 alpha=0.7 if k == r else 0.2)
        _box(ax, (cx, rows["loss"]), "loss over the whole batch", "0.35", size)
        fwd, back = cx - 0.45, cx + 0.45
        for y0, y1 in ((rows["batch"], rows["model"]), (rows["model"], rows["features"]),
                       (rows["gathered"], rows["loss"])):
            _arrow(ax, (fwd, y0 - 0.3), (fwd, y1 + 0.3), "0.2")
            if y0 != rows["batch"]:
                _arrow(ax, (back, y1 + 0.3), (back, y0 - 0.3), "tab:red", dashed=True)
        own = cx - size[0] / 2 + (r + 0.5) * step
        _arrow(ax, (own + 0.2, rows["gathered"] + 0.25), (back, rows["features"] - 0.3), "tab:red", dashed=True)
        for k, ck in enumerate(centres):  # all-gather: x_r lands in slot r of every rank's tensor
            _arrow(ax, (cx - 0.45 + 0.25 * (k - r), rows["features"] - 0.3),
                   (ck - size[0] / 2 + (r + 0.5) * step - 0.2, rows["gathered"] + 0.25), "0.2")
    ax.legend(handles=[Line2D([], [], color="0.2", label="forward"),
                       Line2D([], [], color="tab:red", linestyle="--", label="backward (gradients)")],
              loc="lower left", bbox_to_anchor=(0.0, 0.0), fontsize=8.5, frameon=False)
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
