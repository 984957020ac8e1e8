# The README's commands: `make run` starts the platform; `make test` installs what the tests need and runs them.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
EXTRAS := platform,test,s3,kubernetes,postgres

.PHONY: install run test lint demo bench bench-peers image clean

$(BIN)/python:
	@command -v uv >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv
	uv venv --quiet --python $(PYTHON) $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	VIRTUAL_ENV=$(VENV) uv pip install --quiet -e '.[$(EXTRAS)]'
	@touch $@

install: $(VENV)/.installed  ## the venv with opbox and the test tools

run: install  ## start the platform (gateway, local backend, SQLite, local object store) on http://127.0.0.1:8000
	$(BIN)/opbox up

lint: install  ## import-linter contracts (layers; the platform never unpickles)
	$(BIN)/lint-imports --no-cache

test: install  ## everything: podman for the image tests, chromium for the dashboard's, import contracts, the whole suite, then its end-to-end modules again on PostgreSQL
	bash scripts/setup-podman.sh
	bash scripts/setup-browser.sh
	bash scripts/setup-postgres.sh
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest
	OPBOX_TEST_DATABASE=postgres $(BIN)/python -m pytest -m postgres_pass

image: install  ## the gateway's image (manifests/deployment.yaml runs it), built with podman
	$(BIN)/python -m opbox.builder.gateway_image

demo: install  ## the quickstart against a fresh platform, started and stopped here
	$(BIN)/python scripts/demo.py

PEERS := .bench-peers
BENCH_TOOLS := numpy pandas py-spy

$(VENV)/.bench-tools: $(VENV)/.installed  # what the bench measures with (payloads, profiles); never the product's dependencies
	VIRTUAL_ENV=$(VENV) uv pip install --quiet $(BENCH_TOOLS)
	@touch $@

$(PEERS)/.installed:  # the peers (Ray, Dask) in a virtualenv of their own, never in opbox's
	@command -v uv >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv
	uv venv --quiet --python $(PYTHON) $(PEERS)
	VIRTUAL_ENV=$(PEERS) uv pip install --quiet "ray==2.*" "dask[distributed]"
	@touch $@

bench-peers: $(PEERS)/.installed  ## the peers' virtualenv (Ray, Dask) that `make bench` measures beside opbox

bench: $(VENV)/.bench-tools  ## opbox's figures and their ratios to the peers measured in the same run, as JSON (bench/); BENCH_ARGS=--quick|--million
	$(BIN)/python bench/bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(PEERS) build dist *.egg-info .pytest_cache
