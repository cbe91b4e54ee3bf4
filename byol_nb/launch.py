"""Start ``python -m byol_nb.train`` from a notebook and watch it as if it ran in the cell.

    metrics = byol_nb.launch(data="shapes", devices=2, strategy="ddp", max_epochs=5, out="runs/ddp")

Why a subprocess: the training processes own the GPUs (any number, any strategy), while the
kernel never touches CUDA, so ``ddp_notebook``'s fork restriction, a crashed worker or a CUDA
out-of-memory cannot break the kernel. This module imports only the standard library: importing
it (or ``byol_nb``) does not import torch: the options are checked against the training script's
parser (:mod:`byol_nb.cli`, standard library only) before any process starts.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import TextIO

from byol_nb.cli import command_line
from byol_nb.live import LiveCurves


class LaunchError(RuntimeError):
    """The training process failed; the message carries its exit status and last output lines."""


def train_command(out: str | Path, **options: object) -> list[str]:
    """The command that trains with ``options``: ``python -m byol_nb.train --out OUT ...``, with the
    options turned into flags by :func:`byol_nb.cli.command_line` (``max_steps=3`` gives
    ``--max-steps 3``) and checked by the training script's own parser. Raises ValueError for an
    unknown option or a value it refuses, naming the valid options."""
    return [sys.executable, "-m", "byol_nb.train", "--out", str(out), *command_line(**options)]


def launch(out: str | Path = "runs/byol", *, stream: TextIO | None = None, show_tracebacks: bool = True,
           live: bool | None = None, **options: object) -> dict:
    """Train in a new process, stream its output here, and return its ``OUT/metrics.json``.

    ``options`` are the flags of ``python -m byol_nb.train`` as keyword arguments (see
    :func:`train_command`), e.g. ``devices=2, strategy="ddp", accelerator="cpu"``; an unknown name
    raises ValueError at once. All output goes to ``OUT/launch.log``. ``live`` (the default in a
    notebook kernel) shows the run's curves and a status line in the cell, redrawn as it trains
    (:class:`byol_nb.live.LiveCurves`), and of its text only the result: the lines of every process,
    library warnings and tracebacks stay in the log. Otherwise the output, progress bar included, is
    copied to ``stream`` (default: this cell's stdout) as it arrives, without Python tracebacks when
    ``show_tracebacks`` is False. Interrupting the kernel stops the whole run (every training
    process) before re-raising, and so does a run that fails. Raises :class:`LaunchError`, naming
    the first error and the log, when the run fails or leaves no new metrics file.

    >>> train_command("runs/demo", max_steps=3, sync_bn=False)[3:]  # the options as the script's flags
    ['--out', 'runs/demo', '--max-steps', '3', '--no-sync-bn']
    >>> launch("runs/demo", max_stepz=3)  # checked before anything starts
    Traceback (most recent call last):
    ValueError: unknown training option(s) 'max_stepz' (did you mean 'max_steps'?); the options are: ...
    """
    live = _in_notebook() if live is None else live
    if live:
        options.setdefault("no_progress", True)  # the status line replaces the progress bar
    command = train_command(out, **options)
    Path(out).mkdir(parents=True, exist_ok=True)
    metrics_file, log_file = Path(out) / "metrics.json", Path(out) / "launch.log"
    started = time.time()
    with open(log_file, "w") as log, (LiveCurves(out) if live else contextlib.nullcontext()):
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
        output = _Output(stream or sys.stdout, log, show_tracebacks, results_only=live)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        try:
            while chunk := os.read(process.stdout.fileno(), 65536):
                output.write(decoder.decode(chunk))
            status = process.wait()
        except BaseException:  # KeyboardInterrupt from the notebook's stop button, included
            _stop(process)
            raise
    if status != 0:
        _stop(process)  # the launcher is gone; its worker processes may not be
        cause = output.errors[0] if output.errors else f"exit status {status}"
        raise LaunchError(f"the run failed: {cause}\n(status {status}; the whole output is in {log_file})\n"
                          f"its last lines:\n" + "".join(output.tail))
    if not metrics_file.is_file() or metrics_file.stat().st_mtime < started:
        raise LaunchError(f"the run ended without writing {metrics_file} (stopped early? see the output above); "
                          f"continue it with launch(..., resume=True)")
    return json.loads(metrics_file.read_text())


# torch prefixes the lines of a worker's traceback with its rank: "[rank1]: ..."
_RANK = r"^(\[rank\d+\]: )?"
# A line that names an exception, as the last line of a Python traceback does ("ValueError: ..."), or
# the one-line "error: ..." with which the training script stops on bad input.
_ERROR_LINE = re.compile(_RANK + r"((\w+\.)*\w*(Error|Exception|Interrupt): |error: )")
# What the training script prints as its result (train._report): shown even when the rest is not.
_RESULT_LINE = re.compile(r"^(finished \d+ steps|kNN top-1|stopped by|  \S+\.(ckpt|pt|json|png)$)")
_TRACEBACK_START = re.compile(_RANK + r"(Traceback \(most recent call last\)|During handling of the above|"
                              r"The above exception was)")


class _Output:
    """A run's output as it arrives: all of it to the log, and to the cell's stream all but the lines
    of Python tracebacks when they are hidden, or only the result lines (``results_only``). Keeps the
    last lines and every line naming an error.

    Text is passed on line by line, a line ending at a newline or at the carriage return with which
    a progress bar redraws itself.
    """

    def __init__(self, stream: TextIO, log: TextIO, show_tracebacks: bool, results_only: bool = False) -> None:
        self.stream, self.log, self.show_tracebacks, self.results_only = stream, log, show_tracebacks, results_only
        self.tail: deque[str] = deque(maxlen=30)
        self.errors: list[str] = []
        self._pending = ""
        self._in_traceback = False

    def write(self, text: str) -> None:
        self.log.write(text)
        self.log.flush()
        *lines, self._pending = re.split(r"(?<=[\r\n])", self._pending + text)
        for line in lines:
            if line.endswith("\n") and self._is_shown(line):
                self.stream.write(line)
            elif line.endswith("\r") and not self.results_only:
                self.stream.write(line)  # a progress bar's redraw: never part of a traceback
        self.stream.flush()

    def _is_shown(self, line: str) -> bool:
        self.tail.append(line)
        error = bool(_ERROR_LINE.match(line))
        if error:
            self.errors.append(line.strip())
        if _TRACEBACK_START.match(line):
            self._in_traceback = True
        hidden = self._in_traceback and not self.show_tracebacks
        if error:
            self._in_traceback = False
        if self.results_only:
            return bool(_RESULT_LINE.match(line))
        return not hidden


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the run's process group (the launcher and its workers), SIGKILL after 30 s."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:  # every process of the group has ended
        return
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def _in_notebook() -> bool:
    """Whether this runs in a notebook kernel (IPython with a kernel), where a cell can show figures."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    return hasattr(get_ipython(), "kernel")
