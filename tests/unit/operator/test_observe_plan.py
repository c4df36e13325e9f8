"""Pure: termination messages -> Observed; decision -> operations (table-driven)."""

import json
from datetime import UTC, datetime

import pytest
from copd_operator.logic import observe as ob
from copd_operator.logic.naming import (
    branch_cr_name,
    diagnose_job_name,
    hub_name,
    merge_job_name,
    stage_job_name,
)
from copd_operator.logic.plan import Create, Delete, Patch, plan

from copd_core.cycle import (
    BranchStatus,
    Phase,
    RunBranchStage,
    RunDiagnose,
    RunMerge,
    RunStatus,
    Stage,
    StopWork,
    decide,
)
from tests.unit.operator.builders_test_helpers import CFG, DEMO, JobB, SnapB, run_ref

NOW = datetime(2026, 1, 1, tzinfo=UTC)
STAGE_REPORT = json.dumps({"branch": "arith", "cycle": 1, "stage": "RL", "step": 9, "done": True,
                           "reward": 0.25, "message": ""})


@pytest.mark.parametrize("jb, expect", [
    (JobB("j").active(), ("Running", None)),
    (JobB("j"), ("Pending", None)),
    (JobB("j").suspended(), ("Suspended", None)),
    (JobB("j").succeeded(STAGE_REPORT), ("Succeeded", 0.25)),
    (JobB("j").succeeded(""), ("Succeeded", None)),           # KWOK: exit 0, no message
    (JobB("j").failed("Traceback ...\nValueError: boom"), ("Failed", None)),
])
def test_job_outcome(jb, expect):
    o = ob.job_outcome(jb.job, jb.pods)
    assert (o.state, (o.report or {}).get("reward")) == expect


def test_branch_report_from_messages():
    spec = run_ref().spec
    ok = ob.branch_report(spec, 1, Stage.RL, ob.job_outcome(*_j(JobB("j").succeeded(STAGE_REPORT))))
    assert ok.done and ok.step == 9 and ok.reward == 0.25
    kwok = ob.branch_report(spec, 1, Stage.RL, ob.job_outcome(*_j(JobB("j").succeeded(""))))
    assert kwok.done and kwok.step == spec.schedule.rl_steps_per_cycle and kwok.reward is None
    failed_report = json.dumps({"failed": True, "message": "OPD needs --hub-url"})
    bad = ob.branch_report(spec, 1, Stage.RL, ob.job_outcome(*_j(JobB("j").failed(failed_report, 2))))
    assert bad.failed and bad.message == "OPD needs --hub-url"
    assert ob.branch_report(spec, 1, Stage.RL, None) is None


def _j(jb):
    return jb.job, jb.pods


def test_diagnose_report_parses_rows_and_kwok_gives_none():
    rows = [{"cycle": 2, "student": "a", "teacher": "b", "topk_overlap": 0.9, "symmetric_kl": 0.1}]
    rep = ob.diagnose_report(2, ob.job_outcome(*_j(JobB("d").succeeded(json.dumps({"cycle": 2,
                                                                                    "diagnostics": rows})))))
    assert rep.diagnostics[0].topk_overlap == 0.9
    assert ob.diagnose_report(2, ob.job_outcome(*_j(JobB("d").succeeded("")))).diagnostics == ()
    assert ob.diagnose_report(2, ob.job_outcome(*_j(JobB("d").active()))) is None


def test_diagnose_report_parses_the_compact_rows_copd_diagnose_writes():
    msg = json.dumps({"cycle": 3, "directions": [["a", "b", 0.91, 0.2], ["b", "a", 0.8, 0.4]], "total": 2})
    rep = ob.diagnose_report(3, ob.job_outcome(*_j(JobB("d").succeeded(msg))))
    assert [(d.cycle, d.student, d.teacher, d.topk_overlap, d.symmetric_kl) for d in rep.diagnostics] == [
        (3, "a", "b", 0.91, 0.2), (3, "b", "a", 0.8, 0.4)]


