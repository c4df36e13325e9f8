"""`copd-operator`: run the CoPD operator (kopf) against the current kubeconfig or in-cluster credentials.

    copd-operator --namespace team-a [--namespace team-b] | --all-namespaces
                  [--metrics-port 9090] [--health-port 8081] [--hub-address service|pod-ip]
                  [--trainer-command "copd"] [--workers 16] [--resync-minutes 5] [--qps 200 --burst 400]
                  [--finished-job-ttl-seconds 900] [--no-network-policy]
                  [--malloc-arenas 2] [--malloc-trim-seconds 30]
                  [--leader-elect [--leader-election-namespace NS] [--leader-election-id NAME]]
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys

from copd_operator.logic.builders import OperatorConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="copd-operator", description=__doc__.splitlines()[0])
    scope = p.add_mutually_exclusive_group(required=True)
    scope.add_argument("--namespace", "-n", action="append", help="Watch this namespace (repeatable).")
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="Watch every namespace.")
    p.add_argument("--metrics-port", type=int, default=None, help="Serve Prometheus /metrics on this port.")
    p.add_argument("--health-port", type=int, default=None,
                   help="Serve /healthz and /readyz (liveness/readiness probes) on this port.")
    p.add_argument("--hub-address", choices=["service", "pod-ip"], default="service",
                   help="How OPD trainers reach the hub: its Service's DNS name (a real cluster) or its pod IP "
                        "(clusters without Service routing, e.g. the test process node).")
    p.add_argument("--trainer-command", default="copd",
                   help="Command prefix of the `copd` entry points in pods (shell words).")
    p.add_argument("--trainer-service-account", default="copd-trainer",
                   help="ServiceAccount of trainer/hub/merge pods (created in the run's namespace if missing).")
    p.add_argument("--network-policy", action=argparse.BooleanOptionalAction, default=True,
                   help="Give each run a NetworkPolicy that lets only its own trainers reach its hub "
                        "(inert where the network plugin does not enforce NetworkPolicy).")
    p.add_argument("--checkpoint-every", type=int, default=2, help="Trainers checkpoint every N steps.")
    p.add_argument("--workers", type=int, default=16,
                   help="Runs reconciled in parallel (threads; a reconcile mostly waits on the apiserver).")
    p.add_argument("--resync-minutes", type=float, default=5.0,
                   help="Reconcile every known run this often even without a watch event (a safety net: "
                        "changes of the runs and their children are watched).")
    p.add_argument("--resync-seconds", type=float, default=None,
                   help="The same in seconds (overrides --resync-minutes; tests).")
    p.add_argument("--qps", type=float, default=200.0,
                   help="Steady rate of API requests the reconciles may send (token bucket; 0: no limit).")
    p.add_argument("--burst", type=int, default=400, help="Requests allowed at once above --qps.")
    p.add_argument("--finished-job-ttl-seconds", type=int, default=900,
                   help="Once a finished Job's report is in the run's status, let Kubernetes delete the Job "
                        "(and its pods) this many seconds after it finished (ttlSecondsAfterFinished). "
                        "-1: keep finished Jobs until the run is deleted.")
    p.add_argument("--malloc-arenas", type=int, default=2,
                   help="At most this many glibc malloc arenas (M_ARENA_MAX; 0: glibc's default, 8 per core). "
                        "Freed memory of many threads' arenas otherwise stays resident.")
    p.add_argument("--malloc-trim-seconds", type=float, default=30.0,
                   help="Give freed heap pages back to the kernel this often (malloc_trim; 0: never).")
    p.add_argument("--pod-env", action="append", default=[], metavar="NAME=VALUE",
                   help="Extra environment for every pod the operator makes (repeatable).")
    p.add_argument("--leader-elect", action=argparse.BooleanOptionalAction, default=False,
                   help="Run more than one replica safely: only the holder of a coordination.k8s.io Lease "
                        "reconciles (the chart turns this on).")
    p.add_argument("--leader-election-namespace", default=None,
                   help="Namespace of the Lease (default: the pod's namespace, else the first --namespace).")
    p.add_argument("--leader-election-id", default="copd-operator-leader", help="Name of the Lease.")
    p.add_argument("--verbose", "-v", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    from copd_operator.control import memory

    memory.limit_arenas(a.malloc_arenas)  # before any thread exists
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not a.verbose:
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)  # one line per watch event otherwise
    import threading

    import kopf
    from kubernetes import client, config
    from prometheus_client import start_http_server

    from copd_core.metrics import CoPDMetrics
    from copd_operator import handlers  # noqa: F401 - registers the kopf handlers
    from copd_operator.control.workqueue import WorkQueue
    from copd_operator.io.apiclient import instrument
    from copd_operator.io.gather import Apis
    from copd_operator.io.informer import KINDS, ChildIndex, start_informers
    from copd_operator.reconcile import Reconciler
    from copd_operator.runtime import OperatorRuntime

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    cfg = OperatorConfig(
        trainer_command=tuple(shlex.split(a.trainer_command)),
        hub_address=a.hub_address,
        checkpoint_every=a.checkpoint_every,
        trainer_service_account=a.trainer_service_account,
        extra_env=dict(kv.split("=", 1) for kv in a.pod_env),
        network_policy=a.network_policy,
    )
    metrics = CoPDMetrics()
    if a.metrics_port is not None:
        start_http_server(a.metrics_port, registry=metrics.registry)
    # the reconciles' client: limited to --qps/--burst, counted; the informers' watches: their own
    # connections (one long-lived request each), counted, not limited; the Lease: its own, never starved
    namespaces = None if a.all_namespaces else a.namespace
    api_client = _client(client, a.workers * 3 + 4)
    instrument(api_client, a.qps, a.burst, metrics.api_request)
    watch_client = _client(client, len(KINDS) * len(namespaces or [None]) + 2)
    instrument(watch_client, 0, 1, metrics.api_request)
    index = ChildIndex()
    queue = WorkQueue(metrics)
    stop_informers = threading.Event()
    start_informers(Apis(watch_client, index), index, namespaces, lambda ns, run: queue.add((ns, run)),
                    stop_informers)
    resync_s = a.resync_seconds if a.resync_seconds is not None else a.resync_minutes * 60
    from concurrent.futures import ThreadPoolExecutor

    writers = ThreadPoolExecutor(max(4, a.workers * 2), thread_name_prefix="copd-write")
    reconciler = Reconciler(Apis(api_client, index, pool=writers), cfg, metrics,
                            finished_job_ttl_s=None if a.finished_job_ttl_seconds < 0 else a.finished_job_ttl_seconds)
    rt = OperatorRuntime(queue=queue, reconciler=reconciler, worker_count=a.workers, resync_s=resync_s,
                         elector=_elector(a, client.ApiClient()) if a.leader_elect else None)
    trimmer = memory.Trimmer(a.malloc_trim_seconds).start()
    if a.health_port is not None:
        from copd_operator.control import health

        rt.health = health.install(rt, a.health_port)
    try:
        kopf.run(standalone=True, clusterwide=a.all_namespaces, namespaces=a.namespace or [],
                 memo=kopf.Memo(runtime=rt))
    finally:
        # kopf's cleanup handler did this already unless it was cut short; either way the workers
        # have stopped and the Lease is released before the process exits
        rt.shutdown()
        writers.shutdown(wait=True)
        stop_informers.set()
        trimmer.stop()
    return 0


def _client(client, pool: int):
    """An ApiClient of the loaded configuration with a connection pool of `pool` connections."""
    conf = client.Configuration.get_default_copy()
    conf.connection_pool_maxsize = max(pool, conf.connection_pool_maxsize or 0)
    return client.ApiClient(conf)


def _elector(a: argparse.Namespace, api_client):
    import os

    from copd_operator.control.leader import LeaderElector

    ns = a.leader_election_namespace or os.environ.get("POD_NAMESPACE")
    if not ns:
        try:
            with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as f:
                ns = f.read().strip()
        except OSError:
            ns = (a.namespace or ["default"])[0]

    def lost() -> None:
        # Exit at once rather than stop the workers: a reconcile thread in the middle of an API call
        # cannot be interrupted, and the new leader may already be reconciling. The Deployment
        # restarts the pod, which comes back as a follower.
        logging.getLogger("copd_operator").error("leadership lost: exiting")
        logging.shutdown()
        os._exit(1)

    return LeaderElector(api_client, ns, a.leader_election_id, on_stopped_leading=lost)


if __name__ == "__main__":
    sys.exit(main())
