"""The three install paths name the same versions: the Makefile (torch), requirements.txt (the
rest) and environment.yml (conda), so that a conda user runs what CI tested."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_environment_yml_pins_the_makefiles_torch_and_reads_requirements_txt():
    makefile = (REPO / "Makefile").read_text()
    (x86,) = re.findall(r"^else\nTORCH\s*:=\s*(.+)$", makefile, re.M)
    environment = (REPO / "environment.yml").read_text()
    pip_pins = re.findall(r"^\s+- ([\w-]+==[\w.]+)$", environment, re.M)
    assert sorted(pip_pins) == sorted(x86.split()), "environment.yml's torch pins differ from the Makefile's"
    assert re.search(r"^\s+- -r requirements.txt$", environment, re.M)
    dependencies = environment.split("dependencies:", 1)[1]
    conda = re.findall(r"^  - ([\w-]+)", dependencies, re.M)  # conda's own packages, not pip's
    assert set(conda) <= {"python", "pip"}, f"conda packages pinned apart from requirements.txt: {conda}"


def test_requirements_pin_every_runtime_dependency_of_pyproject():
    pinned = {line.split("==")[0].lower().replace("_", "-")
              for line in (REPO / "requirements.txt").read_text().splitlines() if "==" in line}
    pyproject = (REPO / "pyproject.toml").read_text()
    block = pyproject.split("dependencies = [", 1)[1].split("]", 1)[0]
    runtime = {re.match(r'\s*"([\w-]+)', line).group(1).lower().replace("_", "-")
               for line in block.splitlines() if line.strip().startswith('"')}
    assert runtime - {"torch", "torchvision"} <= pinned
