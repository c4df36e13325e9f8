"""Live progress on the process node: `kubectl get branches -w` shows a stage's steps moving.

Real trainers (`copd stage` on the process node) get a projected service-account token and
patch their Branch's status.progress (at most once a second here: COPD_PROGRESS_INTERVAL_S=1
through --pod-env; 5 s by default) under the shipped Role (operator/deploy/trainer-rbac.yaml);
the operator folds it into the Branch's step, which the `Step` printer column and the
copd_branch_step gauge show before the stage's Job finishes.
"""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest

from tests import ROOT
from tests.cluster.support import PY, Api, Operator, apply_crds, apply_doc, metric, report, wait_for
from tests.cluster.test_operator_procnode import small_run

RUN = "live"
RL_STEPS, OPD_STEPS = 60, 3
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def live_run() -> dict:
    doc = small_run()
    doc["metadata"]["name"] = RUN
    s = doc["spec"]
    # stages long enough (a few seconds of steps) that a 1 s report interval shows several steps
    s["schedule"] = {"cycles": 1, "rlStepsPerCycle": RL_STEPS, "opdStepsPerCycle": OPD_STEPS}
    s["rl"].update(groupSize=8, batchSize=4, maxNewTokens=16)
    return doc


def job_done(job) -> bool:
    return any(c.type in ("Complete", "Failed") and c.status == "True" for c in (job.status.conditions or []))


def watch_steps(text: str, stage: str, cycle: int = 1) -> dict[str, list[int]]:
    """STEP values per Branch in `kubectl get branches -w` output, for rows of (cycle, stage), in order.
    Columns: NAME RUN PHASE CYCLE STAGE STEP REWARD AGE (REWARD may be empty)."""
    out: dict[str, list[int]] = {}
    for line in text.splitlines():
        f = line.split()
        if len(f) >= 6 and f[0] != "NAME" and f[3] == str(cycle) and f[4] == stage and f[5].isdigit():
            out.setdefault(f[0], []).append(int(f[5]))
    return out


