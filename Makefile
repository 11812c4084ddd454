# Two virtual environments, each built on first use from exact pins:
#   .venv         Python 3.12 + the current JAX (constraints.txt): the library, kernel, example and
#                 behaviour tests, and the training demo.
#   .venv-parity  Python 3.11 + torch 2.13.0 (CPU) + attnhut 0.5.0 + jax 0.10.2, the oldest JAX we
#                 support (constraints-parity.txt): the torch parity tests, the parity report, and a
#                 forward + grad smoke of every mechanism on the floor.
# The CPU torch wheel on these machines is for Python 3.11 only, and jax >= 0.11 needs Python 3.12.

find_python = $(firstword $(foreach p,$(1) $(wildcard $(HOME)/.pyenv/versions/$(2)*/bin/$(1)),\
  $(shell $(p) -c 'import sys; print("$(p)" if sys.version_info[:2] == ($(subst .,$(comma),$(2))) else "")' 2>/dev/null)))
comma := ,
PY312 ?= $(call find_python,python3.12,3.12)
PY311 ?= $(call find_python,python3.11,3.11)

VENV := .venv
PVENV := .venv-parity
STAMP := $(VENV)/.installed
PSTAMP := $(PVENV)/.installed
XDIST := -n 2 --dist worksteal

.PHONY: demo test lint clean

$(STAMP): pyproject.toml constraints.txt
	@test -n "$(PY312)" || { echo "make: no Python 3.12 found (set PY312=/path/to/python3.12)"; exit 1; }
	test -x $(VENV)/bin/python || $(PY312) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --no-compile -c constraints.txt -e '.[dev,examples]'
	touch $@

$(PSTAMP): pyproject.toml constraints-parity.txt
	@test -n "$(PY311)" || { echo "make: no Python 3.11 found (set PY311=/path/to/python3.11)"; exit 1; }
	test -x $(PVENV)/bin/python || $(PY311) -m venv $(PVENV)
	$(PVENV)/bin/python -m pip install -q --no-compile -c constraints-parity.txt -e '.[parity,dev,examples]'
	touch $@

demo: $(STAMP) $(PSTAMP)
	$(PVENV)/bin/python -m parity
	$(VENV)/bin/python examples/train_lm.py --attn minimax_sparse --impl reference --steps 300 --eval-every 100 --show

test: $(STAMP) $(PSTAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest $(XDIST) tests --ignore=tests/torch_parity --ignore=tests/test_floor_smoke.py -m "not selections"
	$(PVENV)/bin/python -m pytest $(XDIST) tests/torch_parity tests/test_floor_smoke.py tests/test_kernel_lowering.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) $(PVENV)
