"""copd-operator: the Kubernetes executor of the CoPD cycle (kopf + kubernetes client, never torch).

Layers, top to bottom (each imports only the ones below it):

    main        flags -> kopf.run
    handlers    thin kopf handlers: watch events -> work queue
    reconcile   one reconcile of one CoPDRun: gather -> decide -> write status -> act
    gather      the only code that reads the cluster (returns a Snapshot)
    act         the only code that writes children (idempotent create/patch/delete)
    observe     pure: Snapshot -> copd_core.cycle.Observed, Branch statuses
    plan        pure: (spec, status, actions, snapshot) -> operations
    builders    pure build_* manifests
    naming      names, labels, constants
    crd         CRDs generated from the pydantic spec (python -m copd_operator.crd --out crds/)
"""
