# The few commands a person needs. See README.md.
.PHONY: bench-gpu gpu-pins setup demo test test-fast chaos test-kueue cluster-up cluster-down crds lint compare compare-verify scale builtin-models

UV := $(or $(wildcard $(HOME)/.cache/copd-operator/tools/uv-*/bin/uv),uv)

setup:            ## this clone's .venv from uv.lock (editable) + the Kubernetes test binaries
	scripts/setup.sh

demo:             ## the CoPD demo on CPU (tiny model, ~1-5 min)
	.venv/bin/copd run examples/copdrun.yaml --output runs/demo

test:             ## every test: lint, pure, model, chart, and the real control plane (started if needed)
	scripts/run-tests.sh

test-fast:        ## unit and tiny-model tests only, no cluster
	.venv/bin/python -m pytest -m "not cluster and not slow" -q tests/unit tests/model

chaos:            ## every fault scenario, the long ones included (~20-40 min on 2 cores): one `FAULT <name>: ...` line each
	scripts/run-tests.sh -s -m "chaos or not chaos" tests/cluster/test_chaos.py tests/cluster/test_faults.py \
	  tests/model/test_checkpoint_faults.py

test-kueue:       ## only the Kueue scenarios (missing queue, 4 runs on 8 GPUs, preemption, Kueue restart; ~5 min; also in `make test`)
	scripts/run-tests.sh -s tests/cluster/test_kueue.py

cluster-up:
	scripts/cluster.sh up

cluster-down:
	scripts/cluster.sh down

crds:             ## regenerate crds/ and the chart's copy from copd_core/spec.py
	.venv/bin/python -m copd_operator.crd --out crds/
	cp crds/*.yaml helm/copd-operator/crds/

lint:             ## ruff, the import contracts (layers, no cycles), uv.lock in step with pyproject.toml, `.[gpu]` resolves
	.venv/bin/ruff check .
	.venv/bin/lint-imports
	$(firstword $(UV)) lock --check --quiet
	$(MAKE) --no-print-directory gpu-pins

gpu-pins:         ## `pip install ".[gpu]"` (vllm) resolves for the CUDA image's Python 3.12 on x86_64 (metadata only, ~5 s)
	$(firstword $(UV)) pip compile pyproject.toml --extra gpu --python-version 3.12 \
	  --python-platform x86_64-manylinux_2_28 --quiet --output-file /dev/null

builtin-models:   ## rebuild the shipped builtin base models + their SHA256SUMS.json (copd_runtime/builtin/weights)
	.venv/bin/python -m copd_runtime.builtin.build

compare:          ## the science comparison, both benchmarks (docs/science.md; ~30 min on 2 cores)
	.venv/bin/python -m experiments.compare examples/compare.yaml --output runs/compare --jobs 2
	.venv/bin/python -m experiments.compare examples/compare-conflicting.yaml --output runs/compare/conflicting --jobs 2

compare-verify:   ## rerun both benchmarks and check them against docs/science (WORKERS=nproc; ~30 min on 2 cores, ~8 on 16)
	scripts/compare-verify.sh runs/compare-verify $(WORKERS)

observe-demo:     ## Prometheus + Alertmanager fire CoPDTopKOverlapCollapse for a diverging run (README "Observe")
	scripts/observe-demo.sh

RUNS ?= 1000
bench-gpu:        ## every GPU check on this machine's CUDA GPU (bench/gpu_check.sh; ~9 min on an H200; logs in runs/gpu-check)
	PYTHON=.venv/bin/python bench/gpu_check.sh runs/gpu-check

scale:            ## fleet benchmark: RUNS (1000) CoPDRuns at once on the KWOK cluster, one operator (README "Running many runs")
	.venv/bin/python -m bench.operator_scale --runs $(RUNS)
