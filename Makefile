# Two commands on a fresh clone: `make demo` and `make test`. Both create .venv and install what is needed.
# torch is pinned to the CPU build that lies on these machines' disk (an unpinned torch pulls a CUDA build of
# several GB); on a CUDA machine, install torch for your CUDA first (README: "Installing on a GPU machine").
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fqtc-installed
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test install bench-setup lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fqtc demo

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(VENV)/bin/ruff check fqtc tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache
