"""Children unique per run, a taken name reported, Pod Security `restricted`, the claim kept after its run.

All on KWOK GPU nodes (pods complete without running), one operator per test namespace.
"""

from __future__ import annotations

import json

import pytest
from copd_operator.logic.naming import RunKey, branch_cr_name

from tests.cluster.support import (
    GPU_NODE_SELECTOR,
    KWOK_TOLERATION,
    Api,
    Operator,
    apply_crds,
    apply_doc,
    assert_no_duplicate_children,
    example,
    wait_for,
)

DONE = ("Succeeded", "Failed")


def short_run(name: str, branches: list[str] | None = None, **storage) -> dict:
    """The example on KWOK, one cycle; `branches` renames the example's branches (same domains)."""
    doc = example(tolerations=[KWOK_TOLERATION], nodeSelector=GPU_NODE_SELECTOR)
    spec = doc["spec"]
    doc["metadata"]["name"] = name
    spec["schedule"].update(cycles=1, rlStepsPerCycle=2, opdStepsPerCycle=2)
    spec["mergeReadiness"]["minCycles"] = 1
    if branches:
        spec["branches"] = [dict(b, name=n) for b, n in zip(spec["branches"], branches, strict=False)]
    spec["storage"].update(storage)
    return doc


def phase(api: Api, ns: str, name: str) -> str | None:
    return (api.run(ns, name).get("status") or {}).get("phase")


def events(cluster, ns: str) -> list[dict]:
    return json.loads(cluster.kubectl("get", "events", "-n", ns, "-o", "json").stdout)["items"]


def pvcs(api: Api, ns: str, run: str) -> list:
    return api.core.list_namespaced_persistent_volume_claim(ns, label_selector=f"copd.io/run={run}").items


@pytest.mark.cluster
def test_runs_whose_names_concatenate_alike_each_get_their_own_children(cluster, namespace, tmp_path):
    """`x` + branch `y-arith` and `x-y` + branch `arith` both read `x-y-arith`: each run gets its own."""
    apply_crds(cluster)
    api = Api(cluster)
    op = Operator(cluster, namespace, tmp_path).start()
    try:
        apply_doc(cluster, namespace, short_run("x", ["y-arith", "y-reverse"]))
        apply_doc(cluster, namespace, short_run("x-y", ["arith", "reverse"]))
        for run in ("x", "x-y"):
            wait_for(lambda run=run: phase(api, namespace, run) in DONE, 300, f"run {run} finished\n{op.tail()}")
            assert phase(api, namespace, run) == "Succeeded", op.tail()
        uids = {run: api.run(namespace, run)["metadata"]["uid"] for run in ("x", "x-y")}
        branches = api.branches(namespace)
        assert len(branches) == 4 and len({b["metadata"]["name"] for b in branches}) == 4
        branch_uids = {}
        for b in branches:
            run = b["spec"]["run"]
            assert [r["uid"] for r in b["metadata"]["ownerReferences"]] == [uids[run]]
            assert b["status"]["phase"] == "Succeeded", b
            branch_uids[b["metadata"]["uid"]] = run
        jobs = api.jobs(namespace)
        per_run: dict[str, int] = {}
        for j in jobs:
            run = j.metadata.labels["copd.io/run"]
            (owner,) = j.metadata.owner_references
            assert owner.uid in (uids[run], *[u for u, r in branch_uids.items() if r == run]), j.metadata.name
            per_run[run] = per_run.get(run, 0) + 1
        # per run: 2 branches x (RL + OPD) + diagnose + merge
        assert per_run == {"x": 6, "x-y": 6}, sorted(j.metadata.name for j in jobs)
        assert_no_duplicate_children(api, namespace)
        assert not [e for e in events(cluster, namespace) if e["reason"] == "NameConflict"]
    finally:
        op.stop()


@pytest.mark.cluster
def test_a_taken_name_is_reported_not_swallowed(cluster, namespace, tmp_path):
    """A Branch someone made under the name the run's Branch would have: a Warning Event NameConflict."""
    apply_crds(cluster)
    api = Api(cluster)
    apply_doc(cluster, namespace, short_run("taken"))  # no operator yet: nothing is made
    run = api.run(namespace, "taken")
    name = branch_cr_name(RunKey.of(run), "arith")
    squatter = {"apiVersion": "copd.io/v1alpha1", "kind": "Branch", "metadata": {"name": name},
                "spec": {"run": "someone-else", "branch": "arith"}}
    apply_doc(cluster, namespace, squatter)
    op = Operator(cluster, namespace, tmp_path).start()
    try:
        ev = wait_for(lambda: [e for e in events(cluster, namespace) if e["reason"] == "NameConflict"], 60,
                      f"a NameConflict event\n{op.tail()}")
        assert ev[0]["type"] == "Warning" and ev[0]["involvedObject"]["name"] == "taken"
        assert name in ev[0]["message"] and "not this run" in ev[0]["message"]
        # the other branches went ahead; the squatter is untouched
        wait_for(lambda: len(api.branches(namespace)) == 3, 60, "the other Branches")
        b = api.custom.get_namespaced_custom_object("copd.io", "v1alpha1", namespace, "branches", name)
        assert b["spec"]["run"] == "someone-else" and not b["metadata"].get("ownerReferences")
    finally:
        op.stop()


