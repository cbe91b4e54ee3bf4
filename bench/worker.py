"""One measured run in a fresh process, printed as one JSON line.

    python -m bench.worker '{"task": "speed", "runner": "lightly", "size": 32, "batch": 64, ...}'

A fresh process per run keeps runs independent: no allocator state, thread pool or cached kernel
carries over from one library to the next, and peak memory is that run's alone. It imports only
torch and what the run needs: psutil, for memory on the CPU, is optional (a GPU machine's image
may lack it).
"""

from __future__ import annotations

import importlib
import json
import statistics
import sys
import threading
import time

import torch

from bench.peers import RUNNERS, Setup, paired_ratio, train_byol_nb


class PeakMemory:
    """Peak memory above the level at entry: GPU bytes allocated (torch.cuda's own count), or on CPU
    the resident set of this process plus its DataLoader workers, sampled every 10 ms through
    psutil; ``megabytes`` is None on a CPU without psutil."""

    def __init__(self) -> None:
        self.cuda = torch.cuda.is_available()
        self.psutil = None if self.cuda else _optional("psutil")
        self.peak = self.base = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _resident(self) -> int:
        process = self.psutil.Process()
        total = process.memory_info().rss
        for child in process.children(recursive=True):
            try:
                total += child.memory_info().rss
            except self.psutil.Error:
                pass
        return total

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self._resident())

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        elif self.psutil is not None:
            self.base = self.peak = self._resident()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated()
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()

    @property
    def megabytes(self) -> float | None:
        if not self.cuda and self.psutil is None:
            return None
        return (self.peak - self.base) / 2**20


def _optional(name: str):
    """The module ``name``, or None when it is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _setup(spec: dict, pixels: torch.Tensor, steps: int) -> Setup:
    return Setup(pixels, spec["size"], spec["batch"], steps, spec.get("seed", 0), spec.get("workers", 2),
                 spec.get("precision", "auto"), tuple(spec.get("flags", ())))


def speed(spec: dict) -> dict:
    """Throughput over ``steps`` steps after ``warmup`` untimed ones, in source images per second."""
    pixels = torch.load(spec["pixels"], weights_only=True)["pixels"]
    setup = _setup(spec, pixels, spec["warmup"] + spec["steps"])
    with PeakMemory() as memory:
        trained = RUNNERS[spec["runner"]](setup)
    durations = [b - a for a, b in zip(trained.stamps, trained.stamps[1:])][spec["warmup"]:]
    # The median step, not the mean: a step that another process on a shared machine stalled says
    # nothing about the library.
    return {**spec, "step_s": durations, "images_per_s": spec["batch"] / statistics.median(durations),
            "peak_mb": memory.megabytes}


def paired(spec: dict) -> dict:
    """byol_nb's full step and its ideal step in alternating blocks in one run (bench.peers.paired_ratio)."""
    pixels = torch.load(spec["pixels"], weights_only=True)["pixels"]
    setup = _setup(spec, pixels, spec["warmup"] + spec["steps"])
    trained = train_byol_nb(setup, paired=True)
    return {**spec, **paired_ratio(trained.stamps, list(trained.ideal_s), list(trained.block_s), spec["warmup"])}


def quality(spec: dict) -> dict:
    """kNN top-1 (byol_nb.metrics.knn_top1: cosine, k 20, T 0.1) of the backbone after training."""
    from byol_nb.features import extract_features
    from byol_nb.metrics import knn_top1
    from byol_nb.models import Backbone

    train, test = (torch.load(spec[key], weights_only=True) for key in ("pixels", "test_pixels"))
    started = time.perf_counter()
    if spec["runner"] == "random-init":
        torch.manual_seed(spec.get("seed", 0))
        backbone = Backbone("resnet18")
    else:
        setup = _setup(spec, train["pixels"], spec["steps"])
        backbone = RUNNERS[spec["runner"]](setup).backbone
    trained_s = time.perf_counter() - started
    backbone = backbone.float().to(memory_format=torch.contiguous_format)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bank = _labeled(train)
    queries = _labeled(test)
    bank_x, bank_y = extract_features(backbone, bank, device=device)
    query_x, query_y = extract_features(backbone, queries, device=device)
    return {**spec, "knn_top1": knn_top1(bank_x, bank_y, query_x, query_y), "train_s": trained_s}


def _labeled(saved: dict) -> torch.utils.data.Dataset:
    return torch.utils.data.TensorDataset(saved["pixels"], saved["labels"])


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    result = {"speed": speed, "paired": paired, "quality": quality}[spec["task"]](spec)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
