# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test bench zoo clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[all,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/onnxopt demo --out demo-report

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/suite.py

clean:
	rm -rf $(VENV) demo-report build *.egg-info

# The conformance zoo: every built-in recipe on every zoo model (resumable; hours on 2 cores).
zoo: $(STAMP)
	$(PY) benchmarks/zoo/run.py --results-md
