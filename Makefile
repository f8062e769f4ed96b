# Two commands for a fresh clone (README, "Quick start"):
#   make demo   set everything up, then run the main job (MNIST -> scikit-learn digits)
#   make test   set everything up, then run the test suite, as CI does (.ci/run)
# Both create the virtual environment $(VENV) and build lepton_fast into it on first use, with
# the README's by-hand install; `make test` adds the [trl] extra, which only the TRL
# comparison tests need. `make build` rebuilds after a change to a C++ or CUDA source.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.14.1
EXTRAS ?= dev,examples
BIN := $(VENV)/bin

.PHONY: demo test build

demo: $(VENV)/.built
	$(BIN)/lepton-fast demo

test: $(VENV)/.built $(VENV)/.trl
	$(BIN)/pytest -q

# pip shows a build as a spinner and hides what setup.py prints, so the plan (what is
# compiled, why, and about how long it takes) is printed before the long step.
define build_lepton_fast
	@$(BIN)/python setup.py -q describe
	$(BIN)/pip install --no-build-isolation -e ".[$(EXTRAS)]"
	touch $(VENV)/.built
endef

build:
	$(build_lepton_fast)

# The extension compiles against the installed torch, so it is built without build
# isolation, and pip installs none of the build's own tools: the first line does.
$(VENV)/.built:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(TORCH) ninja "setuptools>=77"
	$(build_lepton_fast)

# lepton_fast is installed already, so pip adds only what its [trl] extra requires.
$(VENV)/.trl: $(VENV)/.built
	$(BIN)/pip install "lepton_fast[trl]"
	touch $@