@pytest.mark.parametrize("claim, pc, want", [
    (None, None, None),
    ("nope", None, ("ClaimNotFound", "storage.claimName")),
    (None, "hi", ("PriorityClassNotFound", "trainer.priorityClassName")),
    ("nope", "hi", ("ClaimNotFound", "storage.claimName")),
])
def test_missing_objects_block_the_run_naming_the_field(claim, pc, want):
    snap = SnapB().obj()
    snap.claim_missing, snap.priority_class_missing = claim, pc
    got = ob.blocked(snap)
    assert (got is None) if want is None else (got[0] == want[0] and got[1].startswith(want[1]))


def _running(stage=Stage.RL, cycle=1, done=()):
    run = run_ref()
    st = RunStatus(phase=Phase.RUNNING, cycle=cycle, stage=stage,
                   branches={b.name: BranchStatus(cycle=cycle, stage=stage.value, done=b.name in done)
                             for b in run.spec.branches})
    return run, st


def _kinds(ops):
    return sorted((type(o).__name__, o.obj["kind"] if isinstance(o, Create) else o.kind,
                   o.obj["metadata"]["name"] if isinstance(o, Create) else o.name) for o in ops)


def test_pending_run_creates_one_job_per_branch_and_an_event():
    run = run_ref()
    snap = SnapB(run).obj()
    status, actions = decide(run.spec, RunStatus(), ob.observe(run.spec, RunStatus(), snap), NOW, 1)
    ops = plan(run, CFG, status, actions, snap, NOW, 1)
    jobs = [o.obj["metadata"]["name"] for o in ops if isinstance(o, Create) and o.obj["kind"] == "Job"]
    assert jobs == [stage_job_name(DEMO, "arith", 1, "RL"), stage_job_name(DEMO, "reverse", 1, "RL"), stage_job_name(DEMO, "maxbox", 1, "RL")]
    assert isinstance(ops[-1], Create) and ops[-1].obj["kind"] == "Event"


def test_existing_jobs_are_not_created_again():
    run, st = _running()
    snap = SnapB(run).job(JobB(stage_job_name(DEMO, "arith", 1, "RL")).active()).job(JobB(stage_job_name(DEMO, "reverse", 1, "RL")).active()) \
        .job(JobB(stage_job_name(DEMO, "maxbox", 1, "RL")).active()).obj()
    ops = plan(run, CFG, st, [RunBranchStage(b.name, 1, Stage.RL) for b in run.spec.branches], snap, NOW, 1)
    assert not [o for o in ops if isinstance(o, Create) and o.obj["kind"] == "Job"]


def test_opd_waits_for_the_hub_ip_in_pod_ip_mode_then_uses_it():
    run, st = _running(Stage.OPD)
    acts = [RunBranchStage("arith", 1, Stage.OPD)]
    ops = plan(run, CFG, st, acts, SnapB(run).obj(), NOW, 1)
    assert ("Create", "Pod", hub_name(DEMO, 1)) in _kinds(ops)
    assert not [o for o in ops if isinstance(o, Create) and o.obj["kind"] == "Job"]
    hub = {"metadata": {"name": hub_name(DEMO, 1), "labels": {"copd.io/component": "hub"}},
           "status": {"podIP": "127.0.0.1"}}
    ops = plan(run, CFG, st, acts, SnapB(run).pod(hub).obj(), NOW, 1)
    job = next(o.obj for o in ops if isinstance(o, Create) and o.obj["kind"] == "Job")
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--hub-url") + 1].startswith("http://127.0.0.1:")


def test_hub_of_another_stage_is_deleted():
    run, st = _running(Stage.DIAGNOSE)
    hub = {"metadata": {"name": hub_name(DEMO, 1), "labels": {"copd.io/component": "hub"}}, "status": {}}
    ops = plan(run, CFG, st, [RunDiagnose(1)], SnapB(run).pod(hub).obj(), NOW, 1)
    assert ("Delete", "Pod", hub_name(DEMO, 1)) in _kinds(ops)
    assert ("Create", "Job", diagnose_job_name(DEMO, 1)) in _kinds(ops)


