# Two commands do all set-up on a fresh machine: `make train` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: train test test-slow mutate clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/jaxchat train --preset tiny --run-dir runs/tiny --force

test: $(STAMP)
	@$(BIN)/python -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests (exit 5): the suite is missing or every test was deselected"; fi; \
	exit $$rc

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# Mutation testing, on demand only (never in CI; see docs/mutation.md). Hours for every mutant on 2 cores, so it
# samples: `make mutate MUTATE_ARGS="--sample 3 --seed 1 --jobs 2"`; `--modules optim/muon.py` narrows it.
MUTATE_ARGS ?= --sample 10 --seed 0 --jobs 2
mutate: $(STAMP)
	$(BIN)/python scripts/mutate.py $(MUTATE_ARGS)

clean:
	rm -rf runs .pytest_cache
