# The two commands of the README. Each creates .venv and installs what is missing.
VENV ?= .venv
BIN := $(VENV)/bin
N ?= 5
ARGS ?=

.PHONY: run test setup lint bench

setup:
	@bash scripts/setup.sh

run: setup  ## the main job: a 5-round TinyWorld campaign (builds the world first if needed)
	$(BIN)/iterative-rlhf round --n $(N) $(ARGS)

test: setup  ## the whole test suite (slow tests included), then ruff
	$(BIN)/python -m pytest -q tests
	$(BIN)/ruff check iterative_rlhf tests bench

lint: setup
	$(BIN)/ruff check iterative_rlhf tests bench
