# Two commands do all the set-up on a fresh machine:
#   make run    the gateway on the embedded default (simulated GPU workers + provider)
#   make test   lint, types and the whole test suite
# Both install from requirements.lock (exact versions, sha256 hashes); `make lock` refreshes it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# pip-tools writes the lock; pinned so a refresh is reproducible too.
PIP_TOOLS := pip-tools==7.7.0
LOCKENV := .venv-lock

.PHONY: run test lint install lock lock-upgrade clean mutation

# Every package (runtime, test, build back-end) comes from the lock with its hash checked;
# neogate itself is then installed editable without touching the index again.
$(STAMP): requirements.lock pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --require-hashes --no-deps -r requirements.lock
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/pip check
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/neogate serve

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/pytest

# Mutation testing over the money and safety paths (mutmut; ~40 min on 2 busy cores, not in CI):
# scores per module, survivors listed. `make mutation MODULES="admission relay"` runs a few.
mutation: $(STAMP)
	$(BIN)/python -m tests.mutation --survivors $(MODULES)

# After editing dependencies in pyproject.toml: resolve again, keeping every existing pin.
lock: LOCK_FLAGS :=
# Deliberate refresh: the newest versions pyproject.toml allows.
lock-upgrade: LOCK_FLAGS := --upgrade
lock lock-upgrade:
	$(PY) -m venv $(LOCKENV)
	$(LOCKENV)/bin/pip install -q '$(PIP_TOOLS)'
	$(LOCKENV)/bin/pip-compile --quiet $(LOCK_FLAGS) --generate-hashes --allow-unsafe \
	  --strip-extras --extra test --all-build-deps --no-emit-index-url --no-emit-find-links \
	  --output-file requirements.lock pyproject.toml
	@echo "requirements.lock written: review 'git diff requirements.lock', run 'make test', commit"

clean:
	rm -rf $(VENV) $(LOCKENV) neogate-data .mypy_cache .ruff_cache .pytest_cache .mutation
