"""Names, labels and constants shared by the builders, the gatherer and the tests.

Every child has a deterministic name derived from (run, branch, cycle, stage), so
creating it twice is a 409 (harmless) and a restarted operator finds what its
predecessor made. Names longer than a DNS label are cut and given a hash suffix.
"""

from __future__ import annotations

import hashlib

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
MANAGER = "copd-operator"

TRAINER_CONTAINER = "trainer"
MANIFEST_ENV = "COPD_MANIFEST"
TERMINATION_LOG = "/dev/termination-log"
STORAGE_VOLUME = "storage"
API_TOKEN_VOLUME = "kube-api-access"  # stage pods only: the trainer patches its Branch's status.progress
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
API_TOKEN_EXPIRATION_S = 3600  # the kubelet rotates a projected token at 80 % of its life
HUB_PORT = 8000


def dns_name(*parts: object, limit: int = 63) -> str:
    """`a-b-c`, lower-cased; cut to `limit` with an 8-hex hash of the full name when too long."""
    name = "-".join(str(p) for p in parts if p != "").lower()
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[: limit - 9].rstrip('-')}-{digest}"


def branch_cr_name(run: str, branch: str) -> str:
    return dns_name(run, branch)


def stage_job_name(run: str, branch: str, cycle: int, stage: str) -> str:
    return dns_name(run, branch, f"c{cycle}", stage)


def diagnose_job_name(run: str, cycle: int) -> str:
    return dns_name(run, "diagnose", f"c{cycle}")


def merge_job_name(run: str) -> str:
    return dns_name(run, "merge")


def hub_name(run: str, cycle: int) -> str:
    return dns_name(run, "hub", f"c{cycle}")


def pvc_name(run: str) -> str:
    return dns_name(run, "storage")


def hub_port_for(namespace: str, run: str, cycle: int) -> int:
    """A port in 10000-19999 fixed by (namespace, run, cycle): hubs that share a network
    namespace (the process node: every pod is 127.0.0.1) rarely collide, and a restarted
    operator computes the same one."""
    h = hashlib.sha256(f"{namespace}/{run}/{cycle}".encode()).digest()
    return 10000 + int.from_bytes(h[:4], "big") % 10000
