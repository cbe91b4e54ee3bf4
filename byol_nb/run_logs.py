"""The curves a run logs, in one place: where each attempt of a run writes its metrics and how they
are read back as one series.

A run in OUT logs through Lightning's CSV logger into ``OUT/logs/from_step_<k>/metrics.csv``, one
file per attempt, ``k`` the global step the attempt starts from: a resumed run starts a file of its
own and the earlier files stay as they were. :func:`read_metrics` joins them. Reading needs only the
standard library, so a notebook can follow a run live without importing Lightning.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pytorch_lightning.loggers import CSVLogger

LOGS = "logs"
ATTEMPT_PREFIX = "from_step_"


def attempt_logger(out: Path, resume_step: int | None) -> "CSVLogger":
    """Lightning's CSV logger for this attempt of the run in ``out``: OUT/logs/from_step_<k>/metrics.csv,
    where ``k`` is the global step it starts from (0 for a fresh run, whose start removes the logs
    of an earlier run in the same folder). A resumed attempt writes a file of its own, and the
    earlier attempts' files stay as they are."""
    from pytorch_lightning.loggers import CSVLogger

    if resume_step is None:
        for old in (out / LOGS).glob(f"{ATTEMPT_PREFIX}*/metrics.csv"):
            old.unlink()
        resume_step = 0
    return CSVLogger(out, name=LOGS, version=f"{ATTEMPT_PREFIX}{resume_step:08d}", flush_logs_every_n_steps=1)


def attempt_start(csv_file: Path) -> int:
    """The global step a logged attempt starts from (``logs/from_step_<k>/metrics.csv``), else 0."""
    name = csv_file.parent.name
    return int(name.rsplit("_", 1)[1]) if name.startswith(ATTEMPT_PREFIX) else 0


def metrics_files(path: str | Path) -> list[Path]:
    """The metrics.csv files of a run folder (one per attempt: a resumed run adds one), in order;
    or ``path`` itself when it is a CSV file."""
    path = Path(path)
    if path.is_file():
        return [path]
    return sorted((path / LOGS).glob(f"{ATTEMPT_PREFIX}*/metrics.csv"), key=attempt_start)


def read_metrics(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """A run's logged metrics as {metric: [(step, value), ...]}, empty cells dropped.

    ``path`` is a run folder (OUT of ``python -m byol_nb.train``) or one metrics.csv. The attempts
    of a resumed run are joined: each attempt's rows replace the earlier ones from its first step on
    (a run killed between two checkpoints logged steps that the resumed attempt trains again).
    """
    series: dict[str, list[tuple[int, float]]] = {}
    for csv_file in metrics_files(path):
        start = attempt_start(csv_file)
        series = {key: [(step, v) for step, v in values if step < start] for key, values in series.items()}
        with open(csv_file, newline="") as handle:
            for row in csv.DictReader(handle):
                step = int(row.get("step") or 0)
                for key, value in row.items():
                    if key not in ("step", "epoch") and value not in ("", None):
                        series.setdefault(key, []).append((step, float(value)))
    return series
