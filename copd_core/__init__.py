"""copd_core: the pure heart of CoPD, shared by the local runner and the operator.

    spec        the CoPDRun model: the single source of the CRD schema and the runtime config
    cycle       decide(spec, status, observed, now) -> (new status, actions); fail_run
    conditions  condition types, reasons, set_condition
    readiness   the merge-readiness test
    seeding     seeds derived from (run seed, branch, cycle, stage, step)
    metrics     the Prometheus series both executors export

Imports no torch, transformers, kopf or kubernetes (enforced by `make lint`).
"""
