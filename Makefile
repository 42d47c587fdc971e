# The whole set-up is `make demo` or `make test`: each creates .venv if missing and installs.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DATA ?= data/default
RUN ?= runs/demo
EXPORTS ?= exports/demo
EXPORT := $(VENV)/bin/soup-export
# the JavaScript runner's npm packages; onnxruntime-node's install script must not fetch GPU libraries
WEB := runtimes/web
WEB_STAMP := $(WEB)/node_modules/.installed-stamp
NO_NODE := make test: the JavaScript runner tests (runtimes/web) need Node 20+ and npm on PATH; install them, \
	or run: make test-python (the Python tests alone)

.PHONY: install web-install test test-python demo clean

$(STAMP): pyproject.toml runtimes/python/pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first and alone: it takes the CPU wheel on disk; an unpinned resolve pulls CUDA.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]" -e runtimes/python
	touch $(STAMP)

$(WEB_STAMP): $(WEB)/package.json $(WEB)/package-lock.json
	@command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 \
		&& node -e 'process.exit(parseInt(process.versions.node, 10) < 20 ? 1 : 0)' || { echo '$(NO_NODE)' >&2; exit 1; }
	cd $(WEB) && ONNXRUNTIME_NODE_INSTALL=skip PUPPETEER_SKIP_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error
	touch $@

install: $(STAMP)

web-install: $(WEB_STAMP)

# everything, the Node and browser tests of runtimes/web included (tests/test_web_runtime.py)
test: $(STAMP) $(WEB_STAMP)
	$(PY) -m pytest -q

test-python: $(STAMP)
	$(PY) -m pytest -q --ignore=tests/test_web_runtime.py

demo: $(STAMP)
	test -f $(DATA)/data.json || $(VENV)/bin/soup-train prepare --preset default --out $(DATA)
	$(VENV)/bin/soup-train fit --preset demo --data $(DATA) --out $(RUN)
	$(VENV)/bin/soup-train plot $(RUN)
	# three customers: explicit weights, estimated from a handful of texts, a budget that forces int4
	$(EXPORT) build $(RUN) --name acme --mix austen=0.6,bible=0.4 --out $(EXPORTS)/acme --force
	$(EXPORT) build $(RUN) --name globex --from-texts examples/customers/globex --out $(EXPORTS)/globex --force
	$(EXPORT) build $(RUN) --name initech --mix linux-docs=0.7,fortunes=0.3 --max-size 600KB --out $(EXPORTS)/initech --force
	$(EXPORT) compare $(EXPORTS)/acme $(EXPORTS)/globex $(EXPORTS)/initech --ckpt $(RUN) --data $(DATA)
	# and run one on the device runtime (onnxruntime + numpy + tokenizers only)
	$(VENV)/bin/soup-run generate $(EXPORTS)/acme --prompt "It is a truth universally acknowledged" --max-new-tokens 48

clean:
	rm -rf $(VENV) data runs exports $(WEB)/node_modules
