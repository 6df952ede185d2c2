# Two set-up commands that work on a fresh machine:  make test  and  make demo.
# Both create .venv when it is missing and install the project into it (editable, with extras);
# a second run finds the stamp file and starts in seconds.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.cdds-installed

.PHONY: test demo bench clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch==2.14.1 torchvision==0.29.1: on the project's machines pip takes both from local disk
# (a pip constraint there caps torch at 2.14.1); PyPI's torchvision does not import beside the
# CPU-only torch 2.13 file that also lies there, so the pair is pinned together here.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev,train]'
	touch $(STAMP)

# lint (ruff: pyflakes, pycodestyle, isort, bugbear, pyupgrade) and format check first: seconds.
# Two pytest-xdist workers: most of the suite's time is single-threaded Python (the Triton
# interpreter's loops) and the project's CI machine has two cores: it roughly halves the run
test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q -n 2

demo: $(STAMP)
	$(VENV)/bin/cdds-fast demo

bench: $(STAMP)
	$(PY) -m pytest benchmarks -q --benchmark-columns=median,iqr,rounds --benchmark-sort=name

clean-venv:
	rm -rf $(VENV)
