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
