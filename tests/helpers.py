"""What several test files share: free ports, the environment of training subprocesses and a small
training command line."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

TORCHRUN = Path(sys.executable).with_name("torchrun")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_env(**extra: str) -> dict[str, str]:
    """The environment of a training subprocess: one CPU thread per process (two share the 2 cores)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def train_flags(shapes: Path, out: Path, steps: int = 3, local_views: int = 1) -> list[str]:
    """A short CPU run on the tiny built-in dataset, with the kNN monitor and by default one local
    view (a second online forward per step, with SyncBN across the processes)."""
    return ["--data", str(shapes / "train"), "--val-data", str(shapes / "test"), "--max-steps", str(steps),
            "--proj-hidden", "64", "--batch-size", "8", "--accelerator", "cpu", "--local-views", str(local_views),
            "--no-progress", "--out", str(out)]
