# Two entry points do all set-up on a fresh machine: `make demo` (the main job) and
# `make test`. Both create .venv on first use and reinstall only when pyproject.toml or
# constraints.txt change.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha256sum | cut -c1-12)
export WANDB_MODE ?= disabled
export HF_HUB_OFFLINE ?= 1

.PHONY: demo selector-demo test test-slow bench bench-quick kernels gpu-check venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] >= (3, 11) else "cslbench needs Python >= 3.11; set PYTHON=python3.11")'
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -c constraints.txt -e '.[test]'
	@rm -f $(VENV)/.installed-* && touch $@

SWEEP_STORE ?= runs/sweeps
export RAY_USAGE_STATS_ENABLED ?= 0

# The main job: the default benchmark (sweeps/default.yaml) on Ray Tune on this machine's
# CPUs, its leaderboard, then the figures, every selector on the warm start's predictions,
# and every selector scored on the prediction bank a fixed trial recorded over training.
# Rerunning continues it (finished trials kept).
demo: venv
	$(VENV)/bin/cslbench sweep sweeps/default.yaml --storage $(SWEEP_STORE) --resume
	$(VENV)/bin/cslbench analyze $(SWEEP_STORE)/default/trials --checkpoint $(SWEEP_STORE)/default/warmup/warmup-seed=0
	$(VENV)/bin/cslbench select-eval $(SWEEP_STORE)/default/warmup/warmup-seed=0 --images 50
	$(VENV)/bin/cslbench bank score $(SWEEP_STORE)/default/trials/fixed-seed=0/bank --bootstrap 500

# Selector quality on a synthetic probability field and selector speed, in a minute.
selector-demo: venv
	$(VENV)/bin/cslbench selector-demo

test: venv
	$(VENV)/bin/python -m pytest

# Fault injection that needs several sweeps end to end (a few minutes on 2 cores).
test-slow: venv
	$(VENV)/bin/python -m pytest -m slow

# Speed as ratios measured in one run: every selector against a bare threshold, and the
# harness training step against the bare UniMatch step (claim: within 10%).
bench: venv
	$(VENV)/bin/python -m pytest benchmarks --benchmark-group-by=group

# The same at the small shape with fewer rounds (CI runs it).
bench-quick: venv
	CSLBENCH_QUICK=1 $(VENV)/bin/python -m pytest benchmarks --benchmark-group-by=group

kernels: venv
	$(VENV)/bin/cslbench kernels --threads 2 --json runs/kernels.json

# On a CUDA machine: the CUDA tests, the kernel table at the recipe's shapes and the
# training-step throughput, in about 8 minutes (runs/gpu-check.json and .md). Without CUDA
# it runs the CPU-side parts and says so.
gpu-check: venv
	$(VENV)/bin/python -m bench.tools.gpu_check --out runs/gpu-check.json

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks runs