def test_suspend_pauses_unfinished_jobs_and_resume_unpauses():
    run, st = _running()
    st.phase = Phase.SUSPENDED
    snap = SnapB(run).job(JobB(stage_job_name(DEMO, "arith", 1, "RL")).active()).job(JobB(stage_job_name(DEMO, "reverse", 1, "RL")).succeeded("")).obj()
    ops = plan(run, CFG, st, [StopWork("Suspended")], snap, NOW, 1)
    assert [o for o in ops if isinstance(o, Patch) and o.kind == "Job"] == \
        [Patch("Job", stage_job_name(DEMO, "arith", 1, "RL"), {"spec": {"suspend": True}})]
    run2, st2 = _running()
    snap2 = SnapB(run2).job(JobB(stage_job_name(DEMO, "arith", 1, "RL")).suspended()).obj()
    ops = plan(run2, CFG, st2, [RunBranchStage("arith", 1, Stage.RL)], snap2, NOW, 1)
    assert Patch("Job", stage_job_name(DEMO, "arith", 1, "RL"), {"spec": {"suspend": False}}) in ops


def test_terminal_run_deletes_unfinished_jobs():
    run, st = _running()
    st.phase, st.stage = Phase.FAILED, None
    snap = SnapB(run).job(JobB(stage_job_name(DEMO, "arith", 1, "RL")).active()).job(JobB(stage_job_name(DEMO, "reverse", 1, "RL")).succeeded("")).obj()
    ops = plan(run, CFG, st, [], snap, NOW, 1)
    assert [o for o in ops if isinstance(o, Delete)] == [Delete("Job", stage_job_name(DEMO, "arith", 1, "RL"))]


def test_merge_job_once():
    run = run_ref()
    st = RunStatus(phase=Phase.MERGING, cycle=4)
    assert ("Create", "Job", merge_job_name(DEMO)) in _kinds(plan(run, CFG, st, [RunMerge(False)], SnapB(run).obj(), NOW, 1))
    snap = SnapB(run).job(JobB(merge_job_name(DEMO)).active()).obj()
    assert ("Create", "Job", merge_job_name(DEMO)) not in _kinds(plan(run, CFG, st, [RunMerge(False)], snap, NOW, 1))


def test_kwok_walk_through_every_cycle_reaches_succeeded():
    """The whole state machine with every Job 'succeeding' without a message, as on KWOK."""
    run = run_ref()
    status, snap = RunStatus(), SnapB(run).obj()
    for _ in range(200):
        status, actions = decide(run.spec, status, ob.observe(run.spec, status, snap), NOW, 1)
        for op in plan(run, CFG, status, actions, snap, NOW, 1):
            if isinstance(op, Create) and op.obj["kind"] == "Job":
                jb = JobB(op.obj["metadata"]["name"]).succeeded("")
                snap.jobs[op.obj["metadata"]["name"]] = jb.job
                snap.pods.extend(jb.pods)
            elif isinstance(op, Create) and op.obj["kind"] == "Pod":
                snap.pods.append({**op.obj, "status": {"podIP": "10.0.0.7"}})
            elif isinstance(op, Delete) and op.kind == "Pod":
                snap.pods = [p for p in snap.pods if p["metadata"]["name"] != op.name]
        if status.phase in (Phase.SUCCEEDED, Phase.FAILED):
            break
    assert status.phase == Phase.SUCCEEDED and status.cycle == run.spec.schedule.cycles
    assert status.merged_model == "/copd/merged"
    assert diagnose_job_name(DEMO, run.spec.schedule.cycles) in snap.jobs


def test_branch_cr_status_phases():
    run, st = _running(done=("arith",))
    assert ob.branch_cr_status(st, "arith", 9, None, None, 1)["phase"] == "Waiting"
    assert ob.branch_cr_status(st, "reverse", 9, ob.JobOutcome("Running"), "j", 1)["phase"] == "Running"