@pytest.mark.cluster
@pytest.mark.slow
def test_kubectl_get_branches_w_shows_live_steps_on_the_process_node(cluster, namespace, tmp_path):
    apply_crds(cluster)
    cluster.kubectl("apply", "-n", namespace, "-f", str(ROOT / "operator/deploy/trainer-rbac.yaml"))
    api = Api(cluster)
    op = Operator(cluster, namespace, tmp_path, "--hub-address", "pod-ip",
                  "--trainer-command", f"{PY} -m copd_runtime.cli", "--pod-env", "COPD_PROGRESS_INTERVAL_S=1").start()
    watch_log = tmp_path / "branches-w.txt"
    with open(watch_log, "w") as wf:
        watcher = subprocess.Popen(["kubectl", "get", "branches", "-n", namespace, "-w"], env=cluster.env,
                                   stdout=wf, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        t_apply = apply_doc(cluster, namespace, live_run())
        branches = [b["name"] for b in live_run()["spec"]["branches"]]

        def rl_job(b: str, by_labels: list):  # children's names carry a hash of the run's uid: find by labels
            return next((j for j in by_labels if (j.metadata.labels or {}).get("copd.io/branch") == b
                         and (j.metadata.labels or {}).get("copd.io/cycle") == "1"
                         and (j.metadata.labels or {}).get("copd.io/stage") == "RL"), None)

        # -- while the RL Jobs run: poll the Branches (and the gauge), each read before its Job's ----------
        seen: dict[str, list[int]] = {b: [] for b in branches}  # steps read while that branch's Job ran
        gauge: dict[str, set[float]] = {b: set() for b in branches}
        finished: dict[str, float] = {}

        def poll() -> bool:
            steps = {o["spec"]["branch"]: (o.get("status") or {}) for o in api.branches(namespace)}
            text = op.metrics() or ""
            all_jobs = api.jobs(namespace)
            for b in branches:
                st = steps.get(b) or {}
                g = metric(text, "copd_branch_step", namespace=namespace, run=RUN, branch=b)
                job = rl_job(b, all_jobs)
                if b in finished or job is None:
                    continue
                if job_done(job):  # read after the Branch: everything recorded above preceded the end
                    finished[b] = time.monotonic()
                    continue
                if st.get("cycle") == 1 and st.get("stage") == "RL":
                    seen[b].append(int(st.get("step", 0)))
                    if g is not None:
                        gauge[b].add(g)
            return len(finished) == len(branches)

        wait_for(poll, 420, "both RL stage Jobs to finish", interval=0.2)
        for b in branches:
            live = sorted({s for s in seen[b] if 0 < s < RL_STEPS})
            assert seen[b] == sorted(seen[b]), (b, seen[b])  # never backwards
            assert len(live) >= 2, (f"{b}: step seen while its Job ran: {seen[b]}", op.tail())
            assert any(0 < g < RL_STEPS for g in gauge[b]), (b, gauge[b])  # the metric follows

        # -- the run goes on and ends as before; the last stage's progress stays on the Branch ----------
        st = wait_for(lambda: (s := api.run(namespace, RUN).get("status") or {}).get("phase")
                      in ("Succeeded", "Failed") and s, 420, "the run to end", interval=1.0)
        assert st["phase"] == "Succeeded", (st, op.tail())
        wall = time.monotonic() - t_apply
        # the Branches follow the run's status write in the same reconcile (their own writes, a moment later)
        objs = wait_for(lambda: (o := {o["spec"]["branch"]: o["status"] for o in api.branches(namespace)})
                        and all(s.get("phase") == "Succeeded" for s in o.values()) and o, 60,
                        "the Branches to show Succeeded", interval=0.5)
        cr_name = {o["spec"]["branch"]: o["metadata"]["name"] for o in api.branches(namespace)}
        for b, peer in zip(branches, reversed(branches), strict=True):
            s = objs[b]
            assert s["phase"] == "Succeeded" and s["step"] == OPD_STEPS, s
            p = s["progress"]
            assert (p["cycle"], p["stage"], p["step"], p["steps"]) == (1, "OPD", OPD_STEPS, OPD_STEPS), p
            assert 0.0 < p["topkOverlap"][peer] <= 1.0 and p["updateTime"], p  # per-step OPD overlap

        # -- only stage pods carried a token; what each trainer sent -------------------------------------
        sent = {}
        for j in api.jobs(namespace):
            spec = j.spec.template.spec
            mounts = {m.mount_path for m in spec.containers[0].volume_mounts or []}
            is_stage = (j.metadata.labels or {}).get("copd.io/component") == "trainer"
            assert (SA_DIR in mounts) == is_stage, j.metadata.name
            assert spec.automount_service_account_token is False
        for pod in api.pods(namespace):
            if (pod.metadata.labels or {}).get("copd.io/component") != "trainer":
                continue
            log = cluster.log_path(namespace, pod.metadata.name, "trainer").read_text(errors="replace")
            m = re.findall(r'\{"progress_reports": \{[^}]*\}\}', log)
            assert m, (pod.metadata.name, log[-2000:])
            sent[pod.metadata.name] = json.loads(m[-1])["progress_reports"]
            assert sent[pod.metadata.name]["failed"] == 0, (pod.metadata.name, log[-2000:])
            assert "live progress off" not in log and "live progress report failed" not in log
    finally:
        watcher.terminate()
        watcher.wait(10)
        op.stop()
    # -- `kubectl get branches -w` (ran throughout): more than one step value per Branch within one stage --
    text = watch_log.read_text()
    rl = watch_steps(text, "RL")
    for b in branches:
        values = rl.get(cr_name[b], [])
        assert len({v for v in values if 0 < v < RL_STEPS}) >= 2, (b, values, text[-3000:])
        assert values == sorted(values), (b, values)
    report("branch-progress", wall_s=round(wall, 1), rl_steps=RL_STEPS,
           rl_steps_polled_live={b: sorted({s for s in seen[b] if 0 < s < RL_STEPS}) for b in branches},
           rl_steps_in_watch={b: sorted(set(rl.get(cr_name[b], []))) for b in branches},
           rl_stage_s={b: round(finished[b] - t_apply, 1) for b in branches},
           patches_sent={name: n["sent"] for name, n in sent.items()})
