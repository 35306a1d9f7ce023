# Two set-up commands (see README.md): `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 JSONARGPARSE_DEPRECATION_WARNINGS=off

.PHONY: demo test install clean

$(BIN)/.installed: setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(OFFLINE) $(BIN)/cvfp fit --config configs/phase1.yaml

test: $(BIN)/.installed
	$(OFFLINE) $(BIN)/python -m pytest -q -p no:cacheprovider -n auto --dist loadgroup tests

clean:
	rm -rf lightning_logs .pytest_cache
