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

.PHONY: train test lint bench bench-test gpu-check venv clean

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

# the GPU check: speed against the peers and across GPUs, host syncs, memory, every method on 2 GPUs,
# LARS and ddp_notebook, one table; make gpu-check ARGS=--dry-run runs it small on the CPU
gpu-check: venv
	$(PY) -m pip install --quiet --no-build-isolation -e '.[bench]'
	$(PY) -m bench.gpu_check $(ARGS)

lab: venv
	$(VENV)/bin/jupyter lab notebooks/

# everything the commands above generate (downloaded sets in data/cifar10 and data/stl10 are kept)
clean:
	rm -rf runs lightning_logs bench/results data/shapes data/shapes-fast data/cache data/cifar10-subset \
	    .pytest_cache .ruff_cache
