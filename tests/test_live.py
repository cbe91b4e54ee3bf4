"""A run watched from a notebook (byol_nb.live, byol_nb.launch(live=True)): the curves and a status
line are redrawn in the cell while the run trains, and of its text the cell shows only the result."""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import IPython
import IPython.display
import pytest

import byol_nb
from byol_nb import viz  # noqa: F401 - imported before the run, as a lesson has it: the first draw is not slowed
from byol_nb.launch import _Output
from byol_nb.live import LiveCurves, status_line


class FakeHandle:
    """A cell's display slot (IPython's DisplayHandle): what was drawn into it, and when."""

    def __init__(self, events: list) -> None:
        self.events = events

    def update(self, obj, raw: bool = False) -> None:
        kind = "status" if raw else "figure"
        self.events.append((time.monotonic(), kind, obj["text/plain"] if raw else len(obj.data)))


@pytest.fixture()
def notebook_cell(monkeypatch) -> list:
    """A kernel with a cell to draw into: every update lands in the returned list."""
    events: list = []
    shell = SimpleNamespace(kernel=object(), events=SimpleNamespace(register=lambda *args: None))
    monkeypatch.setattr(IPython, "get_ipython", lambda: shell)
    monkeypatch.setattr(IPython.display, "display", lambda *args, display_id=None: FakeHandle(events))
    return events


def write_log(out: Path, rows: list[dict]) -> None:
    log = out / "logs" / "from_step_00000000" / "metrics.csv"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("step,train/loss,train/collapse_std\n" + "".join(
        f"{r['step']},{r['loss']},0.9\n" for r in rows))


def test_the_status_line_says_step_speed_time_left_and_last_values():
    line = status_line({"step": 100, "total_steps": 400, "images_per_second": 512.3, "elapsed_s": 60.0},
                       {"train/loss": [(99, 1.23456)], "knn_top1": [(99, 41.27)]})
    assert line == "step 100/400 · 512 images/s · about 3 min left · loss 1.235 · kNN 41.3%"
    assert status_line(None, {}) == "starting..."


def test_curves_are_redrawn_while_the_run_goes_not_only_after(notebook_cell, tmp_path):
    def training() -> None:  # a run writing its log and progress file, row by row
        for step in range(1, 4):
            write_log(tmp_path, [{"step": s, "loss": 2.0 / (s + 1)} for s in range(step)])
            (tmp_path / "progress.json").write_text(json.dumps(
                {"step": step, "total_steps": 3, "images_per_second": 10.0, "elapsed_s": step}))
            time.sleep(1.0)

    run = threading.Thread(target=training)
    with LiveCurves(tmp_path, every_s=0.1):
        run.start()
        run.join()
        ended = time.monotonic()
    figures = [t for t, kind, _ in notebook_cell if kind == "figure"]
    assert len(figures) >= 3 and sum(t < ended for t in figures) >= 2, "the curves were drawn during the run"
    assert [e for e in notebook_cell if e[1] == "status"][-1][2].startswith("step 3/3")


def test_outside_a_kernel_nothing_is_drawn(tmp_path, monkeypatch):
    monkeypatch.setattr(IPython, "get_ipython", lambda: None)
    write_log(tmp_path, [{"step": 0, "loss": 1.0}])
    with LiveCurves(tmp_path, every_s=0.01) as live:
        time.sleep(0.05)
    assert live._thread is None


def test_results_only_output_keeps_the_result_and_drops_everything_else():
    shown, log = io.StringIO(), io.StringIO()
    output = _Output(shown, log, show_tracebacks=True, results_only=True)
    text = ("Using bfloat16 Automatic Mixed Precision (AMP)\n/site-packages/x.py:1: UserWarning: deprecated\n"
            "\rEpoch 0:  10%\r[rank1]: Traceback (most recent call last):\n[rank1]: RuntimeError: injected\n"
            "error: cifar10 is not in data/cifar10\n\nfinished 4 steps in 3.1 s (20.5 images/s)\n"
            "kNN top-1 on the held-out split: 40.0% trained, 30.0% at random initialisation\n  runs/x/last.ckpt\n")
    output.write(text)
    assert log.getvalue() == text
    assert shown.getvalue() == ("finished 4 steps in 3.1 s (20.5 images/s)\n"
                                "kNN top-1 on the held-out split: 40.0% trained, 30.0% at random initialisation\n"
                                "  runs/x/last.ckpt\n")
    assert output.errors == ["[rank1]: RuntimeError: injected", "error: cifar10 is not in data/cifar10"]


@pytest.mark.slow
def test_a_launched_run_in_a_notebook_shows_its_curves_and_its_result(notebook_cell, tiny_shapes, tmp_path):
    shown = io.StringIO()
    metrics = byol_nb.launch(tmp_path, stream=shown, data=str(tiny_shapes / "train"),
                             val_data=str(tiny_shapes / "test"), max_steps=6, log_every_n_steps=2, batch_size=8,
                             proj_hidden=32, accelerator="cpu")
    assert metrics["global_step"] == 6
    assert shown.getvalue().startswith("finished 6 steps") and len(shown.getvalue()) < 800
    assert "GPU available" in (tmp_path / "launch.log").read_text() and "GPU available" not in shown.getvalue()
    assert any(kind == "figure" for _, kind, _ in notebook_cell)
    assert [e for e in notebook_cell if e[1] == "status"][-1][2].startswith("step 6/6")
