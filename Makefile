# Two commands for a fresh clone (README, "Quick start"):
#   make demo   set everything up, then run the main job (MNIST -> scikit-learn digits)
#   make test   set everything up, then run the test suite, as CI does (.ci/run)
# Both create the virtual environment $(VENV) and build lepton_fast into it on first use;
# `make build` rebuilds after a change to a C++ or CUDA source.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.14.1
EXTRAS ?= dev,examples,trl
BIN := $(VENV)/bin

.PHONY: demo test build

demo: $(VENV)/.built
	$(BIN)/lepton-fast demo

test: $(VENV)/.built
	$(BIN)/pytest -q

build:
	$(BIN)/pip install --no-build-isolation -e ".[$(EXTRAS)]"
	touch $(VENV)/.built

# The extension compiles against the installed torch, so it is built without build
# isolation, and pip installs none of the build's own tools: the first line does.
$(VENV)/.built:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(TORCH) ninja "setuptools>=77"
	$(BIN)/pip install --no-build-isolation -e ".[$(EXTRAS)]"
	touch $@
