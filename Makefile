# The two commands a newcomer needs: `make demo` and `make test`. Each creates the virtual
# environment and installs the pinned versions first (only when setup.cfg/constraints change).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint install clean

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/after-ray demo $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check after_ray jobs tests

test: $(STAMP)
	$(BIN)/ruff check after_ray jobs tests
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
