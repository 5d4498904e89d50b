# Set-up and everyday commands. `make demo` and `make test` install into .venv/ first.
# GPU users: `make install TORCH=torch` (or a pinned CUDA build) instead of the CPU wheel.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-oldest lint format bench mutants clean

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
	$(BIN)/python -m pytest -q -n 2

# The lowest versions setup.cfg admits, in a second virtualenv, on the tests of the step's join to the Trainer.
OLDEST_VENV ?= .venv-oldest
OLDEST ?= transformers==5.10.1 accelerate==1.3.0 datasets==4.0.0 huggingface-hub==1.27.0
OLDEST_STAMP := $(OLDEST_VENV)/.installed
OLDEST_TESTS := tests/test_trainer.py tests/test_tasks.py tests/test_sharpness_aware.py tests/test_trainer_internals.py \
	tests/test_step_ops.py tests/test_divergence.py tests/test_checkpoints.py tests/test_image_batches.py \
	tests/test_capture.py

$(OLDEST_STAMP): setup.cfg pyproject.toml Makefile
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(OLDEST_VENV)/bin/python -m pip install --quiet "$(TORCH)"
	$(OLDEST_VENV)/bin/python -m pip install --quiet -e . $(OLDEST) pytest pytest-xdist peft olah
	touch $(OLDEST_STAMP)

test-oldest: $(OLDEST_STAMP)
	$(OLDEST_VENV)/bin/python -m pip list 2>/dev/null | grep -iE "^(torch|transformers|accelerate|datasets|huggingface.hub) "
	$(OLDEST_VENV)/bin/python -m pytest -q -n 2 -p no:cacheprovider $(OLDEST_TESTS)

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
	rm -rf $(VENV) $(OLDEST_VENV) outputs build *.egg-info mutants
