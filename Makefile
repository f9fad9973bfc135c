# mythos-deploy: `make install demo` sets up a fresh machine and runs the main job;
# `make test` runs the whole suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/mythos-export
CKPT ?= ckpt/tiny

.PHONY: install demo bench gpu-check test test-fast clean

install:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch 2.13.0 resolves to the local CPU wheel; any other version downloads gigabytes
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test,bench,triton]'
	# test oracle only: it pins torch 2.11.0 and imports transformers in its __init__
	$(PY) -m pip install --quiet --no-deps open-mythos==0.5.0

ONNX ?= out/tiny-onnx

demo:
	$(CLI) init --preset tiny --seed 0 -o $(CKPT) --force
	$(CLI) onnx $(CKPT) -o $(ONNX) --loop loop --force
	$(CLI) generate $(ONNX) --prompt "The loop " --max-new-tokens 24
	$(CLI) parity $(CKPT) $(ONNX) --tokens 16

bench:
	$(CLI) bench
	$(PY) -m benchmarks.fill_forward
	$(PY) -m benchmarks.export_bench
	$(PY) -m benchmarks.quant_bench

test:
	$(PY) -m pytest -q

test-fast:
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) ckpt out .pytest_cache .hypothesis *.egg-info

gpu-check:
	$(PY) -m benchmarks.gpu_check
