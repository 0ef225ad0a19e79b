# sonoseg: two commands. `make run` sets up and runs the server on the embedded default (SQLite,
# no external service); `make test` sets up and runs every test. Both work from a fresh clone.
PYTHON ?= python3
VENV ?= .venv
VENV_LS ?= .venv-ls
TORCH_VERSION ?= 2.13.0
LABEL_STUDIO_VERSION ?= 1.23.2
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PYTEST_WORKERS ?= 2
export SONOSEG_DATA_DIR ?= $(CURDIR)/sonoseg-data

.PHONY: run test install install-ls lint bench clean help

help:
	@echo "make run    - install into $(VENV), migrate the embedded SQLite database, start the server and a worker"
	@echo "make test   - install into $(VENV) (+ Label Studio into $(VENV_LS)), run all tests"
	@echo "make bench  - run the benchmarks in bench/ (minutes)"

# torch goes in first, pinned, so that pip never pulls a multi-GB CUDA build as a dependency.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "torch==$(TORCH_VERSION)"
	$(PIP) install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# Label Studio lives in its own virtualenv: its pins (Django, requests...) must not shape ours.
$(VENV_LS)/.installed:
	test -x $(VENV_LS)/bin/python || $(PYTHON) -m venv $(VENV_LS)
	$(VENV_LS)/bin/python -m pip install --quiet --upgrade pip
	$(VENV_LS)/bin/python -m pip install --quiet "label-studio==$(LABEL_STUDIO_VERSION)"
	touch $@

install-ls: $(VENV_LS)/.installed

# The main job: the Label Studio backend, plus one worker (with the beat scheduler embedded) that
# retrains in the background. The worker stops when the server does.
run: install
	$(VENV)/bin/sonoseg db upgrade
	$(VENV)/bin/sonoseg worker --beat & w=$$!; trap "kill $$w 2>/dev/null; wait $$w" EXIT INT TERM; \
	  $(VENV)/bin/sonoseg serve

# PASSIVE: idle OpenMP threads sleep instead of spinning, which matters when pytest workers,
# Label Studio and a Celery worker share 2 cores (the scan tests run 6x slower without it).
test: install install-ls
	OMP_WAIT_POLICY=PASSIVE $(VENV)/bin/pytest -n $(PYTEST_WORKERS) --dist loadgroup

bench: install
	$(PY) bench/bench_rle.py

clean:
	rm -rf $(VENV) $(VENV_LS) sonoseg-data .pytest_cache build *.egg-info
