# bucketer: `make demo` and `make test` each set everything up first, so either works on a fresh clone.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
BUCKETER := $(VENV)/bin/bucketer
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-unit test-integration bench lint clean broker-start broker-stop

setup: $(STAMP)
	@$(BUCKETER) local fetch >/dev/null

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "bucketer: $(PYTHON) is required"; exit 1; }
	@command -v java >/dev/null || { echo "bucketer: Java 17+ is required (the local Kafka broker)"; exit 1; }
	@command -v keytool >/dev/null || { echo "bucketer: keytool (from the JDK) is required (certificates of the SASL_SSL broker)"; exit 1; }
	@command -v mvn >/dev/null || { echo "bucketer: Maven is required (fetches the Kafka jars once)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,bench]'
	touch $(STAMP)

demo: setup
	$(PY) -m bucketer.demo

test: setup
	$(PY) -m pytest -q tests

test-unit: setup
	$(PY) -m pytest -q tests/unit

test-integration: setup
	$(PY) -m pytest -q tests/integration

bench: setup
	$(PY) -m bench

lint: setup
	$(VENV)/bin/ruff check bucketer stream connectors tests bench
	$(VENV)/bin/ruff format --check bucketer stream connectors tests bench
	$(VENV)/bin/mypy

clean:
	-$(BUCKETER) local stop
	rm -rf .bucketer
