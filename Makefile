# mythos-deploy: `make install demo` sets up a fresh machine and runs the main job;
# `make test` runs the whole suite.
PYTHON ?= python3
VENV ?= .venv
TRITON_VENV ?= .venv-triton
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/mythos-export
# the shipped default: a 0.3M-parameter model trained on the multi-hop task (mythos_deploy/hops.py)
CKPT ?= checkpoints/hops

.PHONY: install demo demo-random demo-checkpoint bench soak serve triton gpu-check test test-fast clean

install:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch 2.13.0 resolves to the local CPU wheel; any other version downloads gigabytes
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test,bench,triton,serve]'
	# test oracle only: it pins torch 2.11.0 and imports transformers in its __init__
	$(PY) -m pip install --quiet --no-deps open-mythos==0.5.0
	# tritonserver 2.51 and its Python backend, from the wheel (its Python API is not used)
	$(PY) -m pip install --quiet --no-deps nvidia-pytriton==0.7.0
	# the Python that Triton's backend stub runs model.py with: that stub is built against
	# NumPy 1.x and corrupts BYTES tensors under NumPy 2, so this environment pins numpy<2
	$(PYTHON) -m venv $(TRITON_VENV)
	echo 'numpy<2' > $(TRITON_VENV)/constraints.txt
	$(TRITON_VENV)/bin/pip install --quiet torch==2.13.0 -c $(TRITON_VENV)/constraints.txt
	$(TRITON_VENV)/bin/pip install --quiet -e '.[serve]' -c $(TRITON_VENV)/constraints.txt

ONNX ?= out/hops-onnx
PORT ?= 8000

# the main job: export the shipped checkpoint with the loop as an ONNX Loop (parity-gated),
# answer a 4-hop query through onnxruntime, then the accuracy table through onnxruntime,
# checked prediction by prediction against eager PyTorch, with exit none and exit propagate
demo:
	$(CLI) onnx $(CKPT) -o $(ONNX) --loop loop --force
	$(CLI) generate $(ONNX) --prompt "k4;q7;mk;rm;cq;wr;?w" --max-new-tokens 1
	$(CLI) eval-hops $(ONNX) --compare $(CKPT) --count 50 -o out/hops-eval
	# ACT early exit that keeps the answers: exit propagate, inside the Loop graph, against eager
	$(CLI) eval-hops $(ONNX) --exit propagate --compare $(CKPT) --hops 1,2,3,4,5 --loops 6 --count 50

# the same on a random-weight tiny checkpoint made on the spot
demo-random:
	$(CLI) init --preset tiny --seed 0 -o ckpt/tiny --force
	$(CLI) onnx ckpt/tiny -o out/tiny-onnx --loop loop --force
	$(CLI) generate out/tiny-onnx --prompt "The loop " --max-new-tokens 24
	$(CLI) parity ckpt/tiny out/tiny-onnx --tokens 16

# re-train the shipped checkpoint (seeded; about 15 minutes on 2 CPU cores)
demo-checkpoint:
	$(CLI) train-demo -o $(CKPT) --force
	$(CLI) eval-hops $(CKPT) -o benchmarks/results/hops

bench:
	$(PY) -m benchmarks.runtime_bench
	$(PY) -m benchmarks.fill_forward
	$(PY) -m benchmarks.export_bench
	$(PY) -m benchmarks.quant_bench

# 10,000 decode steps at batch 1 and 4 on the bench preset (about 10 minutes on 2 cores)
soak:
	$(PY) -m benchmarks.soak

# the OpenAI-compatible server on the demo export (make demo writes it); Ctrl-C stops it
serve:
	@test -d $(ONNX) || $(CLI) onnx $(CKPT) -o $(ONNX) --loop loop
	$(CLI) serve $(ONNX) --port $(PORT)

# the same export behind tritonserver (the nvidia-pytriton wheel's), HTTP on $(PORT)
triton:
	@test -d $(ONNX) || $(CLI) onnx $(CKPT) -o $(ONNX) --loop loop
	$(CLI) triton-repo $(ONNX) -o out/triton-repo --name hops --force
	$(CLI) triton-serve out/triton-repo --http-port $(PORT)

test:
	$(PY) -m pytest -q -n 2 --dist loadfile

test-fast:
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow"

clean:
	rm -rf $(VENV) $(TRITON_VENV) ckpt out .pytest_cache .hypothesis *.egg-info

gpu-check:
	$(PY) -m benchmarks.gpu_check
