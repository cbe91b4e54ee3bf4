"""Fill the wheel folder that travels to a GPU machine with no internet (``make gpu-wheels``).

    python3 -m bench.wheels .whl

The GPU machine's image already holds torch, torchvision, Lightning and most of what byol_nb needs
(``bench/gpu_image_packages.txt``). What it lacks travels as wheels for its Python (CPython 3.12,
manylinux x86-64), installed there with ``pip install --no-index --no-deps --target``, so that
nothing of the image (torch above all) is touched:

* kornia at the version requirements.txt pins (``import byol_nb`` needs it), and psutil (the
  check's memory readings on the CPU);
* nbclient, nbformat, jupyter_client and ipykernel, for the check's ``ddp_notebook`` row;
* every dependency of those that the image lacks. pip resolves the whole tree for the GPU
  machine's Python and platform (``pip install --dry-run --report``); the tree is then walked from
  what was asked for, and the walk stops at a package the image already has: that package stays
  out, and so does everything pulled in only through it (torch's CUDA libraries, built for another
  CUDA than the image's). What is asked for by name always travels.

Then the CIFAR-10 subset's archive (the check's real-photo run) is copied beside the wheels when it
is found (``BYOL_NB_PHOTOS_TAR``, else ``../shared/data/cifar10-subset.tar``; a copy made by an
earlier run is kept otherwise). The folder's wheels are removed first, so that it never holds two
versions of one package (two stop the install), and it must stay within ``LIMIT_MIB``: the device tool carries at most 64 MiB of working tree. Only the standard library
is imported: any Python 3 with pip runs it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# pip's own copy of packaging: pip is what this script runs anyway, packaging itself may be absent.
from pip._vendor.packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent
IMAGE_PACKAGES = Path(__file__).with_name("gpu_image_packages.txt")
PHOTOS_TAR = Path(os.environ.get("BYOL_NB_PHOTOS_TAR", REPO.parent / "shared" / "data" / "cifar10-subset.tar"))
LIMIT_MIB = 40
# The GPU machine's interpreter and the wheel tags it accepts (its glibc is above 2.28).
TARGET = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
          "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_27_x86_64",
          "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64", "--platform", "any"]
NOTEBOOK = ["nbclient", "nbformat", "jupyter_client", "ipykernel"]
# Environment markers as the GPU machine's python3 evaluates them (Python 3.12 on Linux x86-64).
MARKERS = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
           "platform_python_implementation": "CPython", "os_name": "posix", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64"}


def canonical(name: str) -> str:
    """A distribution's name as PEP 503 compares names: lower case, runs of -_. as one -."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned(name: str) -> str:
    """``name==version`` as requirements.txt pins it: the GPU machine runs what the tests ran with."""
    for line in (REPO / "requirements.txt").read_text().splitlines():
        requirement = line.split("#")[0].strip()
        if canonical(requirement.partition("==")[0]) == canonical(name):
            return requirement
    raise SystemExit(f"error: requirements.txt pins no version of {name}")


def requests() -> list[str]:
    return [pinned("kornia"), "psutil", *NOTEBOOK]


def image_packages() -> set[str]:
    lines = IMAGE_PACKAGES.read_text().splitlines()
    return {canonical(line) for line in lines if line.strip() and not line.startswith("#")}


def resolve(asked: list[str]) -> list[dict]:
    """pip's report of every distribution that installing ``asked`` into an empty folder on the GPU
    machine's Python would install, from the index's metadata (no wheel is downloaded)."""
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "report.json"
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed",
                        "--report", str(report), "--target", str(Path(scratch) / "site"), *TARGET, *asked],
                       check=True)
        return json.loads(report.read_text())["install"]


def needed(asked: list[str], resolved: list[dict], present: set[str]) -> dict[str, str]:
    """The distributions (name: version) to carry: ``asked``, then the dependencies reached from it
    through packages that the image lacks, under the GPU machine's markers and the extras asked."""
    found = {canonical(item["metadata"]["name"]): item["metadata"] for item in resolved}
    todo = [Requirement(a) for a in asked]
    requested = {canonical(r.name) for r in todo}
    carried: dict[str, str] = {}
    while todo:
        requirement = todo.pop()
        name = canonical(requirement.name)
        if name in carried or (name in present and name not in requested):
            continue
        metadata = found[name]
        carried[name] = metadata["version"]
        for line in metadata.get("requires_dist") or []:
            dependency = Requirement(line)
            extras = requirement.extras or {""}
            if dependency.marker is None or any(dependency.marker.evaluate({**MARKERS, "extra": e}) for e in extras):
                todo.append(dependency)
    return carried


def main(argv: list[str]) -> int:
    folder = Path(argv[0] if argv else ".whl")
    folder.mkdir(exist_ok=True)
    for old in folder.glob("*.whl"):
        old.unlink()
    asked = requests()
    resolved = resolve(asked)
    carried = needed(asked, resolved, image_packages())
    left = sorted({canonical(item["metadata"]["name"]) for item in resolved} - set(carried))
    print(f"resolved {len(resolved)} distributions; left out, being the image's or needed only through its "
          f"packages: {', '.join(left)}")
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(folder), *TARGET,
                    *(f"{name}=={version}" for name, version in sorted(carried.items()))], check=True)
    if PHOTOS_TAR.is_file():
        shutil.copyfile(PHOTOS_TAR, folder / PHOTOS_TAR.name)
    elif (folder / PHOTOS_TAR.name).is_file():
        print(f"note: {PHOTOS_TAR} not found (set BYOL_NB_PHOTOS_TAR): the copy already in {folder} is kept")
    else:
        print(f"warning: {PHOTOS_TAR} not found (set BYOL_NB_PHOTOS_TAR): the GPU check's real-photo run will "
              f"have no photos")
    files = sorted(p for p in folder.iterdir() if p.is_file())
    for path in files:
        print(f"  {path.stat().st_size / 2**20:6.2f} MiB  {path.name}")
    total = sum(p.stat().st_size for p in files) / 2**20
    print(f"{len(files)} files, {total:.1f} MiB in {folder}")
    if total > LIMIT_MIB:
        raise SystemExit(f"error: {folder} holds {total:.1f} MiB, over the {LIMIT_MIB} MiB it may take")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
