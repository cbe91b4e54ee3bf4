# The README's commands. Everything runs inside .venv, created on first use.
VENV   ?= .venv
PY     := $(VENV)/bin/python
ARCH   := $(shell uname -m)
ifeq ($(ARCH),aarch64)
TORCH  := torch==2.9.1 torchvision==0.24.1
else
TORCH  := torch==2.14.1 torchvision==0.29.1
endif
# extra arguments for `make train`, e.g. make train ARGS="--max-epochs 5"
ARGS   ?=
PYTEST_ARGS ?=

.PHONY: train test lint bench bench-test gpu-check gpu-wheels rehearsal venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.txt Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

train: venv
	$(PY) -m byol_nb.train --data shapes --out runs/byol $(ARGS)

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

# pyflakes and import order (pyproject.toml's [tool.ruff]); CI runs it before the tests
lint: venv
	$(PY) -m ruff check byol_nb tests bench

# the benchmark harness's own tests, apart from the product's: its arithmetic and the GPU check's CPU dry run
bench-test: venv
	$(PY) -m pytest bench/tests $(PYTEST_ARGS)

# the speed and quality tables of BENCHMARKS.md; make bench ARGS=--quick for a smoke run of the harness
bench: venv
	$(PY) -m pip install --quiet --no-build-isolation -e '.[bench]'
	$(PY) -m bench.run $(ARGS)

# The GPU check (bench/gpu_check.py: SyncBN kernels, LARS, host syncs, speed, ddp_notebook, a real-photo
# run, the peers, 2 GPUs), one table; make gpu-check ARGS=--dry-run runs it small on the CPU.
# On a GPU machine with no internet, its own Python: make gpu-check PY=python3. The wheels that
# make gpu-wheels collected go into SITE (--no-index --no-deps: the image's torch is never touched);
# there is no venv and nothing comes from the network. Without PY: the project's venv and the peers.
WHEELS ?= .whl
SITE   ?= /tmp/byol_nb_site
ifeq ($(origin PY),command line)
gpu-check:
	$(PY) -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $(SITE) $(WHEELS)/*.whl
	PYTHONPATH=$(SITE)$${PYTHONPATH:+:$$PYTHONPATH} $(PY) -m bench.gpu_check $(ARGS)
else
gpu-check: venv
	$(PY) -m pip install --quiet --no-build-isolation -e '.[bench]'
	$(PY) -m bench.gpu_check $(ARGS)
endif

# What the GPU machine lacks, for Python 3.12 on manylinux x86-64, into WHEELS (git-ignored; at most
# 40 MiB, checked): kornia, psutil, the notebook packages and their dependencies (bench/wheels.py),
# and the CIFAR-10 subset's archive (BYOL_NB_PHOTOS_TAR, else ../shared/data/cifar10-subset.tar).
HOST_PYTHON ?= python3
gpu-wheels:
	$(HOST_PYTHON) -m bench.wheels $(WHEELS)

# The GPU machine rehearsed on the CPU, before any GPU time: a Python 3.12 venv in REHEARSAL holding
# what the GPU image holds (torch 2.11 and its neighbours, from PyPI: a CUDA build, which runs on
# the CPU), everything else only from WHEELS; then the check's dry run, the quick tests and a 20-step
# run on the real photos, each timed. PYTHON312: python3.12 on the PATH if it runs, else pyenv's.
REHEARSAL ?= .rehearsal
PYTHON312 ?= $(shell for p in python3.12 $(HOME)/.pyenv/versions/3.12*/bin/python3.12; do \
	"$$p" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && { command -v "$$p"; break; }; done)
IMAGE_PACKAGES := torch==2.11.0 torchvision==0.26.0 pytorch-lightning==2.6.6 einops matplotlib numpy pillow pytest \
	pytest-timeout hypothesis
RUN_REHEARSED := PYTHONPATH=$(abspath $(REHEARSAL))/site BYOL_NB_CACHE=$(abspath $(REHEARSAL))/cache $(REHEARSAL)/bin/python

$(REHEARSAL)/.installed:
	@test -n "$(PYTHON312)" || { echo "no Python 3.12 found: make rehearsal PYTHON312=/path/to/python3.12"; exit 1; }
	test -x $(REHEARSAL)/bin/python || $(PYTHON312) -m venv $(REHEARSAL)
	$(REHEARSAL)/bin/python -m pip install --quiet $(IMAGE_PACKAGES)
	touch $@

rehearsal: SHELL := /bin/bash
rehearsal: $(REHEARSAL)/.installed
	@test -f $(WHEELS)/cifar10-subset.tar || { echo "no $(WHEELS)/cifar10-subset.tar: run make gpu-wheels"; exit 1; }
	rm -rf $(REHEARSAL)/site $(REHEARSAL)/photos
	$(REHEARSAL)/bin/python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
	    --target $(REHEARSAL)/site $(WHEELS)/*.whl
	mkdir -p data && test -d data/cifar10-subset/train || tar -xf $(WHEELS)/cifar10-subset.tar -C data
	TIMEFORMAT='rehearsal: dry run of the check, %0R s'; time $(RUN_REHEARSED) -m bench.gpu_check --dry-run \
	    --out $(REHEARSAL)/gpu_check.json
	TIMEFORMAT='rehearsal: quick tests, %0R s'; time $(RUN_REHEARSED) -m pytest -q -p no:cacheprovider \
	    -m "not slow and not notebooks" -x tests
	TIMEFORMAT='rehearsal: 20-step photo run, %0R s'; time $(RUN_REHEARSED) -m byol_nb.train \
	    --data data/cifar10-subset/train --val-data data/cifar10-subset/test --max-steps 20 --batch-size 32 \
	    --proj-hidden 256 --accelerator cpu --no-progress --out $(REHEARSAL)/photos

lab: venv
	$(VENV)/bin/jupyter lab notebooks/

# everything the commands above generate (downloaded sets in data/cifar10 and data/stl10 are kept)
clean:
	rm -rf runs lightning_logs bench/results data/shapes data/shapes-fast data/cache data/cifar10-subset \
	    .pytest_cache .ruff_cache
