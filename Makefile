# Every target builds .venv on first use and installs exact pins from constraints.txt.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[parity,dev,examples]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m parity
	$(BIN)/python examples/train_lm.py --attn minimax_sparse --impl reference --steps 300 --eval-every 100 --show

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n 2 --dist worksteal

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV)
