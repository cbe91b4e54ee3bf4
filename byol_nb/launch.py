"""Start ``python -m byol_nb.train`` from a notebook and watch it as if it ran in the cell.

    metrics = byol_nb.launch(data="shapes", devices=2, strategy="ddp", max_epochs=5, out="runs/ddp")

Why a subprocess: the training processes own the GPUs (any number, any strategy), while the
kernel never touches CUDA, so ``ddp_notebook``'s fork restriction, a crashed worker or a CUDA
out-of-memory cannot break the kernel. This module imports only the standard library: importing
it (or ``byol_nb``) does not import torch.
"""

from __future__ import annotations

import codecs
import json
import os
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import TextIO


class LaunchError(RuntimeError):
    """The training process failed; the message carries its exit status and last output lines."""


def train_command(out: str | Path, **options: object) -> list[str]:
    """The command line for ``options``: ``max_steps=3`` gives ``--max-steps 3``, ``True`` gives
    ``--flag``, ``False`` gives ``--no-flag`` (for on/off flags such as ``sync_bn``), None is left out."""
    command = [sys.executable, "-m", "byol_nb.train", "--out", str(out)]
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            command.append(flag)
        elif value is False:
            command.append("--no-" + flag[2:])
        elif value is not None:
            command += [flag, str(value)]
    return command


def launch(out: str | Path = "runs/byol", *, stream: TextIO | None = None, **options: object) -> dict:
    """Train in a new process, stream its output here, and return its ``OUT/metrics.json``.

    ``options`` are the flags of ``python -m byol_nb.train`` as keyword arguments (see
    :func:`train_command`), e.g. ``devices=2, strategy="ddp", accelerator="cpu"``. Output, progress
    bar included, is copied to ``stream`` (default: this cell's stdout) as it arrives.
    Interrupting the kernel stops the whole run (every training process) before re-raising.
    Raises :class:`LaunchError` when the run fails or leaves no new metrics file.
    """
    stream = stream or sys.stdout
    command = train_command(out, **options)
    metrics_file = Path(out) / "metrics.json"
    started = time.time()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    tail: deque[str] = deque(maxlen=30)
    try:
        _copy_output(process, stream, tail)
        status = process.wait()
    except BaseException:  # KeyboardInterrupt from the notebook's stop button, included
        _stop(process)
        raise
    if status != 0:
        raise LaunchError(f"{' '.join(command)} exited with status {status}; its last lines:\n" + "".join(tail))
    if not metrics_file.is_file() or metrics_file.stat().st_mtime < started:
        raise LaunchError(f"the run ended without writing {metrics_file} (stopped early? see the output above); "
                          f"continue it with launch(..., resume=True)")
    return json.loads(metrics_file.read_text())


def _copy_output(process: subprocess.Popen, stream: TextIO, tail: deque[str]) -> None:
    """Copy bytes as they come (progress bars redraw with carriage returns, not newlines)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    line = ""
    while chunk := os.read(process.stdout.fileno(), 65536):
        text = decoder.decode(chunk)
        stream.write(text)
        stream.flush()
        for piece in text.splitlines(keepends=True):
            line = "" if piece.endswith("\r") else line + piece  # a redrawn progress bar is not kept
            if line.endswith("\n"):
                tail.append(line)
                line = ""


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the run's process group (the launcher and its workers), SIGKILL after 30 s."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
