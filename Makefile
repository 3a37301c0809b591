# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Each one creates the local virtual environment .venv on first use (CPU build of torch first,
# so pip never pulls the CUDA wheels), then runs.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-dev

.PHONY: demo test test-tensorflow test-triton lint format bench bench-infer bench-peers clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: $(STAMP)
	$(PY) -m rwkvkit.demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q

# The Keras tests on the TensorFlow backend too (optional: tensorflow-cpu is a 274 MB wheel, ~1.5 GB
# installed), in a venv of their own so the default one stays as `make test` builds it
TF_VENV := .venv-tf
test-tensorflow:
	test -x $(TF_VENV)/bin/python || $(PYTHON) -m venv $(TF_VENV)
	$(TF_VENV)/bin/python -m pip install -q torch==2.13.0
	$(TF_VENV)/bin/python -m pip install -q -e '.[keras]' tensorflow-cpu==2.21.0 pytest
	$(TF_VENV)/bin/python -m pytest -q tests/test_keras.py

# rwkvkit's Triton kernels (tests marked `triton`, deselected by the default suite), in a venv of their
# own; without a GPU they run on CPU under Triton's interpreter (the tests set TRITON_INTERPRET=1)
TRITON_VENV := .venv-triton
test-triton:
	test -x $(TRITON_VENV)/bin/python || $(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install -q torch==2.13.0
	$(TRITON_VENV)/bin/python -m pip install -q triton==3.9.0
	$(TRITON_VENV)/bin/python -m pip install -q -e '.[dev]'
	$(TRITON_VENV)/bin/python -m pytest -q -m triton

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP)
	$(PY) benchmarks/bench_wkv.py
	$(PY) benchmarks/bench_tokenizer.py
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_infer.py

bench-infer: $(STAMP)
	$(PY) benchmarks/bench_infer.py

# rwkvkit beside llama.cpp (llama-cpp-python, built once into ~/.cache/rwkvkit/wheels) and the reference
bench-peers: $(STAMP)
	$(PY) benchmarks/bench_vs_llamacpp.py

clean:
	rm -rf $(VENV) $(TF_VENV) $(TRITON_VENV) runs build *.egg-info
