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

.PHONY: run test install install-ls install-browser lint bench bench-training fuzz clean help

help:
	@echo "make run    - install into $(VENV), migrate the embedded SQLite database, start the server and a worker"
	@echo "make test   - install into $(VENV) (+ Label Studio into $(VENV_LS)), make lint, run all tests"
	@echo "make lint   - ruff (check + format), mypy --strict, import-linter layer contracts"
	@echo "make bench  - run the quick benchmarks in bench/ (minutes); make bench-training: the training ones (hours)"
	@echo "make fuzz   - run each atheris fuzz target in fuzz/ for FUZZ_SECONDS (default 60); findings land in $(FUZZ_WORK)"

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

# The web pages' tests drive Debian's Chromium (nothing downloads a browser). Installed with apt
# where we are root and it is missing; elsewhere those tests skip and say why.
install-browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium >/dev/null \
	  || echo "make: no Chromium; the browser tests will skip (apt-get install chromium)"; }

# The main job: the Label Studio backend, plus one worker (with the beat scheduler embedded) that
# retrains in the background. The worker stops when the server does.
run: install
	$(VENV)/bin/sonoseg db upgrade
	$(VENV)/bin/sonoseg worker --beat & w=$$!; trap "kill $$w 2>/dev/null; wait $$w" EXIT INT TERM; \
	  $(VENV)/bin/sonoseg serve

# PASSIVE: idle OpenMP threads sleep instead of spinning, which matters when pytest workers,
# Label Studio and a Celery worker share 2 cores (the scan tests run 6x slower without it).
test: lint install-ls install-browser
	OMP_WAIT_POLICY=PASSIVE $(VENV)/bin/pytest -n $(PYTEST_WORKERS) --dist loadgroup --durations=20

# Types (mypy --strict, settings in pyproject.toml), style (ruff check + format) and the layer
# rules (import-linter contracts in pyproject.toml). `make test` runs this first.
LINT_PATHS := backend workers cli tests bench fuzz migrations
lint: install
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# Minutes: RLE codec, selective scan, inference latency, the server's /predict, adversarial inputs.
# Each prints ratios against a baseline measured in the same run; docs/benchmarks.md has the figures.
BENCH_OUT ?= $(CURDIR)/sonoseg-data/bench
bench: install
	mkdir -p $(BENCH_OUT)
	OMP_WAIT_POLICY=PASSIVE $(PY) bench/bench_rle.py
	OMP_WAIT_POLICY=PASSIVE $(PY) bench/bench_scan.py --quick
	OMP_WAIT_POLICY=PASSIVE $(PY) bench/bench_inference.py --presets cpu_small,cpu_small_unet --train-presets "" --repeats 5
	OMP_WAIT_POLICY=PASSIVE $(PY) bench/bench_predict_server.py --repeats 10
	$(PY) bench/adversarial_inputs.py --out $(BENCH_OUT)/reliability.md

# Hours: training accuracy, Mamba variants and the generality study, BENCH_MINUTES per run each.
BENCH_MINUTES ?= 25
bench-training: install
	mkdir -p $(BENCH_OUT)
	OMP_WAIT_POLICY=PASSIVE $(PY) bench/bench_train_accuracy.py --minutes $(BENCH_MINUTES) --out $(BENCH_OUT)/accuracy
	OMP_WAIT_POLICY=PASSIVE $(PY) bench/bench_mamba_variants.py --minutes $(BENCH_MINUTES)
	OMP_WAIT_POLICY=PASSIVE $(PY) bench/bench_generality.py --minutes $(BENCH_MINUTES) --out $(BENCH_OUT)/generality

# Coverage-guided fuzzing: new inputs and crash/oom/timeout reproducers go to $(FUZZ_WORK), never
# into the committed seed corpus (fuzz/corpus/); save a reproducer there once its bug is fixed.
FUZZ_SECONDS ?= 60
FUZZ_WORK ?= $(CURDIR)/sonoseg-data/fuzz
fuzz: install
	@for target in image_readers rle; do \
	  mkdir -p $(FUZZ_WORK)/$$target/corpus && \
	  echo "== fuzz/fuzz_$$target.py for $(FUZZ_SECONDS) s" && \
	  $(PY) fuzz/fuzz_$$target.py $(FUZZ_WORK)/$$target/corpus fuzz/corpus/$$target \
	    -max_total_time=$(FUZZ_SECONDS) -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
	    -artifact_prefix=$(FUZZ_WORK)/$$target/ -print_final_stats=1 >$(FUZZ_WORK)/$$target/log.txt 2>&1 \
	  || { tail -n 40 $(FUZZ_WORK)/$$target/log.txt; echo "finding: see $(FUZZ_WORK)/$$target/"; exit 1; }; \
	  grep -E "^(stat::number_of_executed_units|stat::peak_rss_mb|Done)" $(FUZZ_WORK)/$$target/log.txt; \
	done

clean:
	rm -rf $(VENV) $(VENV_LS) sonoseg-data .pytest_cache build *.egg-info
