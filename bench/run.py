"""Run the speed and quality benchmarks, print the tables and write them as JSON.

    python -m bench.run                      # CPU: 32 and 64 px; GPU: 64, 96 and 224 px
    python -m bench.run --quick              # the same code, small: a smoke test of the harness
    python -m bench.run --skip-quality --sizes 32

Speed: for each size, every repeat runs byol_nb, byol-pytorch, lightly
and the ideal step once each, one after another (each in a fresh process), so that a change in
machine load hits all of them alike; medians over repeats. Then byol_nb's step over its ideal
step, the two in alternating blocks within each run (``bench.peers.paired_ratio``). Quality: each library
trains the same steps on the real-image subset and one kNN function scores the frozen backbones
on its test split.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch

from bench.peers import PEERS

REPO = Path(__file__).resolve().parent.parent
SUBSET = REPO / "data" / "cifar10-subset"
# Where its archive may be, first found first: BYOL_NB_PHOTOS_TAR, the wheel folder that travels to a
# GPU machine (make gpu-wheels), the shared folder beside the repository.
SUBSET_TARS = [Path(p) for p in [os.environ.get("BYOL_NB_PHOTOS_TAR"), REPO / ".whl" / "cifar10-subset.tar",
                                 REPO.parent / "shared" / "data" / "cifar10-subset.tar"] if p]
RESULTS = REPO / "bench" / "results"
WORKER_TIMEOUT_S = 900  # one measurement; a hung run must not hang the whole benchmark


def cached_pixels(split: str | None, size: int) -> Path:
    """The images as one uint8 tensor file, decoded once (random pixels when split is None)."""
    path = RESULTS / "cache" / f"{split or 'random'}_{size}.pt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        if split is None:
            pixels = torch.randint(0, 256, (2048, 3, size, size), dtype=torch.uint8,
                                   generator=torch.Generator().manual_seed(0))
            labels = torch.zeros(len(pixels), dtype=torch.long)
        else:
            from byol_nb.datasets import ImageFolder

            folder = ImageFolder(SUBSET / split, size, cache=True)
            pixels, labels = folder.pixels, torch.tensor(folder.labels)
        torch.save({"pixels": pixels, "labels": labels}, path)
    return path


def find_subset() -> bool:
    """Extract the real-image subset's archive (the first of ``SUBSET_TARS`` found) into data/ when
    needed; False when none is found."""
    if (SUBSET / "train").is_dir():
        return True
    archive = next((path for path in SUBSET_TARS if path.is_file()), None)
    if archive is None:
        return False
    SUBSET.parent.mkdir(exist_ok=True)
    with tarfile.open(archive) as tar:
        tar.extractall(SUBSET.parent, filter="data")
    return True


def run_worker(spec: dict, timeout: float = WORKER_TIMEOUT_S) -> dict:
    """One measurement in a fresh process, stopped after ``timeout`` seconds; its last JSON line is the result."""
    try:
        done = subprocess.run([sys.executable, "-m", "bench.worker", json.dumps(spec)], cwd=REPO, capture_output=True,
                              text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{spec['runner']} {spec['task']}: no result after {timeout:.0f} s") from None
    if done.returncode != 0:
        raise RuntimeError(f"{spec['runner']} failed:\n{done.stderr[-3000:]}")
    return json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])


def machine() -> dict:
    import psutil

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "load_avg_start": os.getloadavg()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines()
                           if line.startswith("Model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    for name in ("byol_pytorch", "lightly"):
        from importlib.metadata import version

        info[name] = version(name.replace("_", "-"))
    return info


def speed(args: argparse.Namespace, source: str | None) -> list[dict]:
    """Alternating repeats; one summary row per (size, runner)."""
    runners = [*PEERS, "ideal"]
    rows = []
    for size in args.sizes:
        pixels = str(cached_pixels(source, size))
        runs: dict[str, list[dict]] = {name: [] for name in runners}
        for repeat in range(args.repeats):
            for name in runners if repeat % 2 == 0 else runners[::-1]:
                spec = dict(task="speed", runner=name, size=size, batch=args.batch, steps=args.steps,
                            warmup=args.warmup, workers=args.workers, precision=args.precision,
                            threads=args.threads, pixels=pixels)
                result = run_worker(spec)
                runs[name].append(result)
                print(f"  {size:>3} px  repeat {repeat + 1}/{args.repeats}  {name:<13} "
                      f"{result['images_per_s']:7.1f} img/s  peak {result['peak_mb']:6.0f} MB", flush=True)
        medians = {name: statistics.median(r["images_per_s"] for r in runs[name]) for name in runners}
        fastest_peer = max(medians[name] for name in PEERS if name != "byol_nb")
        for name in runners:
            rows.append({"size": size, "runner": name, "images_per_s": medians[name],
                         "step_s": args.batch / medians[name],
                         "vs_fastest_peer": medians[name] / fastest_peer,
                         "peak_mb": statistics.median(r["peak_mb"] for r in runs[name]),
                         "repeats": [r["images_per_s"] for r in runs[name]]})
    return rows


def paired(args: argparse.Namespace, source: str | None) -> list[dict]:
    """byol_nb's step over its ideal step, in alternating blocks in each run (twice ``--steps``
    steps, so that enough of them are not next to a block); median over repeats."""
    rows = []
    for size in args.sizes:
        pixels = str(cached_pixels(source, size))
        for name in ("byol_nb",):
            ratios = []
            for repeat in range(args.repeats):
                spec = dict(task="paired", runner=name, size=size, batch=args.batch, steps=2 * args.steps,
                            warmup=args.warmup, workers=args.workers, precision=args.precision,
                            threads=args.threads, pixels=pixels)
                ratios.append(run_worker(spec)["ratio"])
                print(f"  {size:>3} px  repeat {repeat + 1}/{args.repeats}  {name:<17} step / ideal step "
                      f"{ratios[-1]:.2f}x", flush=True)
            rows.append({"size": size, "runner": name, "ratio": statistics.median(ratios), "repeats": ratios})
    return rows


def quality(args: argparse.Namespace) -> list[dict]:
    train, test = str(cached_pixels("train", args.quality_size)), str(cached_pixels("test", args.quality_size))
    rows = []
    for name in [*PEERS, "random-init"]:
        spec = dict(task="quality", runner=name, size=args.quality_size, batch=args.batch,
                    steps=args.quality_steps, workers=args.workers, precision=args.precision,
                    threads=args.threads, pixels=train, test_pixels=test)
        result = run_worker(spec)
        print(f"  {name:<13} kNN top-1 {result['knn_top1']:5.1f}%  ({result['train_s']:.0f} s)", flush=True)
        rows.append(result)
    return rows


def speed_table(rows: list[dict]) -> str:
    lines = ["| size | implementation | images/s | step (s) | vs fastest peer | peak memory (MB) |",
             "|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['size']} | {r['runner']} | {r['images_per_s']:.1f} | {r['step_s']:.3f} | "
                     f"{r['vs_fastest_peer']:.2f}x | {r['peak_mb']:.0f} |")
    return "\n".join(lines)


def paired_table(rows: list[dict]) -> str:
    lines = ["| size | implementation | step / ideal step (median) | repeats |", "|---:|---|---:|---|"]
    for r in rows:
        lines.append(f"| {r['size']} | {r['runner']} | {r['ratio']:.2f}x | "
                     + " / ".join(f"{x:.2f}" for x in r["repeats"]) + " |")
    return "\n".join(lines)


def quality_table(rows: list[dict]) -> str:
    lines = ["| implementation | steps | kNN top-1 (%) | training time (s) |", "|---|---:|---:|---:|"]
    for r in rows:
        steps = "0" if r["runner"] == "random-init" else str(r["steps"])
        lines.append(f"| {r['runner']} | {steps} | {r['knn_top1']:.1f} | {r['train_s']:.0f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few steps at 32 px: checks the harness, not the numbers")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 96, 224] if gpu else [32, 64])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=30 if gpu else 6, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=5 if gpu else 2, help="untimed steps before them")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="DataLoader workers for lightly (its examples use workers)")
    p.add_argument("--precision", default="auto", help="byol_nb's --precision")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per run (0: torch's default); 1 keeps a crowded machine's timings sane")
    p.add_argument("--quality-steps", type=int, default=100)
    p.add_argument("--quality-size", type=int, default=32)
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS / "results.json")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.steps, args.warmup, args.repeats, args.quality_steps = [32], 2, 1, 1, 10
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    has_subset = find_subset()
    report: dict = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}}
    print(f"machine: {report['machine']}", flush=True)
    started = time.perf_counter()
    if not args.skip_speed:
        print("speed (images/s of a full training step, source images; each image gives two views)", flush=True)
        report["speed"] = speed(args, "train" if has_subset else None)
        print("step / ideal step, alternated in one process", flush=True)
        report["paired"] = paired(args, "train" if has_subset else None)
    if args.skip_quality:
        pass
    elif has_subset:
        print(f"quality: {args.quality_steps} steps, batch {args.batch}, {args.quality_size} px", flush=True)
        report["quality"] = quality(args)
    else:
        print(f"quality skipped: the real-image subset is neither at {SUBSET} nor in {', '.join(map(str, SUBSET_TARS))}")
    report["machine"]["load_avg_end"] = os.getloadavg()
    report["wall_s"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print()
    if "speed" in report:
        print(speed_table(report["speed"]) + "\n")
        print(paired_table(report["paired"]) + "\n")
    if "quality" in report:
        print(quality_table(report["quality"]) + "\n")
    print(f"load average {report['machine']['load_avg_start']} -> {report['machine']['load_avg_end']}; "
          f"{report['wall_s']:.0f} s; written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
