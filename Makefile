# The README's commands. Each target creates .venv when it is missing and installs into it.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_OUT ?= outputs/demo
TOY ?= outputs/toy
export RAY_USAGE_STATS_ENABLED ?= 0
export HF_HUB_OFFLINE ?= 1

.PHONY: install demo test test-fast test-paper lint bench lock clean

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch and torchvision are pinned in the lock; pip takes them from local files on these machines.
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

# The toy benchmark through every stage with the real ImageNet MobileNetV2, then the generation path
# (DreamBooth, sampling, DreamSim filter) on the zoo's tiny random models.
demo: $(STAMP)
	$(BIN)/personalize make-toy --out $(TOY)
	$(BIN)/personalize run --config configs/demo.yaml data.root=$(TOY) output_dir=$(DEMO_OUT)
	$(BIN)/personalize zoo --out models/zoo
	$(BIN)/personalize run --config configs/demo_generation.yaml data.root=$(TOY) output_dir=$(DEMO_OUT)_generation

lint: $(STAMP)
	$(BIN)/ruff check personalization pipelines tests benchmarks
	$(BIN)/ruff format --check personalization pipelines tests benchmarks

test: $(STAMP) lint
	RAY_AUTH_MODE=disabled $(BIN)/python -m pytest -q -ra --durations=15 -m "not paper" tests

# Every config of configs/paper/ end to end on the tiny zoo (`make test` runs the base one only): ~20 minutes.
test-paper: $(STAMP)
	RAY_AUTH_MODE=disabled $(BIN)/python -m pytest -q -ra tests/e2e/test_paper_configs_run.py

# Day-to-day: the unit tests without the slow ones (no Ray; under 2 minutes). `make test` runs everything.
test-fast: $(STAMP)
	RAY_AUTH_MODE=disabled $(BIN)/python -m pytest -q -x -m "not slow" tests/unit

bench: $(STAMP)
	$(BIN)/python -m benchmarks

# Re-resolve the full pinned closure from the top-level pins in requirements.txt.
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install --quiet -r requirements.txt
	.venv-lock/bin/pip freeze --exclude-editable > requirements.lock
	rm -rf .venv-lock

clean:
	rm -rf outputs .pytest_cache .ruff_cache
