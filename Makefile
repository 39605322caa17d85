# Two entry points: `make demo` (install + run the main job on its built-in default) and
# `make test` (install + run the test suite). Both create ./.venv on first use.
PYTHON ?= python3
VENV ?= .venv
# torch is pinned (CPU wheel here); a GPU user overrides it: make test TORCH_PIN="torch==2.11.0"
TORCH_PIN ?= $(shell grep -E '^torch[=<>~ ]' constraints.txt)
DEMO_OUT ?= demo_out
PYTEST_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	printf '%s\n' "$(TORCH_PIN)" > $(VENV)/constraints.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check -c $(VENV)/constraints.txt "$(TORCH_PIN)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -c $(VENV)/constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/fullslide demo --out $(DEMO_OUT)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
