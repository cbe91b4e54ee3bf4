"""bench.gpu_check, the project's one-command GPU check, in its CPU dry run: every check runs and
none fails, and a steady training step reads no device value on the host."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHECKS = {"throughput", "host syncs", "peak memory", "2-device methods", "LARS on device", "ddp_notebook"}


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
    (syncs,) = [row for row in rows if row["check"] == "host syncs"]
    assert syncs["verdict"] == "PASS" and syncs["values"]["max_per_steady_step"] == 0
