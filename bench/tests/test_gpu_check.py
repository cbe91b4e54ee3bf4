"""bench.gpu_check, the project's one-command GPU check: its CPU dry run (every check runs, and none
fails), its budget, and the CUDA branch of its host-sync counter, fed the warnings CUDA would give."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from bench import gpu_check

REPO = Path(__file__).resolve().parents[2]
CHECKS = {"SyncBN kernels", "SyncBN reference kernels", "LARS on device", "host syncs", "speed", "peak memory",
          "step / ideal step", "ddp_notebook", "real photos", "peers", "2-device methods", "scaling"}


@pytest.mark.slow
@pytest.mark.timeout(660)
def test_the_gpu_check_passes_its_dry_run_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    result = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--dry-run", "--out", str(out)], cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "| check | setting | result | verdict |" in result.stdout
    rows = json.loads(out.read_text())["rows"]
    assert {row["check"] for row in rows} == CHECKS
    assert [row for row in rows if row["verdict"] == "FAIL"] == []
    by_check = {}
    for row in rows:
        by_check.setdefault(row["check"], []).append(row)
    syncs = by_check["host syncs"]
    assert len(syncs) == 2, "the folder and the tensors without boxes"
    assert all(row["verdict"] == "PASS" and row["values"]["max_per_steady_step"] == 0 for row in syncs)
    assert set(syncs[0]["values"]["per_method"]) == set(gpu_check.SYNC_METHODS)
    assert by_check["SyncBN kernels"][0]["verdict"] == "PASS"
    assert by_check["SyncBN reference kernels"][0]["verdict"] == "SKIP"  # CUDA kernels only
    assert by_check["step / ideal step"][0]["values"]["ratio"] > 0
    # the subset is present here or not (CI): a dry run of the photo run, or a SKIP that says why
    assert by_check["real photos"][0]["verdict"] in ("INFO", "SKIP")


def test_a_check_the_budget_leaves_no_time_for_is_skipped_and_the_table_still_printed(tmp_path, capsys):
    checks = [gpu_check.Check("quick", lambda ctx: iter([gpu_check.Row("quick", "", "done", "PASS")]), lambda ctx: 0),
              gpu_check.Check("long", lambda ctx: iter([gpu_check.Row("long", "", "ran", "FAIL")]), lambda ctx: 100)]
    out = tmp_path / "report.json"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gpu_check, "CHECKS", checks)
        assert gpu_check.main(["--dry-run", "--budget-s", "50", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(row["check"], row["verdict"]) for row in rows] == [("quick", "PASS"), ("long", "SKIP")]
    assert "needs about 100 s" in rows[1]["result"]
    assert "| long |  | not started" in capsys.readouterr().out


def test_the_cuda_counter_records_where_each_sync_warning_was_raised(monkeypatch):
    """torch.cuda.set_sync_debug_mode("warn") warns at every synchronising call; the counter keeps
    those warnings, by the line that made the call, and lets every other warning through."""
    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    with gpu_check.host_waits(cuda=True) as seen:
        for _ in range(2):
            warnings.warn("called a synchronizing CUDA operation", UserWarning)  # the sync
        with pytest.warns(UserWarning, match="something else"):
            warnings.warn("something else", UserWarning)
    line = test_the_cuda_counter_records_where_each_sync_warning_was_raised.__code__.co_firstlineno + 7
    assert seen == [f"tests/test_gpu_check.py:{line}"] * 2
    assert modes == ["warn", "default"]
