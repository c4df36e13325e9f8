"""Child names unique per run, the owner check on 409, claim retention, Pod Security `restricted`,
the hub's NetworkPolicy (table-driven)."""

import json
import re
from types import SimpleNamespace

import pytest
from copd_operator.io import act
from copd_operator.logic import builders, naming
from copd_operator.logic.builders import build_hub_network_policy, made_for
from copd_operator.logic.naming import RunKey
from copd_operator.logic.plan import Create, Patch, plan
from kubernetes.client.rest import ApiException

from copd_core.cycle import Phase, RunStatus, Stage
from tests.unit.operator.builders_test_helpers import CFG, DEMO, SnapB, example_doc, run_ref
from tests.unit.operator.pod_security import violations

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")  # Service names


def all_names(run, branch: str, cycle: int = 1) -> dict[str, str]:
    return {
        "branch": naming.branch_cr_name(run, branch),
        "stage job": naming.stage_job_name(run, branch, cycle, "OPD"),
        "stage job (attempt)": naming.stage_job_name(run, branch, cycle, "OPD", 99),
        "diagnose job": naming.diagnose_job_name(run, cycle),
        "merge job": naming.merge_job_name(run),
        "hub": naming.hub_name(run, cycle),
        "network policy": naming.hub_network_policy_name(run),
        "pvc": naming.pvc_name(run),
    }


# ---------------------------------------------------------------------------
# names


@pytest.mark.parametrize("a, b", [
    # (run, branch) pairs whose `<run>-<branch>` read alike
    ((RunKey("a", "uid-1"), "b-c"), (RunKey("a-b", "uid-2"), "c")),
    ((RunKey("exp", "uid-1"), "math-v2"), (RunKey("exp-math", "uid-2"), "v2")),
    # one run deleted and re-created under the same name: its successor never claims its children
    ((RunKey("demo", "uid-old"), "arith"), (RunKey("demo", "uid-new"), "arith")),
    # long names cut to the same readable prefix
    ((RunKey("r" * 63, "uid-1"), "b" * 40), (RunKey("r" * 63 , "uid-2"), "b" * 40)),
])
def test_colliding_runs_get_distinct_children(a, b):
    names_a, names_b = all_names(*a), all_names(*b)
    for kind in names_a:
        assert names_a[kind] != names_b[kind], kind


def test_names_of_one_run_are_stable_and_distinct():
    run = RunKey("demo", "uid-run")
    assert all_names(run, "arith") == all_names(run, "arith")
    names = [*all_names(run, "arith").values(), *all_names(run, "reverse", 2).values()]
    # the network policy, the PVC and the merge Job are per run, so each appears twice
    assert len(set(names)) == len(names) - 3
    # two branches cut to the same readable prefix stay apart
    long = RunKey("r" * 63, "u")
    assert naming.branch_cr_name(long, "x" * 39 + "a") != naming.branch_cr_name(long, "x" * 39 + "b")


@pytest.mark.parametrize("run, branch, cycle", [
    (RunKey("r" * 63, "0" * 36), "b" * 40, 999),  # the longest run name (CRD: 63) and branch (spec: 40)
    (RunKey("a", "u"), "b", 1),
    (RunKey("x" * 50, "u"), "y-" * 20, 12),  # a cut that would end in '-'
])
def test_names_fit_their_kinds_limits(run, branch, cycle):
    names = all_names(run, branch, cycle)
    for kind, name in names.items():
        assert DNS_LABEL.match(name) and len(name) <= 63, (kind, name)
    for kind in ("stage job", "stage job (attempt)", "diagnose job", "merge job"):
        # the Job's pods are `<job>-<5 random>` and `job-name` is a label: both <= 63
        assert len(names[kind]) <= naming.JOB_NAME_LIMIT and len(names[kind]) + 6 <= 63, kind
    assert DNS_1035.match(names["hub"])  # the hub's Service


def test_builders_use_the_runs_uid():
    run = run_ref()
    other = builders.RunRef(run.name, run.namespace, "uid-other", run.spec)
    for build in (lambda r: builders.build_branch(r, "arith"), lambda r: builders.build_merge_job(r, CFG),
                  lambda r: builders.build_hub_pod(r, CFG, 1), builders.build_pvc, build_hub_network_policy):
        assert build(run)["metadata"]["name"] != build(other)["metadata"]["name"]


# ---------------------------------------------------------------------------
# the owner check of an existing object


def obj(owner_uid: str | None = None, run_uid: str | None = None) -> dict:
    md: dict = {"name": "x"}
    if owner_uid:
        md["ownerReferences"] = [{"kind": "CoPDRun", "name": "r", "uid": owner_uid}]
    if run_uid:
        md["annotations"] = {naming.ANNOTATION_RUN_UID: run_uid}
    return {"metadata": md}


