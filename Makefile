# Two commands get a newcomer going: `make demo` and `make test`. Each sets up what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch 2.13.0 lies on the build machines' disk; pinning it avoids a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup ext test test-gpu cuda-build-check demo sweep bench bench-gpu bench-kernels clean

setup: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	# Kernels are compiled once, in place, by `ext` below (pip's editable build would compile them in a
	# build directory of its own, and `ext` would then compile them a second time).
	LOWRANK_OPTIM_NO_EXTENSIONS=1 $(PY) -m pip install --quiet --disable-pip-version-check --no-build-isolation -e ".[test]"
	# The reference GaLore package, for the parity tests; its own dependencies (transformers,
	# bitsandbytes) are not needed by the optimizer we compare against and would pull in a lot.
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps "galore-torch==1.0"
	# The reference APOLLO package (tests/test_apollo_reference.py loads its optimizer module alone).
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps "apollo-torch==1.0.3"
	touch $@

# Builds the C++ CPU kernels next to the package, where the loader finds them; incremental afterwards.
ext: $(STAMP)
	$(PY) setup.py -q build_ext --inplace

# Lint and type check first (seconds; configured in ruff.toml and mypy.ini), then the suite.
test: ext
	$(PY) -m ruff check lowrank_optim tests
	$(PY) -m mypy lowrank_optim
	$(PY) -m pytest -q tests

# For a machine with an NVIDIA GPU, a CUDA build of torch and nvcc: builds the CUDA kernels, runs the
# GPU tests and the kernel benchmark, writes bench/results/gpu-<date>-<commit>/. Uses the current python.
test-gpu:
	PY=$(if $(wildcard $(PY)),$(PY),$(PYTHON)) bash bench/gpu/run.sh

# Without a GPU: builds the CUDA extension against a CUDA torch (about 5.5 GB, in /tmp) and checks that
# it loads and registers every op. Not part of `make test` (too large for CI); about 10 minutes.
cuda-build-check:
	bash bench/gpu/build_check.sh

demo: ext
	$(PY) -m lowrank_optim demo

# The learning-rate sweep behind the tiny presets (5 learning rates per method, then 2 seeds at the best;
# about 11 minutes on 2 cores for the 6 methods, so not part of `make demo`). Writes sweep_out/.
sweep: ext
	$(PY) -m lowrank_optim compare --config tiny --sweep-lr --seeds 2 --out sweep_out

bench: ext
	$(PY) bench/bench_galore_step.py

bench-kernels: ext
	$(PY) bench/bench_kernels.py

clean:
	rm -rf $(VENV) build *.egg-info lowrank_optim/_C_*.so

# For a machine with an NVIDIA GPU and a CUDA build of torch (no DeepSpeed needed): peak memory and
# tokens/s at 60M/350M/1B/7B per method, written to bench/results/gpu-memory-<date>.{md,json}.
bench-gpu:
	PY=$(if $(wildcard $(PY)),$(PY),$(PYTHON)); $$PY bench/bench_gpu_memory.py
