# imc: every target installs what it needs first, so a fresh clone needs only
# `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
RUN    := .run
IMC    ?= $(VENV)/bin/imc

.PHONY: install bytecode system-deps test demo bench fixtures registry-up registry-down snapshot lint clean

install: system-deps $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	@bash registry-fixtures/install-kubectl.sh $(VENV)
	touch $@

system-deps:
	@bash registry-fixtures/install-deps.sh

# imc's byte code, written ahead: an environment with PYTHONDONTWRITEBYTECODE set would
# otherwise compile every module anew in each imc process (about 0.13 s of CPU each),
# which the suite's subprocesses and the bench's timed pulls would pay every time.
# Cheap when nothing changed; an edited module is recompiled here, never run stale.
bytecode: install
	@$(PY) -m compileall -q builder

test: install bytecode
	$(PY) -m pytest -q -p no:cacheprovider tests

demo: install
	@bash registry-fixtures/demo.sh

bench: install bytecode
	@bash registry-fixtures/install-bench-deps.sh
	$(PY) bench/run.py

fixtures: install
	$(PY) registry-fixtures/regfix.py fixtures

registry-up: install
	$(PY) registry-fixtures/regfix.py up --state $(RUN)/registries.json

registry-down:
	@if [ -x $(PY) ]; then $(PY) registry-fixtures/regfix.py down --state $(RUN)/registries.json; \
	 else echo "nothing to stop"; fi

# make snapshot NAME=web IMAGES="localhost:5000/app:1.0 localhost:5000/db:2" [PLAIN_HTTP=localhost:5000]
#               [INSECURE=LIST] [SIZE=GiB] [PUSH=registry.example.com/imc/web:v1] [IMC_HOME=DIR] [IMC=PATH]
# Installs the venv only when $(IMC) is missing (no apt: imc needs neither registry nor skopeo).
snapshot:
	@[ -x '$(IMC)' ] || $(MAKE) --no-print-directory $(STAMP)
	@$(PYTHON) scripts/snapshot.py --name '$(NAME)' --images '$(IMAGES)' --plain-http '$(PLAIN_HTTP)' \
	    --insecure '$(INSECURE)' --size '$(SIZE)' --push '$(PUSH)' --home '$(IMC_HOME)' --imc '$(IMC)'

lint: install
	$(PY) -m pip install -q --disable-pip-version-check ruff
	$(VENV)/bin/ruff check builder tests registry-fixtures bench scripts

clean: registry-down
	rm -rf $(VENV) $(RUN) .fixtures-cache
