# imc: every target installs what it needs first, so a fresh clone needs only
# `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
RUN    := .run

.PHONY: install system-deps test demo bench fixtures registry-up registry-down lint clean

install: system-deps $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

system-deps:
	@bash registry-fixtures/install-deps.sh

test: install
	$(PY) -m pytest -q -p no:cacheprovider tests

demo: install
	@bash registry-fixtures/demo.sh

bench: install
	$(PY) bench/run.py

fixtures: install
	$(PY) registry-fixtures/regfix.py fixtures

registry-up: install
	$(PY) registry-fixtures/regfix.py up --state $(RUN)/registries.json

registry-down:
	@if [ -x $(PY) ]; then $(PY) registry-fixtures/regfix.py down --state $(RUN)/registries.json; \
	 else echo "nothing to stop"; fi

lint: install
	$(PY) -m pip install -q --disable-pip-version-check ruff
	$(VENV)/bin/ruff check builder tests registry-fixtures bench

clean: registry-down
	rm -rf $(VENV) $(RUN) .fixtures-cache
