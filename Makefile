# composefs-csi developer entry points. Every target prepares what it needs (scripts/setup.sh).
VENV := .venv/bin
PYTEST_ARGS ?=

.PHONY: setup demo test lint typecheck unit bench e2e clean

setup:
	@scripts/setup.sh

demo: setup
	@$(VENV)/python -m csi.demo

lint: setup
	$(VENV)/ruff check csi tests bench
	$(VENV)/ruff format --check csi tests bench

typecheck: setup
	$(VENV)/mypy

unit: setup
	$(VENV)/pytest $(PYTEST_ARGS)

# The whole suite: lint, types, then every test (root-only tests run when root).
test: setup
	$(VENV)/ruff check csi tests bench
	$(VENV)/ruff format --check csi tests bench
	$(VENV)/mypy
	$(VENV)/pytest $(PYTEST_ARGS)

bench: setup
	$(VENV)/python -m bench.run

# The chart's node pods in podman on a stand-in node, with a fake kubelet (docs/e2e.md). Root.
E2E_ARGS ?=
e2e:
	@scripts/setup.sh --e2e
	$(VENV)/python -m tests.e2e $(E2E_ARGS)

clean:
	rm -rf .venv .pytest_cache .mypy_cache .ruff_cache build *.egg-info
