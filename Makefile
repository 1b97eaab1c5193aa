# The two commands a new user needs:
#   make serve   set up .venv if needed, build the demo model repository if missing, serve it over gRPC
#   make test    set up .venv if needed, then lint, type-check and run the whole test suite
VENV := .venv
PORT ?= 8001
ARGS ?=

.PHONY: serve test venv lint typecheck pytest protos demo clean-demo

venv:
	@bash scripts/bootstrap.sh

serve: venv
	$(VENV)/bin/cvserve serve --port $(PORT) $(ARGS)

test: venv lint typecheck pytest

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck:
	$(VENV)/bin/python scripts/typecheck.py

pytest:
	$(VENV)/bin/python -m pytest $(ARGS)

protos: venv
	$(VENV)/bin/python scripts/gen_protos.py

demo: venv
	$(VENV)/bin/cvserve demo build

clean-demo:
	rm -rf demo_repository
