# Two entry points do all set-up on a fresh machine: `make demo` (the main job) and
# `make test`. Both create .venv on first use and reinstall only when pyproject.toml or
# constraints.txt change.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha256sum | cut -c1-12)
export WANDB_MODE ?= disabled
export HF_HUB_OFFLINE ?= 1

.PHONY: demo test bench kernels venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] >= (3, 11) else "cslbench needs Python >= 3.11; set PYTHON=python3.11")'
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -c constraints.txt -e '.[test]'
	@rm -f $(VENV)/.installed-* && touch $@

demo: venv
	$(VENV)/bin/cslbench demo

test: venv
	$(VENV)/bin/python -m pytest

bench: venv
	$(VENV)/bin/python -m pytest benchmarks --benchmark-group-by=group

kernels: venv
	$(VENV)/bin/cslbench kernels --threads 2 --json runs/kernels.json

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks runs
