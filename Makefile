# sdserve — `make serve` and `make test` work on a fresh clone: they create .venv and install first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

# Which torch build to install (any recent torch works; pyproject.toml accepts them all).
# Default: the newest CUDA build when an NVIDIA driver is present, else the 190 MB CPU build 2.13.0.
# Override, e.g.:  make serve TORCH='torch==2.5.1'
CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo yes)
TORCH ?= $(if $(CUDA),torch,torch==2.13.0)

# spandrel reads ESRGAN-family upscalers (models/ESRGAN). It requires torchvision, and PyPI's torchvision wheels
# are CUDA builds that cannot import beside the CPU torch: with CUDA, torchvision comes with it (a build matching
# the newest torch: the `upscalers` extra); on CPU, spandrel goes in without it (src/sdserve/engine/upscale.py says
# how it imports).
UPSCALERS ?= $(if $(CUDA),-e '.[upscalers]',--no-deps spandrel==0.4.2 einops)

# Extra flags for `make serve`, e.g.:  make serve ARGS='--model models/my.safetensors --port 8000'
ARGS ?=

# Extra flags for `make bench`, e.g.:  make bench BENCH_ARGS='throughput --size 512 --model models/sd15'
BENCH_ARGS ?=

.PHONY: install tools serve test bench bench-scaleout bench-abuse bench-demo bench-loras demo-model clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m pip install --quiet $(UPSCALERS)
	touch $@

serve: install
	$(BIN)/sdserve serve $(ARGS)

# checkov (scans deploy/ in the tests) pins boto3 and others below sdserve's: it gets its own environment.
tools: $(VENV)/tools/.installed

$(VENV)/tools/.installed:
	test -x $(VENV)/tools/bin/python || $(PYTHON) -m venv $(VENV)/tools
	$(VENV)/tools/bin/python -m pip install --quiet 'checkov>=3.2,<4'
	touch $@

test: install tools
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	$(BIN)/python bench/run.py $(BENCH_ARGS)

# Redis scale-out: 2 workers vs 1, control plane on Redis vs embedded, recovery after kill -9 (needs redis-server).
bench-scaleout: install
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	$(BIN)/python bench/scaleout.py $(BENCH_ARGS)

# Load (200 clients, 60 s, rate limits on), soak (10,000 jobs, short retention) and faults (kill -9 of the API,
# a worker and Redis; S3 gone 10 s; a full disk): bench/results/abuse-*.json. The faults part mounts a tmpfs
# (root). About 15 minutes on 2 cores, e.g.:  make bench-abuse BENCH_ARGS='faults'
bench-abuse: install
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	$(BIN)/python bench/abuse.py $(BENCH_ARGS)

# What the demo model draws (docs/demo-grid.png), how often it follows the prompt, and how fast it is.
bench-demo: install
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	$(BIN)/python bench/demo_model.py $(BENCH_ARGS)

# What a LoRA costs: first load, switching, fuse/unfuse, and denoising with one active (bench/results/loras.json).
bench-loras: install
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	$(BIN)/python bench/loras.py

# Retrain the embedded demo model into src/sdserve/models/demo from its seed (under an hour on 2 CPU cores),
# e.g.:  make demo-model DEMO_ARGS='--seed 1 --out /tmp/demo'
DEMO_ARGS ?=
demo-model: install
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	$(BIN)/python -m sdserve.demo.train $(DEMO_ARGS)

clean:
	rm -rf $(VENV) data .pytest_cache