@pytest.mark.parametrize("existing, wanted, expect", [
    (obj("u1"), obj("u1"), True),
    (obj("u2"), obj("u1"), False),             # another run's
    (obj(), obj("u1"), False),                 # someone's hand-made object
    (obj(run_uid="u1"), obj(run_uid="u1"), True),    # a kept claim (no owner): the annotation says whose
    (obj(run_uid="u2"), obj(run_uid="u1"), False),
    (obj("u1", run_uid="u1"), obj(run_uid="u1"), True),
    (obj("u2"), obj(), None),                  # shared children (the trainer ServiceAccount): nobody's
])
def test_made_for(existing, wanted, expect):
    assert made_for(existing, wanted) is expect


class FakeKind:
    """create_*/read_* of one kind: create meets `existing` (409) when there is one."""

    def __init__(self, existing: dict | None):
        self.existing, self.created = existing, []

    def create(self, namespace, body, **kw):
        if self.existing is not None:
            raise ApiException(status=409, reason="AlreadyExists")
        self.created.append(body)
        return body

    def read(self, name, namespace, **kw):
        if self.existing is None:
            raise ApiException(status=404, reason="NotFound")
        return SimpleNamespace(data=json.dumps(self.existing).encode())


class FakeGroup:
    def __init__(self, kind: FakeKind):
        self.kind = kind

    def __getattr__(self, call: str):
        return self.kind.create if call.startswith("create_") else self.kind.read


def fake_apis(existing: dict | None) -> tuple[SimpleNamespace, FakeKind]:
    """Every kind meets the same `existing` object (the ServiceAccount's 409 is never checked)."""
    k = FakeKind(existing)
    return SimpleNamespace(batch=FakeGroup(k), core=FakeGroup(k), custom=FakeGroup(k), networking=FakeGroup(k)), k


def test_create_meeting_our_own_object_is_done():
    run = run_ref()
    job = builders.build_merge_job(run, CFG)
    apis, k = fake_apis(job)
    assert act.apply_ops(apis, "ns", [Create(job)]) == []  # type: ignore[arg-type]


def test_create_meeting_another_runs_object_is_a_name_conflict():
    run = run_ref()
    job = builders.build_merge_job(run, CFG)
    theirs = builders.build_merge_job(builders.RunRef("demo", "ns", "uid-other", run.spec), CFG)
    theirs["metadata"]["name"] = job["metadata"]["name"]
    apis, _ = fake_apis(theirs)
    with pytest.raises(act.NameConflict, match="belongs to CoPDRun demo, not this run"):
        act.create(apis, "ns", job)  # type: ignore[arg-type]
    sa = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "copd-trainer"}}
    conflicts = act.apply_ops(apis, "ns", [Create(job), Create(sa)])  # type: ignore[arg-type]
    assert [(c.kind, c.name) for c in conflicts] == [("Job", job["metadata"]["name"])]


# ---------------------------------------------------------------------------
# the claim: kept after the run unless retainPolicy Delete


def storage(**kw) -> dict:
    doc = example_doc()["spec"]["storage"]
    doc.update(kw)
    return doc


@pytest.mark.parametrize("st, owned", [
    (storage(), False),                           # default Retain
    (storage(retainPolicy="Retain"), False),
    (storage(retainPolicy="Delete"), True),
])
def test_claim_is_owned_by_the_run_only_with_retain_policy_delete(st, owned):
    run = run_ref(storage=st)
    pvc = builders.build_pvc(run)
    assert (pvc["metadata"]["ownerReferences"] == [run.owner]) is owned
    assert pvc["metadata"]["ownerReferences"] or not owned
    assert pvc["metadata"]["annotations"][naming.ANNOTATION_RUN_UID] == run.uid
    assert pvc["metadata"]["labels"][naming.LABEL_RUN] == run.name


@pytest.mark.parametrize("now_owned, policy, patch", [
    (False, "Delete", {"metadata": {"ownerReferences": ["OWNER"]}}),
    (True, "Retain", {"metadata": {"ownerReferences": None}}),
    (True, "Delete", None),
    (False, "Retain", None),
])
def test_claim_follows_a_changed_retain_policy(now_owned, policy, patch):
    run = run_ref(storage=storage(retainPolicy=policy))
    snap = SnapB(run).obj()
    snap.pvc = builders.build_pvc(run_ref(storage=storage(retainPolicy="Delete" if now_owned else "Retain")))
    ops = plan(run, CFG, RunStatus(phase=Phase.RUNNING, cycle=1, stage=Stage.RL), [], snap, None, 1)  # type: ignore[arg-type]
    patches = [o for o in ops if isinstance(o, Patch) and o.kind == "PersistentVolumeClaim"]
    if patch is None:
        assert patches == []
    else:
        refs = patch["metadata"]["ownerReferences"]
        want = {"metadata": {"ownerReferences": [run.owner] if refs else None}}
        assert patches == [Patch("PersistentVolumeClaim", snap.pvc["metadata"]["name"], want)]


# ---------------------------------------------------------------------------
# Pod Security `restricted`


