"""The course notebooks: every one executes headless in FAST mode, in order, each code cell twice;
every one executes in full mode, as a learner runs it, through every training and launch call (at
a few steps each); and none is committed with outputs.

The execution tests are marked ``notebooks`` (deselect with ``-m "not notebooks"``); they run
each notebook in a fresh kernel with ``BYOL_NB_RUNS`` pointing at a temporary folder, so cached
runs from an earlier session are never reused and nothing is written under ``runs/``. FAST only
shrinks a lesson (byol_nb/course.py): both modes run the same cells and pass the same flags.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
PER_NOTEBOOK_TIMEOUT_S = 900  # FAST mode takes 1-3 minutes each on 2 idle cores


def test_the_course_has_its_lessons_in_order():
    names = [p.name for p in NOTEBOOKS]
    assert names, f"no notebooks found in {NOTEBOOK_DIR}"
    assert [n[:2] for n in names] == [f"{i:02d}" for i in range(len(names))], f"gaps in the numbering: {names}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebook_has_no_outputs(path: Path):
    notebook = json.loads(path.read_text())
    for index, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [], f"{path.name} cell {index} has outputs: strip them before committing"
            assert cell.get("execution_count") is None, f"{path.name} cell {index} has an execution count"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_opens_with_goals_and_time_and_ends_with_questions(path: Path):
    cells = json.loads(path.read_text())["cells"]
    first = "".join(cells[0]["source"])
    assert "What you will learn" in first and "Time" in first, f"{path.name}: first cell must say what and how long"
    markdown = ["".join(c["source"]) for c in cells if c["cell_type"] == "markdown"]
    assert any("Summary" in m for m in markdown) and any("Questions" in m for m in markdown), \
        f"{path.name}: needs a summary and questions at the end"


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shared by the notebooks of one test session, so that 06 finds what 05 trained."""
    return tmp_path_factory.mktemp("course-runs")


@pytest.fixture(scope="module")
def full_runs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("course-runs-full")


def execute(path: Path, tmp_path: Path, times: int = 1) -> list:
    """Run every cell of the notebook at ``path`` ``times`` times in a fresh kernel; return its cells."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(path, as_version=4)
    from jupyter_client.manager import KernelManager

    # Kernel sockets as files in a private folder, not TCP ports on localhost: with TCP a kernel
    # started right after another one sometimes never answered a cell (a port race), and the test
    # hung until its timeout.
    kernel = KernelManager(kernel_name="python3", transport="ipc", ip=str(tmp_path / "kernel"))
    client = nbclient.NotebookClient(notebook, km=kernel, timeout=PER_NOTEBOOK_TIMEOUT_S,
                                     resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    started = time.perf_counter()
    # execute_cell raises CellExecutionError with the failing cell's traceback.
    with client.setup_kernel():
        for index, cell in enumerate(notebook.cells):
            for _ in range(times if cell.cell_type == "code" else 1):
                client.execute_cell(cell, index)
    print(f"{path.name}: {time.perf_counter() - started:.0f} s")
    return notebook.cells


def assert_ran_cleanly(path: Path, cells: list) -> None:
    """No cell raised, and the lesson showed at least one figure."""
    outputs = [o for c in cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert [o for o in outputs if "image/png" in o.get("data", {})], f"{path.name} shows no figure"


@pytest.mark.notebooks
@pytest.mark.slow
@pytest.mark.timeout(PER_NOTEBOOK_TIMEOUT_S + 60)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes_in_fast_mode(path: Path, runs_dir: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch):
    """Every code cell runs twice in a row, as a learner re-running a cell would: a lesson must not
    break on its second run (a folder that already exists, a figure already open, a variable
    already changed)."""
    monkeypatch.setenv("FAST", "1")
    monkeypatch.setenv("BYOL_NB_RUNS", str(runs_dir))
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    assert_ran_cleanly(path, execute(path, tmp_path, times=2))


FULL_MODE_STEPS = 3


@pytest.mark.notebooks
@pytest.mark.slow
@pytest.mark.timeout(PER_NOTEBOOK_TIMEOUT_S + 60)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes_in_full_mode_through_every_training_call(path: Path, full_runs_dir: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch):
    """The learner's path: no FAST, the full built-in dataset, every launch and training call with
    the flags a learner's run passes, each run cut to a few steps (BYOL_NB_MAX_STEPS)."""
    monkeypatch.delenv("FAST", raising=False)
    monkeypatch.setenv("BYOL_NB_MAX_STEPS", str(FULL_MODE_STEPS))
    monkeypatch.setenv("BYOL_NB_RUNS", str(full_runs_dir))
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    assert_ran_cleanly(path, execute(path, tmp_path))
