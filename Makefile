# Everything a user runs is installed here: `make demo`, `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test fuzz lint bench bench-cpu bench-data bench-micro bench-gpu bench-compile check-triton36 gpu-bundle gpu-check clean

# torch goes in first and the package builds without isolation: setup.py compiles the C++ extension
# pcrlv2_fast._C (csrc/) against the installed torch.
$(STAMP): setup.py requirements-dev.txt $(wildcard csrc/*.cpp csrc/*.h)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q $$(grep -E '^torch[<>=!~ ]' requirements-dev.txt)
	$(PY) -m pip install -q --no-build-isolation -r requirements-dev.txt
	touch $(STAMP)

install: $(STAMP)

# Fetch the real sample scans, pretrain a small model for a few minutes on CPU, leave results in runs/demo.
demo: $(STAMP)
	$(PY) -m pcrlv2_fast demo --out runs/demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q tests

# The fuzz tests at length (2000 examples per target instead of make test's 40): scan headers, cache indexes,
# checkpoints. Outcome counts per target: pytest's --hypothesis-show-statistics.
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=long $(PY) -m pytest -q tests/fuzz --hypothesis-show-statistics

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Train-step benchmark on this machine's CPU (engine vs eager fp32, one run).
bench-cpu: $(STAMP)
	$(PY) benchmarks/benchmark_train_step.py --device cpu

# Data pipeline on this CPU: the official torchio/skimage cost vs every loader, one run, per core.
bench-data: $(STAMP)
	$(PY) -m pip install -q scikit-image torchio
	$(PY) benchmarks/benchmark_data.py
	$(PY) benchmarks/benchmark_crop_resize.py

# Per-op CPU micro-benchmarks (pytest-benchmark; not part of `make test`).
bench-micro: $(STAMP)
	$(PY) -m pytest benchmarks/micro -q --benchmark-json=benchmarks/results/micro-cpu-$$(date +%F).json

bench: bench-cpu bench-data bench-micro

# Every Triton kernel configuration of the official model compiled for Hopper (sm_90) here, no GPU needed:
# registers, spills, shared memory (benchmarks/results/compile-sm_90-<date>.json).
bench-compile: $(STAMP)
	$(PY) benchmarks/benchmark_compile.py

# The GPU machine's Triton (3.6.0) in a second environment: the sm_90 compile report (bf16 set) and the kernel
# tests under the interpreter.
VENV36 ?= .venv-triton36
check-triton36: $(STAMP)
	test -x $(VENV36)/bin/python || $(PYTHON) -m venv $(VENV36)
	$(VENV36)/bin/python -m pip install -q --upgrade pip setuptools wheel
	$(VENV36)/bin/python -m pip install -q $$(grep -E '^torch[<>=!~ ]' requirements-dev.txt)
	# numpy < 2.4: Triton 3.6's interpreter converts one-element arrays to Python ints, which numpy 2.4 refuses.
	$(VENV36)/bin/python -m pip install -q triton==3.6.0 "numpy<2.4" tqdm SimpleITK pytest
	$(VENV36)/bin/python -m pip install -q --no-deps --no-build-isolation -e .
	$(VENV36)/bin/python -c "import triton; assert triton.__version__ == '3.6.0', triton.__version__"
	$(VENV36)/bin/python -m pcrlv2_fast selftest --arch sm_90 --dtypes bf16
	$(VENV36)/bin/python -m pytest -q tests/kernels

# On a CUDA machine: kernel selftest, per-kernel and conv-block benchmarks, the train step and the GPU data
# loaders; JSON rows in benchmarks/results/.
bench-gpu: $(STAMP)
	$(PY) -m pcrlv2_fast selftest --device cuda
	$(PY) benchmarks/benchmark_kernels.py --device cuda
	$(PY) benchmarks/benchmark_conv3d_block.py --device cuda
	$(PY) benchmarks/benchmark_train_step.py --device cuda --baseline-precision bf16
	$(PY) benchmarks/benchmark_data.py --device cuda
	$(PY) benchmarks/benchmark_compile.py

# The GPU visit. Here: `make gpu-bundle` puts a small real preprocessed cache (from ../shared/data) and the commit
# into gpu_bundle/ (ignored, carried with the tree). On the GPU machine (its own torch and Triton, no venv):
# `make gpu-check` runs every stage time-boxed and writes JSON under $OUT or benchmarks/results/.
# `make gpu-check DEVICE=cpu GPU_PYTHON=.venv/bin/python` is the dry run at tiny sizes.
DEVICE ?= cuda
GPU_PYTHON ?= python3
gpu-bundle: $(STAMP)
	$(PY) benchmarks/gpu_bundle.py

gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py --device $(DEVICE)

clean:
	rm -rf $(VENV) $(VENV36) runs build *.egg-info
