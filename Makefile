# Set-up and everyday commands. `make demo` and `make test` install into .venv/ first.
# GPU users: `make install TORCH=torch` (or a pinned CUDA build) instead of the CPU wheel.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint format bench mutants clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: install
	$(BIN)/python scripts/train.py scripts/configs/demo_digits.json

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check hf_aace scripts tests bench
	$(BIN)/ruff format --check hf_aace scripts tests bench

format: install
	$(BIN)/ruff format hf_aace scripts tests bench
	$(BIN)/ruff check --fix hf_aace scripts tests bench

bench: install
	$(BIN)/python bench/step_cost.py
	$(BIN)/python bench/augmentation_throughput.py

# Mutation testing of the core modules (tests/README.md): not part of `make test` or CI. MUTANTS narrows the run to
# mutant names, e.g. make mutants MUTANTS='hf_aace.losses.* hf_aace.perturbation.*'; results persist in mutants/.
MUTANTS ?=
mutants: install
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nice -n 19 $(BIN)/mutmut run --max-children 2 $(MUTANTS)
	$(BIN)/mutmut results

clean:
	rm -rf $(VENV) outputs build *.egg-info mutants
