"""The methods drawn as boxes and arrows, from the code's own names: BYOL's two networks, PixPro's
pixel branch, and the gather of data-parallel training. Each function returns a matplotlib Figure.
"""

from __future__ import annotations

import matplotlib
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle

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
    ranks (all-reduce) and each rank keeps the slice of its own features. DDP averages the weight
    gradients over the ranks (all-reduce) during the backward pass, bucket by bucket as they are
    ready, and the optimizer steps once it is done, so the copies stay identical. Each rank's loss
    covers its own queries against every rank's keys: only the sum over ranks is the whole batch's.
    """
    column, margin, size = 3.1, 2.5, (2.65, 0.6)
    width = margin + column * world + 0.2
    fig, ax = _canvas(width, 6.3, f"Data-parallel training on {world} processes (ranks)")
    rows = {"batch": 5.6, "model": 4.4, "features": 3.3, "gathered": 1.75, "loss": 0.6}
    for y, text in ((rows["model"], "DDP, during backward:\nall-reduce (average)\nof the weight gradients,\n"
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
        _box(ax, (cx, rows["loss"]), f"loss of rank {r}'s queries\nagainst all keys", "0.35", size)
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
