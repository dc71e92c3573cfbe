# bionemo-scale developer entry points. Every target builds .venv from scratch when needed,
# always through constraints.txt so that no dependency can swap the CPU torch for a CUDA build.
PYTHON ?= python3
VENV ?= .venv
BENCH_VENV ?= .venv-bench
PIP := $(VENV)/bin/pip
PY := $(VENV)/bin/python
STAMP := $(VENV)/.bionemo-scale-installed
BENCH_STAMP := $(BENCH_VENV)/.bench-installed
PYTEST_ARGS ?=
DEMO_OUT ?= demo_out

.PHONY: venv demo test test-fast lint format bench bench-quality bench-ensemble bench-throughput bench-data bench-venv constraints clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -U pip
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[test]"
	$(PIP) check
	touch $@

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/bionemo-scale demo --output $(DEMO_OUT)

# The whole suite, distributed (torchrun, gloo) tests and the cell-eval parity tests (which
# run cell-eval in .venv-bench through a subprocess) included. GPU/FP8 tests skip without CUDA/TE.
test: $(STAMP) $(BENCH_STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow and not distributed" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff check --fix src tests benchmarks
	$(VENV)/bin/ruff format src tests benchmarks

# Second environment for the peers that need numpy>=2: cell-eval 0.8.2 and arc-state 0.11.1 (STATE).
$(BENCH_STAMP): benchmarks/requirements-bench.txt benchmarks/constraints-bench.txt
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q -U pip
	$(BENCH_VENV)/bin/pip install -q -c benchmarks/constraints-bench.txt -r benchmarks/requirements-bench.txt
	touch $@

bench-venv: $(BENCH_STAMP)

# Heavy: each benchmark runs for up to ~30 minutes on 2 cores; outputs go to bench_out/.
bench: bench-quality bench-ensemble bench-data bench-throughput  # bench-data writes the 1M-cell inputs throughput reads

# each command under 30 minutes here (case a's seeds split in two); quality.md combines what has run
bench-quality: $(STAMP) $(BENCH_STAMP)
	OMP_WAIT_POLICY=PASSIVE $(PY) benchmarks/quality.py --cases a --seeds 0 1
	OMP_WAIT_POLICY=PASSIVE $(PY) benchmarks/quality.py --cases a --seeds 2
	OMP_WAIT_POLICY=PASSIVE $(PY) benchmarks/quality.py --cases b
	OMP_WAIT_POLICY=PASSIVE $(PY) benchmarks/quality.py --cases c
	OMP_WAIT_POLICY=PASSIVE $(PY) benchmarks/lattice_draws.py --case b --draws 10

# Seed ensembles of SCALE (9 runs per case, split into commands under 30 minutes each).
bench-ensemble: $(STAMP) $(BENCH_STAMP)
	OMP_WAIT_POLICY=PASSIVE $(PY) benchmarks/ensemble.py --case b --train-only 0 1 2 3 4
	OMP_WAIT_POLICY=PASSIVE $(PY) benchmarks/ensemble.py --case b
	OMP_WAIT_POLICY=PASSIVE $(PY) benchmarks/ensemble.py --case b --subset val
	OMP_WAIT_POLICY=PASSIVE $(PY) benchmarks/ensemble.py --case a --train-only 0 1 2 3 4
	OMP_WAIT_POLICY=PASSIVE $(PY) benchmarks/ensemble.py --case a

# ~29 + 7 + 3 minutes; the first and last also refresh the README's charts
bench-throughput: $(STAMP) $(BENCH_STAMP)
	$(PY) benchmarks/throughput.py --omp-wait-policy passive --docs-img docs/img/throughput.png
	$(PY) benchmarks/throughput.py --parts train --out bench_out/throughput_default_omp  # libgomp's default wait policy, as a user runs
	$(PY) benchmarks/model_step.py --omp-wait-policy passive --genes 1000 2000 --threads 2 --docs-img docs/img/model_step.png

bench-data: $(STAMP) $(BENCH_STAMP)
	$(PY) benchmarks/dataloader.py
	$(PY) benchmarks/preprocess_scale.py
	$(PY) benchmarks/metrics.py --workdir bench_out/metrics

constraints: $(STAMP)
	( echo "# The measured CPU development stack: pip check clean. Regenerate with make constraints."; \
	  $(PIP) freeze --exclude-editable | grep -v '^bionemo-scale' | sed 's/^torch==2.13.0+cpu/torch==2.13.0/' ) > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) $(BENCH_VENV) $(DEMO_OUT) build dist src/*.egg-info
