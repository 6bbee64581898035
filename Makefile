# Course tasks. Every target that needs Python first makes sure .venv is built from requirements.txt.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# pytest-xdist spreads notebooks over the cores; loadscope keeps a notebook's cells on one worker.
PYTEST_WORKERS ?= 2

.PHONY: setup test test-portable lab serve exercises notebooks protos clean-models figures perf-analyzer

setup: $(STAMP)

# Rebuilt when requirements.txt or pyproject.toml is newer than the last install.
$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

NBVAL := --nbval --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg
# Models for the second pass, rebuilt from nothing each time, as on a student's fresh machine.
PORTABLE_MODELS := build/portable-models

test: setup
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadscope $(NBVAL) tests notebooks solutions
	$(MAKE) --no-print-directory test-portable

# The notebooks again with PyTorch on its baseline kernels and every model trained and exported anew with them:
# an output that holds only on the CPU that ran the first pass fails here instead of on a student's laptop.
test-portable: setup
	rm -rf $(PORTABLE_MODELS)
	ATEN_CPU_CAPABILITY=default ORTSERVE_MODELS=$(abspath $(PORTABLE_MODELS)) \
		$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadscope $(NBVAL) notebooks solutions

# Jupyter refuses to run as root unless told; containers and CI machines often are root.
ALLOW_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root)
LAB_ARGS ?=
lab: setup
	$(BIN)/jupyter lab --notebook-dir=. $(ALLOW_ROOT) $(LAB_ARGS)

# The inference server on the default repository (flags: ./run_ort_server.sh --help; ARGS="--grpc_port 0" ...).
serve: setup
	./run_ort_server.sh $(ARGS)

# Regenerate src/ortserve/_proto/ from protos/ (tests/server checks the committed files match).
protos: setup
	$(BIN)/python -m ortserve.server.codegen

exercises: setup
	$(BIN)/python -m ortserve exercises

# Triton's load tool, perf_analyzer, in a venv of its own (the course's pins stay as they are): tritonclient
# 2.41.0's manylinux wheel ships the binary, which links libcudart.so.12 even on a CPU (nvidia-cuda-runtime-cu12)
# and Debian's libb64 (installs nothing with apt). build/perf-analyzer/perf_analyzer runs it with both found.
PERF_DIR := build/perf-analyzer
perf-analyzer:
	@ldconfig -p | grep -q libb64 || { echo "perf_analyzer needs libb64: apt-get install -y libb64-0d" >&2; exit 2; }
	test -x $(PERF_DIR)/venv/bin/python || $(PYTHON) -m venv $(PERF_DIR)/venv
	$(PERF_DIR)/venv/bin/python -m pip install --quiet tritonclient==2.41.0 nvidia-cuda-runtime-cu12
	@cudart=$$($(PERF_DIR)/venv/bin/python -c "import os, nvidia.cuda_runtime as c; \
		print(os.path.relpath(os.path.join(c.__path__[0], 'lib'), '$(PERF_DIR)'))") && \
	printf '%s\n' '#!/bin/sh' '# perf_analyzer of tritonclient 2.41.0 (make perf-analyzer), with the CUDA runtime it links.' \
		'here=$$(cd "$$(dirname "$$0")" && pwd)' \
		"export LD_LIBRARY_PATH=\"\$$here/$$cudart\$${LD_LIBRARY_PATH:+:\$$LD_LIBRARY_PATH}\"" \
		'exec "$$here/venv/bin/perf_analyzer" "$$@"' > $(PERF_DIR)/perf_analyzer
	chmod +x $(PERF_DIR)/perf_analyzer
	$(PERF_DIR)/perf_analyzer --version  # the binary loads: its libraries are found
	@echo "ready: $(PERF_DIR)/perf_analyzer -m digits_cnn -u 127.0.0.1:50051 -i grpc --concurrency-range 1:8:7"

clean-models:
	rm -rf models

# Re-execute lessons and solutions in place (outputs are committed), then regenerate the exercises.
NOTEBOOKS ?= $(wildcard notebooks/*.ipynb solutions/*.ipynb)
notebooks: setup
	for nb in $(NOTEBOOKS); do \
		$(BIN)/jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.timeout=600 "$$nb" || exit 1; \
	done
	$(BIN)/python -m ortserve exercises

# figures/: first the diagrams (figures/02_export_path.png, 08_request_path.png, 13_deployment.png), drawn by
# matplotlib alone (`$(BIN)/python -m ortserve.diagrams`); then the static pictures of model graphs for readers
# without a kernel (figures/04_*.png): Netron's own page, screenshotted by a headless Chromium. Installs nothing;
# that second step needs Chromium (Debian/Ubuntu: apt-get install chromium, or set CHROMIUM=/path/to/chrome) and a
# font with the brackets Netron draws around shapes (apt-get install fonts-wqy-microhei).
# `$(BIN)/python -m ortserve.figures --list` names the Netron figures.
figures: setup
	$(BIN)/python -m ortserve.diagrams
	@command -v "$${CHROMIUM:-chromium}" >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
		|| command -v google-chrome >/dev/null 2>&1 \
		|| { echo "the Netron figures need Chromium: apt-get update && apt-get install -y chromium fonts-wqy-microhei" >&2; \
		     echo "(or set CHROMIUM=/path/to/chrome); the diagrams are drawn already" >&2; exit 2; }
	$(BIN)/python -m ortserve.figures
