PYTHON ?= python3
PIP := $(PYTHON) -m pip
MODEL ?= models/shapes-videollava

.PHONY: install test demo lint bench

# torch first and pinned: a bare `torch` requirement would pull gigabytes of CUDA wheels on a CPU box.
install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"

test:
	$(PYTHON) -m pytest tests

lint:
	$(PYTHON) -m ruff check vidsparse tests

bench:
	$(PYTHON) bench/prefill.py
