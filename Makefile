# The whole set-up is `make demo` or `make test`: each creates .venv if missing and installs.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DATA ?= data/default
RUN ?= runs/demo

.PHONY: install test demo clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first and alone: it takes the CPU wheel on disk; an unpinned resolve pulls CUDA.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	test -f $(DATA)/data.json || $(VENV)/bin/soup-train prepare --preset default --out $(DATA)
	$(VENV)/bin/soup-train fit --preset demo --data $(DATA) --out $(RUN)
	$(VENV)/bin/soup-train plot $(RUN)

clean:
	rm -rf $(VENV) data runs
