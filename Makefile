# Each target builds or refreshes .venv from pyproject.toml by itself.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# -qq: pip notes, per package, every index folder that the machine's pip config
	# names but lacks (about 170 lines in a fresh install); errors still show.
	$(PY) -m pip install -qq --upgrade pip
	# CPU build first, so the torch requirement is already met (no multi-GB CUDA wheel).
	$(PY) -m pip install -qq "torch==2.13.0"
	# torch pinned again: sae-bench's torchvision would otherwise pull torch 2.14 (CUDA).
	$(PY) -m pip install -qq -e ".[dev,evals,demo]" "torch==2.13.0"
	# sae-bench requires torchvision but never imports it; PyPI's build fails to load
	# beside the CPU torch ("operator torchvision::nms does not exist") and breaks
	# transformers' imports, so it goes.
	$(PY) -m pip uninstall -q -y torchvision
	touch $(STAMP)

# --overwrite: each `make demo` trains afresh (an interrupted one continues with
# `sae-gba demo --out runs/demo --resume`).
demo: $(STAMP)
	$(VENV)/bin/sae-gba demo --out runs/demo --overwrite

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
