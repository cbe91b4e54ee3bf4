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
import re
import time
from pathlib import Path
from typing import Callable

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


MAX_CELL_TEXT = 3000  # characters a cell may print: a lesson's output is read, not scrolled


def execute(path: Path, tmp_path: Path, times: int = 1, then: Callable | None = None) -> list:
    """Run every cell of the notebook at ``path`` ``times`` times in a fresh kernel, then
    ``then(client, cells)`` in the same kernel; return its cells."""
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
        if then is not None:
            then(client, notebook.cells)
    print(f"{path.name}: {time.perf_counter() - started:.0f} s")
    return notebook.cells


def printed(cell) -> str:
    """The text a code cell shows: its streams and the plain text of its results (not its figures)."""
    parts = []
    for output in cell.outputs:
        if output.output_type == "stream":
            parts.append(output.text)
        elif output.output_type in ("execute_result", "display_data") and "image/png" not in output.get("data", {}):
            parts.append(output.get("data", {}).get("text/plain", ""))
    return "".join(parts)


def assert_ran_cleanly(path: Path, cells: list) -> None:
    """No cell raised, no cell printed more than MAX_CELL_TEXT characters, and the lesson showed at
    least one figure."""
    outputs = [o for c in cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert [o for o in outputs if "image/png" in o.get("data", {})], f"{path.name} shows no figure"
    long = {i: len(printed(c)) for i, c in enumerate(cells) if c.cell_type == "code" and len(printed(c)) > MAX_CELL_TEXT}
    assert not long, f"{path.name}: cells printing more than {MAX_CELL_TEXT} characters (cell: characters): {long}"


@pytest.fixture()
def fast_mode(runs_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAST", "1")
    monkeypatch.setenv("BYOL_NB_RUNS", str(runs_dir))
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")


@pytest.mark.notebooks
@pytest.mark.slow
@pytest.mark.timeout(PER_NOTEBOOK_TIMEOUT_S + 60)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes_in_fast_mode(path: Path, fast_mode: None, tmp_path: Path):
    """Every code cell runs twice in a row, as a learner re-running a cell would: a lesson must not
    break on its second run (a folder that already exists, a figure already open, a variable
    already changed)."""
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


# ---- the exercises' hidden solutions ---------------------------------------------------------------

SOLUTION_BLOCK = re.compile(r"<summary>[^<]*[Ss]olution[^<]*</summary>(.*?)</details>", re.S)
PYTHON_CODE = re.compile(r"```python\n(.*?)```", re.S)


def solutions(cells: list) -> list[tuple[int, str]]:
    """(index of the check cell, solution code) for every hidden solution: the ```python blocks in
    a <details> block whose summary says solution, checked by the last "# check cell" above it."""
    found, check_cell = [], None
    for index, cell in enumerate(cells):
        source = "".join(cell.source)
        if cell.cell_type == "code" and source.startswith("# check cell"):
            check_cell = index
        for block in SOLUTION_BLOCK.findall(source) if cell.cell_type == "markdown" else ():
            code = "\n".join(PYTHON_CODE.findall(block))
            if code:
                assert check_cell is not None, f"cell {index}: a solution with no check cell above it"
                found.append((check_cell, code))
    return found


def test_every_lesson_with_exercises_has_solutions_that_a_check_cell_checks():
    nbformat = pytest.importorskip("nbformat")
    for path in NOTEBOOKS:
        assert solutions(nbformat.read(path, as_version=4).cells), f"{path.name}: no hidden solution found"


@pytest.mark.notebooks
@pytest.mark.slow
@pytest.mark.timeout(PER_NOTEBOOK_TIMEOUT_S + 60)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_hidden_solution_pasted_in_passes_its_check(path: Path, fast_mode: None, tmp_path: Path):
    """After the lesson ran (FAST), each solution is run in the notebook's own namespace, as a learner
    pasting it would, and its check cell run again: every check says correct, none fails."""
    nbformat = pytest.importorskip("nbformat")

    def paste_solutions(client, cells: list) -> None:
        for check_index, code in solutions(cells):
            solution = nbformat.v4.new_code_cell(code)
            cells.append(solution)  # nbclient records a cell's outputs at its index in the notebook
            client.execute_cell(solution, len(cells) - 1)
            check_cell = nbformat.v4.new_code_cell("".join(cells[check_index].source))
            client.execute_cell(check_cell, check_index)
            said = printed(check_cell)
            assert "correct!" in said and "not yet" not in said and "not answered" not in said, \
                f"{path.name}: the solution checked by cell {check_index} does not pass: {said!r}\n{code}"

    execute(path, tmp_path, then=paste_solutions)
