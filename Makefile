# Set-up and checks. `make demo` and `make test` work on a fresh clone: they
# create .venv, install what they need and fetch data and broker jars into
# ${AGOGOSML_CACHE_DIR:-~/.cache/agogosml}.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SAMPLE_STAMP := $(VENV)/.installed-sample

.PHONY: demo test test-containers lint broker bench bench-quick bench-hops bench-stages clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.version_info >= (3, 11) or sys.exit("agogosml needs Python 3.11 or newer, and $(PYTHON) is " + sys.version.split()[0] + "; name another interpreter, as in: make demo PYTHON=python3.12")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The demo needs the agogosml command and the sample app's packages; the
# checks need the dev tools.
$(SAMPLE_STAMP): pyproject.toml setup.py | $(BIN)/python
	@echo "Installing agogosml, its command and the sample app's packages into $(VENV) (about a minute the first time)"
	$(BIN)/python -m pip install --quiet -e '.[cli,sample]'
	touch $(SAMPLE_STAMP)

$(STAMP): pyproject.toml setup.py | $(BIN)/python
	@echo "Installing agogosml and its development tools into $(VENV) (a few minutes the first time)"
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP) $(SAMPLE_STAMP)

demo: $(SAMPLE_STAMP)
	$(BIN)/python -m sample_app.data
	$(BIN)/python -m sample_app.train --if-missing
	$(BIN)/agogosml run --summary-json .agogosml/demo-summary.json

test: $(STAMP)
	$(BIN)/python deployment/kafka/broker.py fetch
	$(BIN)/python deployment/azurite/azurite.py fetch
	$(BIN)/python deployment/helm/helm.py fetch
	$(BIN)/ruff check agogosml agogosml_cli sample_app tests deployment benchmarks
	$(BIN)/ruff format --check agogosml agogosml_cli sample_app tests deployment benchmarks
	$(BIN)/mypy
	$(BIN)/python -m pytest

# Only the tests that build images and run containers (docs/containers.md).
# They set up Podman where no Docker engine responds.
test-containers: $(STAMP)
	$(BIN)/python deployment/kafka/broker.py fetch
	$(BIN)/python -m pytest -m containers

lint: $(STAMP)
	$(BIN)/ruff check agogosml agogosml_cli sample_app tests deployment benchmarks
	$(BIN)/ruff format --check agogosml agogosml_cli sample_app tests deployment benchmarks
	$(BIN)/mypy

# Benchmarks: pipeline modes against a raw Kafka relay on a local broker
# (docs/benchmarks.md). Both write bench-results.json; `bench` also updates the
# results block of docs/benchmarks.md.
bench: $(STAMP)
	$(BIN)/python deployment/kafka/broker.py fetch
	$(BIN)/python -m sample_app.data
	$(BIN)/python -m sample_app.train --if-missing
	$(BIN)/python -m benchmarks --docs docs/benchmarks.md

bench-quick: $(STAMP)
	$(BIN)/python deployment/kafka/broker.py fetch
	$(BIN)/python -m sample_app.data
	$(BIN)/python -m sample_app.train --if-missing
	$(BIN)/python -m benchmarks --quick

bench-hops: $(STAMP)
	$(BIN)/python deployment/kafka/broker.py fetch
	$(BIN)/python -m sample_app.data
	$(BIN)/python -m sample_app.train --if-missing
	$(BIN)/python -m benchmarks.hops

bench-stages: $(STAMP)
	$(BIN)/python -m sample_app.data
	$(BIN)/python -m sample_app.train --if-missing
	$(BIN)/python -m benchmarks.stages

# broker.py needs only confluent-kafka, a dependency of agogosml itself.
broker: $(SAMPLE_STAMP)
	$(BIN)/python deployment/kafka/broker.py run

clean:
	rm -rf $(VENV) .agogosml .pytest_cache .mypy_cache .ruff_cache bench-results.json
