"""A run's curves, redrawn in the notebook cell while it trains.

A long run in a lesson (minutes on a CPU, more on a GPU) otherwise shows a progress bar, and the
curves only at the end. :class:`LiveCurves` rereads the run's logs (:mod:`byol_nb.run_logs`) and its
progress file (``OUT/progress.json``, written by :class:`byol_nb.callbacks.ProgressFile`) every few
seconds from a thread of the kernel, and replaces one figure and one status line in the cell: the
loss, the collapse monitor and the kNN accuracy so far, the step, the images per second and the
time left. The training itself runs elsewhere (a launched process, or ``ddp_notebook``'s forks),
so the kernel's main thread stays free to wait for it.

Outside a notebook kernel it does nothing.
"""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path

PROGRESS_FILE = "progress.json"


def read_progress(out: str | Path) -> dict | None:
    """A run's last progress record (step, total_steps, images_per_second, elapsed_s), or None."""
    try:
        return json.loads((Path(out) / PROGRESS_FILE).read_text())
    except (OSError, ValueError):
        return None


def status_line(progress: dict | None, metrics: dict[str, list[tuple[int, float]]]) -> str:
    """One line for a run in progress: its step, speed, time left and last logged values."""
    if progress is None:
        return "starting..."
    step, total = progress["step"], progress["total_steps"]
    parts = [f"step {step}/{total}", f"{progress['images_per_second']:.0f} images/s"]
    if 0 < step < total and progress["elapsed_s"] > 0:
        left = progress["elapsed_s"] / step * (total - step)
        parts.append(f"about {_duration(left)} left")
    for key, label in (("train/loss", "loss"), ("knn_top1", "kNN")):
        if metrics.get(key):
            value = metrics[key][-1][1]
            parts.append(f"{label} {value:.1f}%" if key == "knn_top1" else f"{label} {value:.3f}")
    return " · ".join(parts)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


class LiveCurves:
    """While the ``with`` block runs, redraw the curves of the run in ``out`` every ``every_s``
    seconds in this cell; at the end, draw them once more. ``curves`` is where the CSV log lives when
    it is not ``out`` itself (a ``ddp_notebook`` run's ``CSVLogger`` file)."""

    def __init__(self, out: str | Path, every_s: float = 5.0, curves: str | Path | None = None) -> None:
        self.out, self.every_s = Path(out), every_s
        self.curves = Path(curves) if curves is not None else self.out
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._handles: tuple | None = None
        self._drawn = None

    def __enter__(self) -> "LiveCurves":
        from IPython import get_ipython
        from IPython.display import display

        if get_ipython() is None:
            return self
        self._handles = (display(display_id=True), display(display_id=True))
        self._thread = threading.Thread(target=self._run, name="byol_nb-live-curves", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self.draw()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.draw()
            except Exception as error:  # noqa: BLE001 - a figure that fails must not end the watch silently
                self._handles[1].update({"text/plain": f"live curves stopped: {type(error).__name__}: {error}"},
                                        raw=True)
                return

    def draw(self) -> None:
        """Replace the cell's figure and status line with the run's state now (once there is a log)."""
        from IPython.display import Image

        from byol_nb.run_logs import metrics_files, read_metrics

        if self._handles is None or not metrics_files(self.curves):
            return
        metrics = read_metrics(self.curves)
        stamp = tuple(len(values) for values in metrics.values())
        figure, status = self._handles
        status.update({"text/plain": status_line(read_progress(self.out), metrics)}, raw=True)
        if stamp != self._drawn:  # a new row in the log
            figure.update(Image(data=_png(self.curves)))
            self._drawn = stamp


def _png(curves: Path) -> bytes:
    import matplotlib.pyplot as plt

    from byol_nb.viz import plot_training_curves

    fig = plot_training_curves(curves)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()

