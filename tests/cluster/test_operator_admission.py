"""Admission on the real apiserver: the generated schema + CEL rules accept the example exactly as
`copd run` does and refuse every manifest of tests/malformed.py with a message naming the field; what only the operator
can judge (a claim that does not exist yet) ends as a Blocked condition."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.cluster.support import ROOT, Api, Operator, apply_crds, apply_doc, example, wait_for
from tests.malformed import MALFORMED, malformed


def _dry_run(cluster, ns, doc):
    return cluster.kubectl("apply", "--dry-run=server", "-n", ns, "-f", "-", input=yaml.safe_dump(doc), check=False)


@pytest.mark.cluster
def test_admission_accepts_the_example_and_names_bad_fields(cluster, namespace):
    apply_crds(cluster)
    p = cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(ROOT / "examples/copdrun.yaml"),
                        check=False)
    assert p.returncode == 0, p.stderr
    failures = []
    for case, (_, needle) in MALFORMED.items():
        p = _dry_run(cluster, namespace, malformed(case))
        if p.returncode == 0 or needle not in p.stderr:
            failures.append(f"{case}: rc={p.returncode} {p.stderr.strip()[:300]}")
    assert len(MALFORMED) >= 40
    assert not failures, "\n".join(failures)


@pytest.mark.cluster
def test_immutable_fields_and_operator_judged_spec(cluster, namespace, tmp_path):
    apply_crds(cluster)
    api = Api(cluster)
    doc = example()
    doc["spec"]["storage"]["claimName"] = "no-such-claim"
    apply_doc(cluster, namespace, doc)
    for patch, needle in [({"spec": {"baseModel": {"uri": "builtin://tiny-qwen3-vl"}}}, "baseModel: immutable"),
                          ({"spec": {"seed": 7}}, "seed: immutable")]:
        p = cluster.kubectl("patch", "copdrun", "demo", "-n", namespace, "--type", "merge", "-p", json.dumps(patch),
                            check=False)
        assert p.returncode != 0 and needle in p.stderr, p.stderr
    # mutable fields still change (e.g. suspend, schedule)
    cluster.kubectl("patch", "copdrun", "demo", "-n", namespace, "--type", "merge",
                    "-p", json.dumps({"spec": {"schedule": {"cycles": 5}}}))

    op = Operator(cluster, namespace, tmp_path).start()
    try:
        # a missing claim is transient: the run waits on it (condition Blocked), it does not fail
        def blocked_status():
            s = api.run(namespace, "demo").get("status") or {}
            return any(c["type"] == "Blocked" and c["status"] == "True" for c in s.get("conditions") or []) and s

        st = wait_for(blocked_status, 60, "Blocked")
        blocked = next(c for c in st["conditions"] if c["type"] == "Blocked")
        assert blocked["reason"] == "ClaimNotFound" and st.get("phase", "Pending") == "Pending"
        assert "storage.claimName" in blocked["message"] and "no-such-claim" in blocked["message"]
        assert not api.jobs(namespace)
    finally:
        op.stop()


@pytest.mark.cluster
def test_kubectl_names(cluster, namespace):
    """`copd` is the category (CoPDRuns and Branches); a run is got by its short name `crun` or `copdrun`."""
    apply_crds(cluster)
    doc = example()
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(doc))
    name = doc["metadata"]["name"]
    for resource in ("crun", "copdrun", "copdruns"):
        p = cluster.kubectl("get", resource, name, "-n", namespace, "-o", "name", check=False)
        assert p.returncode == 0 and p.stdout.strip() == f"copdrun.copd.io/{name}", (resource, p.stderr)
    listed = cluster.kubectl("get", "copd", "-n", namespace, "-o", "name").stdout.split()
    assert f"copdrun.copd.io/{name}" in listed
