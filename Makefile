# Two entry points do all set-up on a fresh machine: `make demo` and `make test`.
# Each creates the virtual environment (.venv) when it is missing or older than the pins.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cm3-installed
WORKDIR ?= runs/demo
PYTEST_ARGS ?=
# test files run on this many processes (pytest-xdist; one file stays on one process, so its fixtures are built once)
TEST_WORKERS ?= 2

.PHONY: install demo test bench clean

install: $(STAMP)

# torch first, pinned to the build that lies on this kind of machine's disk;
# then the project, its evaluation extra and its test tools with every version fixed by constraints.txt.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet pip==26.3
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -c constraints.txt -e '.[eval,test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cm3 demo --workdir $(WORKDIR)

test: $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