@pytest.mark.cluster
def test_a_run_in_a_restricted_namespace_succeeds(cluster, namespace, tmp_path):
    cluster.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted",
                    "pod-security.kubernetes.io/enforce-version=latest")
    # enforcement is on: a pod without the restricted settings is refused
    bare = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "bare"},
            "spec": {"containers": [{"name": "c", "image": "busybox"}], "tolerations": [KWOK_TOLERATION]}}
    p = cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(bare), check=False)
    assert p.returncode != 0 and "violates PodSecurity" in p.stderr, p.stderr
    apply_crds(cluster)
    api = Api(cluster)
    op = Operator(cluster, namespace, tmp_path).start()
    try:
        apply_doc(cluster, namespace, short_run("locked"))
        seen_hub = []

        def finished():
            seen_hub.extend(p for p in api.pods(namespace) if p.metadata.labels.get("copd.io/component") == "hub")
            return phase(api, namespace, "locked") in DONE

        wait_for(finished, 300, f"run finished\n{op.tail()}")
        assert phase(api, namespace, "locked") == "Succeeded", op.tail()
        # every Job's pod was admitted (a refused pod leaves the Job without one) and the hub pod too
        jobs = api.jobs(namespace)
        assert len(jobs) == 3 * 2 + 2 and all(j.status.succeeded for j in jobs), [j.status for j in jobs]
        assert seen_hub and seen_hub[0].spec.security_context.run_as_non_root
        refused = [e for e in events(cluster, namespace) if "PodSecurity" in e.get("message", "")]
        assert not refused, refused
    finally:
        op.stop()


@pytest.mark.cluster
def test_deleting_a_run_keeps_its_claim_unless_retain_policy_delete(cluster, namespace, tmp_path):
    apply_crds(cluster)
    api = Api(cluster)
    op = Operator(cluster, namespace, tmp_path).start()
    try:
        apply_doc(cluster, namespace, short_run("keep"))
        apply_doc(cluster, namespace, short_run("drop", retainPolicy="Delete"))
        apply_doc(cluster, namespace, short_run("switch"))  # Retain, then Delete while it lives
        for run in ("keep", "drop", "switch"):
            wait_for(lambda run=run: pvcs(api, namespace, run), 60, f"the claim of {run}")
        keep_pvc = pvcs(api, namespace, "keep")[0]
        assert not keep_pvc.metadata.owner_references
        refused = cluster.kubectl("patch", "copdrun", "switch", "-n", namespace, "--type=merge",
                                  "-p", json.dumps({"spec": {"storage": {"size": "2Gi"}}}), check=False)
        assert refused.returncode != 0 and "storage: immutable" in refused.stderr, refused.stderr
        cluster.kubectl("patch", "copdrun", "switch", "-n", namespace, "--type=merge",
                        "-p", json.dumps({"spec": {"storage": {"retainPolicy": "Delete"}}}))
        wait_for(lambda: (pvcs(api, namespace, "switch")[0].metadata.owner_references or [None])[0], 60,
                 "the claim of switch owned by its run")
        for run in ("keep", "drop", "switch"):
            wait_for(lambda run=run: any(b["spec"]["run"] == run for b in api.branches(namespace)), 60,
                     f"{run} under way")
            cluster.kubectl("delete", "copdrun", run, "-n", namespace, "--wait=true", timeout=60)

        def gone_or_going(run: str) -> bool:
            return all(p.metadata.deletion_timestamp for p in pvcs(api, namespace, run))

        # the garbage collector has removed the runs' Branches: it has seen the deletions
        wait_for(lambda: not api.branches(namespace), 90, "Branches deleted")
        wait_for(lambda: gone_or_going("drop") and gone_or_going("switch"), 90, "claims of drop, switch deleted")
        kept = pvcs(api, namespace, "keep")
        assert [p.metadata.name for p in kept] == [keep_pvc.metadata.name] and not kept[0].metadata.deletion_timestamp
    finally:
        op.stop()
