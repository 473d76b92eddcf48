# bucketer: `make demo` and `make test` each set everything up first, so either works on a fresh clone.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
BUCKETER := $(VENV)/bin/bucketer
STAMP  := $(VENV)/.installed

.PHONY: setup browser compose-tool demo test test-unit test-integration bench lint clean broker-start broker-stop

# The status page's browser test drives the system's Chromium (Debian: chromium + chromium-driver). Point
# BUCKETER_CHROMIUM / BUCKETER_CHROMEDRIVER elsewhere to use another build; the tests read both.
BUCKETER_CHROMIUM ?= $(shell command -v chromium || command -v chromium-browser)
BUCKETER_CHROMEDRIVER ?= $(shell command -v chromedriver)
export BUCKETER_CHROMIUM BUCKETER_CHROMEDRIVER
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

setup: $(STAMP) browser compose-tool
	@$(BUCKETER) local fetch >/dev/null

browser:
	@if [ -x "$(BUCKETER_CHROMIUM)" ] && [ -x "$(BUCKETER_CHROMEDRIVER)" ]; then exit 0; fi; \
	command -v apt-get >/dev/null || { echo "bucketer: install Chromium and ChromeDriver (or set"\
	  "BUCKETER_CHROMIUM and BUCKETER_CHROMEDRIVER): the status page's browser test needs them"; exit 1; }; \
	echo "bucketer: installing chromium and chromium-driver (the status page's browser test)"; \
	$(SUDO) apt-get update && $(SUDO) apt-get install -y chromium chromium-driver

# tests/unit/test_compose.py renders compose/docker-compose.yml with Debian's docker-compose (no engine needed).
compose-tool:
	@if command -v docker-compose >/dev/null; then exit 0; fi; \
	command -v apt-get >/dev/null || { echo "bucketer: install docker-compose: the compose file's check needs it"; exit 1; }; \
	echo "bucketer: installing docker-compose (checks compose/docker-compose.yml)"; \
	$(SUDO) apt-get update && $(SUDO) apt-get install -y docker-compose

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

# --durations: the slowest tests are named in every run's output (the suite is kept under ~20 min).
# -n 2: two xdist workers, each starts its own session broker; the suite is mostly waiting on brokers
# and subprocesses, so two workers on two cores took it from 26-29 min serial to 16 min.
test: setup
	$(PY) -m pytest -q -n 2 --dist worksteal --durations=30 tests

test-unit: setup
	$(PY) -m pytest -q tests/unit

test-extended: setup
	BUCKETER_EXTENDED=1 $(PY) -m pytest -q tests

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
