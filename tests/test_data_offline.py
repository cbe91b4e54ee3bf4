"""``--data cifar10`` (or stl10) on a machine without internet and without the archive: the run stops
within seconds, before training, with one line naming the archive and the folder to put it in."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from byol_nb import datasets, train
from tests.helpers import run_env

ARCHIVE = "cifar-10-python.tar.gz"


def test_no_network_stops_with_one_line_naming_the_archive_and_the_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("BYOL_NB_DATA", str(tmp_path / "data"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(SystemExit) as stop:
        train.cli(["--data", "cifar10", "--max-steps", "1", "--accelerator", "cpu", "--no-progress",
                   "--out", str(tmp_path / "run")])
    message = str(stop.value)
    assert message.startswith("error: cifar10 is not in") and "\n" not in message
    assert ARCHIVE in message and str(tmp_path / "data" / "cifar10") in message and "BYOL_NB_DATA" in message
    assert not list((tmp_path / "data").glob(".cifar10.*.partial")), "a partial download was left behind"


@pytest.mark.slow
def test_the_command_line_without_network_ends_within_a_minute_without_a_traceback(tmp_path):
    """A real process whose every connection is refused (a proxy on a closed port)."""
    refused = "http://127.0.0.1:9"
    env = run_env(BYOL_NB_DATA=str(tmp_path / "data"), http_proxy=refused, https_proxy=refused,
                  HTTP_PROXY=refused, HTTPS_PROXY=refused, no_proxy="", NO_PROXY="")
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "byol_nb.train", "--data", "cifar10", "--max-steps", "1",
                             "--accelerator", "cpu", "--no-progress", "--out", str(tmp_path / "run")],
                            env=env, capture_output=True, text=True, timeout=120)
    assert time.monotonic() - started < 60
    assert result.returncode == 1 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and ARCHIVE in errors[0], result.stderr[-2000:]


def test_a_set_already_there_is_not_downloaded_again(tmp_path, monkeypatch):
    monkeypatch.setenv("BYOL_NB_DATA", str(tmp_path))
    (tmp_path / "cifar10" / "cifar-10-batches-py").mkdir(parents=True)
    (tmp_path / "cifar10" / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"")
    monkeypatch.setattr(datasets, "_fetch", lambda name, root: pytest.fail("downloaded again"))
    assert datasets.download("cifar10") == tmp_path / "cifar10"
