# Crucible: two commands. `make up` starts the platform; `make test` proves it.
# Both run `make setup` first, which installs what is missing and skips what is there.
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup up down logs status test check format bench clean

setup:
	@bash scripts/setup.sh

up: setup
	@$(PY) -m services.stack up

down:
	@if [ -x $(PY) ]; then $(PY) -m services.stack down; fi

logs:
	@$(PY) -m services.stack logs

status:
	@$(PY) -m services.stack status

test: setup check
	@bash scripts/test-services.sh
	@$(PY) -m pytest $(PYTEST_ARGS)

check: setup
	@.venv/bin/ruff format --check services tests bench
	@.venv/bin/ruff check services tests bench
	@.venv/bin/mypy

format: setup
	@.venv/bin/ruff format services tests bench
	@.venv/bin/ruff check --fix services tests bench

bench: up
	@$(PY) bench/inference.py
	@$(PY) bench/gateway.py --stack-var-dir var --stack-ports 8000 8080
	@$(PY) bench/retrieval.py
	@$(PY) bench/milvus_alloc.py
	@$(PY) bench/gc_pause.py
	@$(PY) bench/clients.py
	@$(PY) bench/finetune.py
	@$(PY) bench/agent.py
	@$(PY) bench/evals.py

clean: down
	rm -rf var/run var/log