def pod_specs(run) -> dict[str, dict]:
    return {
        "stage": builders.build_stage_job(run, CFG, "arith", "uid-arith", 1, "OPD", "http://h:1")["spec"]["template"]["spec"],
        "diagnose": builders.build_diagnose_job(run, CFG, 1)["spec"]["template"]["spec"],
        "merge": builders.build_merge_job(run, CFG)["spec"]["template"]["spec"],
        "hub": builders.build_hub_pod(run, CFG, 1)["spec"],
    }


@pytest.mark.parametrize("kind", ["stage", "diagnose", "merge", "hub"])
def test_every_pod_passes_pod_security_restricted(kind):
    spec = pod_specs(run_ref())[kind]
    assert violations(spec) == []
    assert spec["securityContext"]["runAsUser"] == builders.TRAINER_UID  # the trainer image's user
    assert spec["securityContext"]["fsGroup"] == builders.TRAINER_UID  # the claim is writable by it


@pytest.mark.parametrize("breaks, expect", [
    (lambda s: s["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"), "allowPrivilegeEscalation"),
    (lambda s: s["containers"][0]["securityContext"]["capabilities"].update(drop=[]), "drop lacks ALL"),
    (lambda s: s["containers"][0]["securityContext"]["capabilities"].update(add=["SYS_ADMIN"]), "SYS_ADMIN"),
    (lambda s: [s["securityContext"].pop("runAsNonRoot"), s["containers"][0]["securityContext"].pop("runAsNonRoot")],
     "runAsNonRoot"),
    (lambda s: [s["securityContext"].pop("seccompProfile"), s["containers"][0]["securityContext"].pop("seccompProfile")],
     "seccompProfile None"),
    (lambda s: s["volumes"].append({"name": "h", "hostPath": {"path": "/"}}), "hostPath"),
    (lambda s: s.update(hostNetwork=True), "hostNetwork"),
    (lambda s: s["containers"][0]["ports"].__setitem__(0, {"containerPort": 1, "hostPort": 1}), "hostPort"),
    (lambda s: s["securityContext"].update(runAsUser=0), "runAsUser 0"),
])
def test_the_checker_catches_what_restricted_refuses(breaks, expect):
    spec = pod_specs(run_ref())["hub"]
    breaks(spec)
    assert any(expect in v for v in violations(spec)), violations(spec)


# ---------------------------------------------------------------------------
# the hub's NetworkPolicy


def test_network_policy_lets_only_the_runs_trainers_reach_its_hub():
    run = run_ref()
    np = build_hub_network_policy(run)
    assert np["metadata"]["ownerReferences"] == [run.owner]
    spec = np["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    (rule,) = spec["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": "hub"}]
    selects = spec["podSelector"]["matchLabels"]
    allowed = rule["from"][0]["podSelector"]["matchLabels"]
    assert set(rule["from"][0]) == {"podSelector"}  # no namespaceSelector: this namespace only

    def matches(sel: dict, labels: dict) -> bool:
        return all(labels.get(k) == v for k, v in sel.items())

    hub = builders.build_hub_pod(run, CFG, 3)
    assert matches(selects, hub["metadata"]["labels"])
    assert hub["spec"]["containers"][0]["ports"][0]["name"] == "hub"  # the named port, whatever its number
    trainer = builders.build_stage_job(run, CFG, "arith", "u", 3, "OPD", "http://h:1")["spec"]["template"]
    assert matches(allowed, trainer["metadata"]["labels"])
    other = builders.RunRef("other", "ns", "uid-other", run.spec)
    others = [builders.build_stage_job(other, CFG, "arith", "u", 3, "OPD", "http://h:1")["spec"]["template"],
              builders.build_diagnose_job(run, CFG, 3)["spec"]["template"],
              builders.build_merge_job(run, CFG)["spec"]["template"]]
    assert not any(matches(allowed, p["metadata"]["labels"]) for p in others)
    assert not matches(selects, builders.build_hub_pod(other, CFG, 3)["metadata"]["labels"])


@pytest.mark.parametrize("enabled, present, phase, created", [
    (True, False, Phase.RUNNING, True),
    (True, True, Phase.RUNNING, False),
    (False, False, Phase.RUNNING, False),
    (True, False, Phase.SUCCEEDED, False),
])
def test_plan_creates_the_network_policy_once(enabled, present, phase, created):
    run = run_ref()
    snap = SnapB(run).obj()
    if present:
        snap.network_policies = {"x": build_hub_network_policy(run)}
    cfg = builders.OperatorConfig(trainer_command=CFG.trainer_command, hub_address=CFG.hub_address,
                                  network_policy=enabled)
    ops = plan(run, cfg, RunStatus(phase=phase, cycle=1, stage=Stage.RL), [], snap, None, 1)  # type: ignore[arg-type]
    made = [o.obj for o in ops if isinstance(o, Create) and o.obj["kind"] == "NetworkPolicy"]
    assert made == ([build_hub_network_policy(run)] if created else [])


def test_demo_identity_is_run_refs():
    assert (run_ref().name, run_ref().uid) == (DEMO.name, DEMO.uid)
