# The few commands a person needs. See README.md.
.PHONY: setup demo test test-fast cluster-up cluster-down crds lint

setup:            ## venv with pinned deps (.venv) + Kubernetes test binaries
	scripts/setup.sh

demo:             ## the CoPD demo on CPU (tiny model, ~1-5 min)
	.venv/bin/copd run examples/copdrun.yaml --output runs/demo

test:             ## every test: pure, runtime, and the real control plane (started if needed)
	scripts/run-tests.sh

test-fast:        ## pure and runtime tests only, no cluster
	.venv/bin/python -m pytest -m "not cluster and not slow" -q

cluster-up:
	scripts/cluster.sh up

cluster-down:
	scripts/cluster.sh down

lint:
	.venv/bin/ruff check .
	.venv/bin/lint-imports