def _creates(ops, kind):
    return [o.obj for o in ops if isinstance(o, Create) and o.obj["kind"] == kind]


@pytest.mark.parametrize("missing, phase", [
    (("arith", "reverse", "maxbox"), Phase.PENDING),  # a new run: every Branch, no stage Job yet
    (("reverse",), Phase.PENDING),                    # one deleted by hand: made again; the others' Jobs go ahead
    (("reverse",), Phase.FAILED),                     # an ended run makes no children
])
def test_missing_branches_are_planned_as_creates_and_their_jobs_wait(missing, phase):
    run = run_ref()
    snap = SnapB(run).obj()
    for b in missing:
        del snap.branches[b]
    if phase == Phase.PENDING:
        status, actions = decide(run.spec, RunStatus(), ob.observe(run.spec, RunStatus(), snap), NOW, 1)
    else:
        status, actions = RunStatus(phase=phase), []
    ops = plan(run, CFG, status, actions, snap, NOW, 1)
    branches = _creates(ops, "Branch")
    jobs = {j["metadata"]["name"] for j in _creates(ops, "Job")}
    if phase in (Phase.SUCCEEDED, Phase.FAILED):
        assert branches == [] and jobs == set()
        return
    assert [b["spec"]["branch"] for b in branches] == list(missing)
    assert all(b["spec"]["cycle"] == 1 and b["spec"]["stage"] == "RL" for b in branches)  # what the run wants
    assert all(b["metadata"]["ownerReferences"][0]["uid"] == run.uid for b in branches)
    assert jobs == {stage_job_name(DEMO, b.name, 1, "RL") for b in run.spec.branches if b.name not in missing}
    assert not [o for o in ops if isinstance(o, Patch) and o.kind == "Branch" and o.name in
                {branch_cr_name(DEMO, b) for b in missing}]


def test_kwok_walk_through_from_no_branches_creates_each_object_once():
    """A new run: the first pass makes the Branches, the next their Jobs (owned by the Branches' uids)."""
    run = run_ref()
    status, snap = RunStatus(), SnapB(run).obj()
    snap.branches.clear()
    made: list[str] = []
    for _ in range(200):
        status, actions = decide(run.spec, status, ob.observe(run.spec, status, snap), NOW, 1)
        for op in plan(run, CFG, status, actions, snap, NOW, 1):
            if isinstance(op, Create) and op.obj["kind"] == "Branch":
                made.append(op.obj["metadata"]["name"])
                snap.branches[op.obj["spec"]["branch"]] = {**op.obj, "metadata": {
                    **op.obj["metadata"], "uid": f"uid-{op.obj['spec']['branch']}"}}
            elif isinstance(op, Create) and op.obj["kind"] == "Job":
                name = op.obj["metadata"]["name"]
                made.append(name)
                owner = op.obj["metadata"]["ownerReferences"][0]["uid"]
                branch = next((b for b in snap.branches.values() if name.startswith(b["metadata"]["name"] + "-")),
                              None)
                assert branch is None or owner == branch["metadata"]["uid"], name
                jb = JobB(name).succeeded("")
                snap.jobs[name] = jb.job
                snap.pods.extend(jb.pods)
            elif isinstance(op, Create) and op.obj["kind"] == "Pod":
                snap.pods.append({**op.obj, "status": {"podIP": "10.0.0.7"}})
            elif isinstance(op, Delete) and op.kind == "Pod":
                snap.pods = [p for p in snap.pods if p["metadata"]["name"] != op.name]
        if status.phase in (Phase.SUCCEEDED, Phase.FAILED):
            break
    assert status.phase == Phase.SUCCEEDED
    assert len(made) == len(set(made))
    assert made[:3] == [branch_cr_name(DEMO, "arith"), branch_cr_name(DEMO, "reverse"), branch_cr_name(DEMO, "maxbox")]
