"""Admission on the real apiserver: the generated schema + CEL rules accept the example exactly as
`copd run` does and refuse every manifest of tests/malformed.py with a message naming the field; what only the operator
can judge ends as a Failed condition."""

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
        st = wait_for(lambda: (s := api.run(namespace, "demo").get("status") or {}).get("phase") == "Failed" and s,
                      60, "Failed")
        failed = next(c for c in st["conditions"] if c["type"] == "Failed")
        assert failed["status"] == "True" and failed["reason"] == "InvalidSpec"
        assert "storage.claimName" in failed["message"] and "no-such-claim" in failed["message"]
        assert not api.jobs(namespace)
    finally:
        op.stop()
