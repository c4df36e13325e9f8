"""Names, labels and constants shared by the builders, the gatherer and the tests.

Every child has a deterministic name derived from (run uid, branch, cycle, stage), so
creating it twice is a 409 (harmless) and a restarted operator finds what its
predecessor made:

    <run>-<branch>-c<cycle>-<stage>-<h>     h: 8 hex of sha256(run uid, the parts)

The readable part alone is ambiguous (run `a` + branch `b-c` and run `a-b` + branch `c`
both read `a-b-c`); the hash covers the run's uid and each part separately, so two runs,
or one run deleted and re-created under the same name, never claim the same child. The
readable part is cut to fit the kind's limit: Jobs to 57 (the Job controller names pods
`<job>-<5 chars>`, and `job-name` is a label, <= 63), everything else to a DNS label (63).
An object that exists under our name but is owned by another run is a name conflict
(io/act.py checks the owner on every 409).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol

from copd_core.spec import API_GROUP, API_VERSION

GROUP = API_GROUP
VERSION = API_VERSION
RUN_PLURAL = "copdruns"
BRANCH_PLURAL = "branches"
BRANCH_KIND = "Branch"
RUN_KIND = "CoPDRun"

LABEL_RUN = "copd.io/run"
LABEL_BRANCH = "copd.io/branch"
LABEL_CYCLE = "copd.io/cycle"
LABEL_STAGE = "copd.io/stage"
LABEL_COMPONENT = "copd.io/component"  # trainer | hub | diagnose | merge
LABEL_MANAGED = "app.kubernetes.io/managed-by"
ANNOTATION_RUN_UID = "copd.io/run-uid"  # on a claim kept after its run (retainPolicy Retain): no owner reference
MANAGER = "copd-operator"

TRAINER_CONTAINER = "trainer"
MANIFEST_ENV = "COPD_MANIFEST"
TERMINATION_LOG = "/dev/termination-log"
STORAGE_VOLUME = "storage"
API_TOKEN_VOLUME = "kube-api-access"  # stage pods only: the trainer patches its Branch's status.progress
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
API_TOKEN_EXPIRATION_S = 3600  # the kubelet rotates a projected token at 80 % of its life
HUB_PORT = 8000


NAME_LIMIT = 63  # a DNS label: Branch, Pod, Service, PVC, NetworkPolicy
JOB_NAME_LIMIT = 57  # + "-" + 5 random characters of the Job's pods = 63
HASH_LEN = 8


class RunIdentity(Protocol):
    """What names are made of: the run's name (readable) and uid (unique). builders.RunRef is one."""

    @property
    def name(self) -> str: ...

    @property
    def uid(self) -> str: ...


@dataclass(frozen=True)
class RunKey:
    name: str
    uid: str

    @classmethod
    def of(cls, obj: dict) -> RunKey:
        """The identity of a CoPDRun object as read from the apiserver."""
        return cls(obj["metadata"]["name"], obj["metadata"]["uid"])


def dns_name(*parts: object, limit: int = NAME_LIMIT) -> str:
    """`a-b-c`, lower-cased; cut to `limit` with an 8-hex hash of the full name when too long."""
    name = "-".join(str(p) for p in parts if p != "").lower()
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:HASH_LEN]
    return f"{name[: limit - HASH_LEN - 1].rstrip('-')}-{digest}"


def child_name(run: RunIdentity, *parts: object, limit: int = NAME_LIMIT) -> str:
    """`<run>-<parts...>` cut to fit, then `-<h>`: h hashes the run's uid and each part on its own."""
    readable = "-".join(str(p) for p in (run.name, *parts) if p != "").lower()
    key = "\0".join(str(p) for p in (run.uid, *parts))
    digest = hashlib.sha256(key.encode()).hexdigest()[:HASH_LEN]
    return f"{readable[: limit - HASH_LEN - 1].rstrip('-')}-{digest}"


def branch_cr_name(run: RunIdentity, branch: str) -> str:
    return child_name(run, branch)


def stage_job_name(run: RunIdentity, branch: str, cycle: int, stage: str, attempt: int = 0) -> str:
    """attempt > 0: a replacement of a failed attempt (spec.failurePolicy), `...-<stage>-a<n>-<h>`."""
    more = (f"a{attempt}",) if attempt > 0 else ()
    return child_name(run, branch, f"c{cycle}", stage, *more, limit=JOB_NAME_LIMIT)


def diagnose_job_name(run: RunIdentity, cycle: int, attempt: int = 0) -> str:
    """attempt > 0: a replacement of a failed diagnose Job (spec.failurePolicy), `...-diagnose-c<c>-a<n>-<h>`."""
    more = (f"a{attempt}",) if attempt > 0 else ()
    return child_name(run, "diagnose", f"c{cycle}", *more, limit=JOB_NAME_LIMIT)


def merge_job_name(run: RunIdentity, attempt: int = 0) -> str:
    more = (f"a{attempt}",) if attempt > 0 else ()
    return child_name(run, "merge", *more, limit=JOB_NAME_LIMIT)


def rendezvous_name(run: RunIdentity, branch: str) -> str:
    """The headless Service through which a multi-pod stage's pods find each other (one per branch)."""
    return child_name(run, branch, "rdzv")


def hub_name(run: RunIdentity, cycle: int) -> str:
    return child_name(run, "hub", f"c{cycle}")


def hub_network_policy_name(run: RunIdentity) -> str:
    return child_name(run, "hub")


def pvc_name(run: RunIdentity) -> str:
    return child_name(run, "storage")


def hub_port_for(namespace: str, run: str, cycle: int) -> int:
    """A port in 10000-19999 fixed by (namespace, run, cycle): hubs that share a network
    namespace (the process node: every pod is 127.0.0.1) rarely collide, and a restarted
    operator computes the same one."""
    h = hashlib.sha256(f"{namespace}/{run}/{cycle}".encode()).digest()
    return 10000 + int.from_bytes(h[:4], "big") % 10000


# Kueue (queued runs: the CoPDRun carries QUEUE_LABEL)
KUEUE_GROUP = "kueue.x-k8s.io"
KUEUE_VERSION = "v1beta2"
WORKLOAD_PLURAL = "workloads"
LOCAL_QUEUE_PLURAL = "localqueues"
WORKLOAD_PRIORITY_CLASS_PLURAL = "workloadpriorityclasses"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"


def workload_name(run: RunIdentity, cycle: int, stage: str) -> str:
    """The Kueue Workload of one stage: `<run>-c<cycle>-<stage>-<h>` (stage RL, OPD, Diagnose or Merge)."""
    return child_name(run, f"c{cycle}", stage.lower())
