# The two commands a newcomer needs: `make demo` and `make test`. Each creates the virtual
# environment and installs the pinned versions first (only when setup.cfg/constraints change).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint install clean mutation

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

# Mutation check (README, "Tests"): mutmut mutates after_ray/al/, after_ray/metrics.py and
# after_ray/store/run_state.py and runs their fast unit tests against every mutant, two children
# at a time; then prints killed / survived / survival per file. Not part of `make test`.
# Single-threaded BLAS/OpenMP: FAISS's OpenMP pool does not survive mutmut's fork per mutant.
# HYPOTHESIS_PROFILE=ci: derandomized examples, so no mutant is killed or spared by luck.
mutation: $(STAMP)
	rm -rf mutants
	OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 HYPOTHESIS_PROFILE=ci \
		$(BIN)/mutmut run --max-children 2
	$(BIN)/python tests/mutation/summary.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache mutants
