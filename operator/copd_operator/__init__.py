"""copd-operator: the Kubernetes executor of the CoPD cycle (kopf + kubernetes client, never torch).

Layers, top to bottom: a module imports only from layers below its own, never from
a layer above, nor from the other side of a `|` (checked by `lint-imports`, contract
"copd_operator layers" in pyproject.toml). copd_core (pure) may be imported anywhere;
copd_runtime never.

    main | crd              main: flags -> OperatorRuntime -> kopf.run(memo=kopf.Memo(runtime=...))
                            crd: CRDs generated from the pydantic spec (python -m copd_operator.crd --out crds/)
    handlers                thin kopf handlers: watch events -> the runtime's work queue; startup/cleanup
    runtime                 OperatorRuntime: queue, reconciler, workers, elector, health; start()/shutdown()
    reconcile | control     reconcile: one reconcile of one CoPDRun: gather -> decide -> write status
                              -> plan -> act -> events
                            control/: workqueue (queue + worker threads), leader (Lease election),
                              health (/healthz, /readyz)
    io                      io/gather: the only cluster reads (-> Snapshot)
                            io/act: the only writes (idempotent create/patch/delete, run status)
    logic                   pure: logic/observe (Snapshot -> copd_core.cycle.Observed, Branch statuses),
                              logic/plan (decision + Snapshot -> ops), logic/builders (manifests),
                              logic/naming (names, labels, constants)
    api                     the Branch custom resource's pydantic models
"""
