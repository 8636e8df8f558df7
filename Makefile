# The README's commands. Each target creates .venv when it is missing and installs into it.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_OUT ?= outputs/demo
TOY ?= outputs/toy
# Test objects `make demo` personalizes (the first N of the toy's 12, sorted); every test object's photos stay in
# the evaluation as distractors. 0 = all 12 (about 25 minutes on a 2-core CPU).
DEMO_OBJECTS ?= 2
SOURCES_OUT ?= outputs/demo_sources
SOURCES_ARGS ?=
export RAY_USAGE_STATS_ENABLED ?= 0
export HF_HUB_OFFLINE ?= 1

.PHONY: install demo demo-sources test test-fast test-paper lint bench lock clean

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch and torchvision are pinned in the lock; pip takes them from local files on these machines.
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

DEMO_RUN = $(BIN)/personalize run --config configs/demo.yaml data.root=$(TOY) data.max_instances=$(DEMO_OBJECTS)

# The toy benchmark through every stage with the real ImageNet MobileNetV2, then the generation path
# (DreamBooth, sampling, DreamSim filter) on the zoo's tiny random models.
# Written once: a rewrite would give its files new mtimes, and ingest (which hashes them) and every later stage
# would be redone. `rm -r $(TOY)` for a fresh one.
$(TOY)/pods_image_annos.json: | $(STAMP)
	$(BIN)/personalize make-toy --out $(TOY)

demo: $(STAMP) $(TOY)/pods_image_annos.json
	$(DEMO_RUN) output_dir=$(DEMO_OUT)
	$(BIN)/personalize zoo --out models/zoo
	$(BIN)/personalize run --config configs/demo_generation.yaml data.root=$(TOY) output_dir=$(DEMO_OUT)_generation

# The paper's positive-source table in small: real photos only / Cut-and-Paste only / both (the demo's own run,
# reused when `make demo` made it), side by side by `personalize compare`. The two new runs read the demo's ingest
# and cutpaste outputs through links. SOURCES_ARGS: extra key=value overrides for all three runs.
demo-sources: $(STAMP) $(TOY)/pods_image_annos.json
	$(DEMO_RUN) output_dir=$(DEMO_OUT) $(SOURCES_ARGS)
	mkdir -p $(SOURCES_OUT)
	ln -sfn $(abspath $(DEMO_OUT)) $(SOURCES_OUT)/combined
	for source in real cutpaste; do \
	  mkdir -p $(SOURCES_OUT)/$$source && \
	  ln -sfn $(abspath $(DEMO_OUT))/ingest $(SOURCES_OUT)/$$source/ingest && \
	  ln -sfn $(abspath $(DEMO_OUT))/cutpaste $(SOURCES_OUT)/$$source/cutpaste && \
	  $(DEMO_RUN) output_dir=$(SOURCES_OUT)/$$source "train.positive_sources=[$$source]" $(SOURCES_ARGS) || exit 1; \
	done
	$(BIN)/personalize compare $(SOURCES_OUT)/real $(SOURCES_OUT)/cutpaste $(SOURCES_OUT)/combined \
	  --out $(SOURCES_OUT)/comparison.md

lint: $(STAMP)
	$(BIN)/ruff check personalization pipelines tests benchmarks
	$(BIN)/ruff format --check personalization pipelines tests benchmarks

# The suite's own process gets the malloc settings a `personalize` Ray gives its processes (MALLOC_TUNABLES in
# pipelines/local_ray.py; tests/unit/test_cluster_files.py checks the two agree): in-process training ~1.6x faster.
TEST_ENV = RAY_AUTH_MODE=disabled GLIBC_TUNABLES=$${GLIBC_TUNABLES-$(MALLOC_TUNABLES)}
MALLOC_TUNABLES = glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=1073741824:glibc.malloc.arena_max=1

# Two pytest-xdist workers, one test file at a time each (a file's module fixtures stay on one worker): on 2 cores
# the Ray start-ups and waits of one worker's tests leave CPU idle that the other's fill. Files go out in collection
# order (e2e, integration, reliability, then the short unit files that even out the end), not xdist's default of
# most tests first, which left the few long fault tests for last. Each worker's Rays keep to a folder of their own
# (tests/conftest.py). TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
test: $(STAMP) lint
	$(TEST_ENV) $(BIN)/python -m pytest -q -ra --durations=15 -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder \
	  -m "not paper" tests

# Every config of configs/paper/ end to end on the tiny zoo (`make test` runs the base one only): ~8 minutes on a
# quiet 2-core CPU. One process: the configs share one output folder and reuse its upstream stages (two xdist
# workers took as long, 468 s each way).
test-paper: $(STAMP)
	$(TEST_ENV) $(BIN)/python -m pytest -q -ra tests/e2e/test_paper_configs_run.py

# Day-to-day: the unit tests without the slow ones (no Ray; under 2 minutes). `make test` runs everything.
test-fast: $(STAMP)
	$(TEST_ENV) $(BIN)/python -m pytest -q -x -m "not slow" tests/unit

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
