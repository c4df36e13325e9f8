"""Fleet scale pieces, pure or in-process: the child index, the request counter/limiter, the two-level
work queue, and which finished Jobs may be cleaned up."""

import threading

import pytest
from copd_operator.control.workqueue import WorkQueue
from copd_operator.io.apiclient import TokenBucket, aiohttp_counter, classify, instrument
from copd_operator.io.informer import RUN_KIND, ChildIndex, compact, slim
from copd_operator.logic.cleanup import finished_job_cleanup, jobs_still_read
from copd_operator.logic.naming import diagnose_job_name, merge_job_name, stage_job_name
from copd_operator.logic.plan import Patch

from copd_core.cycle import BranchStatus, Phase, RunStatus, Stage
from copd_core.metrics import CoPDMetrics
from tests.unit.operator.builders_test_helpers import JobB, SnapB, run_ref

# -- the child index ---------------------------------------------------------------------------


def _obj(name, run="r1", ns="ns", rv="1", **extra):
    return {"metadata": {"name": name, "namespace": ns, "resourceVersion": rv, "labels": {"copd.io/run": run},
                         "managedFields": [{"manager": "x"}]}, **extra}


def test_index_groups_by_run_and_follows_updates_and_deletes():
    idx = ChildIndex()
    idx.expect("Job", "ns")
    assert not idx.synced()
    idx.replace("Job", "ns", [_obj("a"), _obj("b"), _obj("c", run="r2")])
    assert idx.synced()
    assert sorted(j["metadata"]["name"] for j in idx.children("Job", "ns", "r1")) == ["a", "b"]
    assert "managedFields" not in idx.get("Job", "ns", "a")["metadata"]
    idx.upsert("Job", _obj("a", rv="5", status={"succeeded": 1}))
    idx.remember("Job", _obj("a", rv="3"))  # an older answer arriving after a newer event: ignored
    assert idx.get("Job", "ns", "a")["status"] == {"succeeded": 1}
    idx.upsert("Job", _obj("b", run="r2", rv="6"))  # relabelled: moves to the other run
    assert [j["metadata"]["name"] for j in idx.children("Job", "ns", "r1")] == ["a"]
    idx.remove("Job", _obj("a"))
    assert idx.children("Job", "ns", "r1") == []
    idx.replace("Job", "ns", [_obj("d")])  # a relist drops what is gone
    assert [j["metadata"]["name"] for j in idx.children("Job", "ns", "r1")] == ["d"]
    assert idx.children("Job", "ns", "r2") == []


def test_index_is_synced_only_when_every_informer_listed():
    idx = ChildIndex()
    idx.expect("Job", None)
    idx.expect("Pod", None)
    idx.replace("Job", None, [])
    assert not idx.synced()
    idx.replace("Pod", None, [])
    assert idx.synced()


def test_slim_keeps_what_the_reconcile_reads():
    pod = slim("Pod", {"kind": "Pod", "metadata": {"name": "p", "managedFields": [1]},
                       "spec": {"nodeName": "n", "containers": [{"image": "big"}]}, "status": {"podIP": "1.2.3.4"}})
    assert pod == {"apiVersion": None, "kind": "Pod", "metadata": {"name": "p"}, "spec": {"nodeName": "n"},
                   "status": {"podIP": "1.2.3.4"}}
    job = slim("Job", {"metadata": {"name": "j"}, "spec": {"suspend": True, "template": {"x": 1}}})
    assert job["spec"] == {"suspend": True}


def test_slim_pod_status_keeps_phase_ip_conditions_and_container_states_only():
    report = '{"step": 4, "reward": 0.5, "done": true}'
    term = {"exitCode": 0, "reason": "Completed", "message": report, "finishedAt": "2026-11-27T17:00:00Z"}
    raw = {"kind": "Pod", "metadata": {"name": "p", "labels": {"job-name": "j"}},
           "status": {"phase": "Succeeded", "podIP": "10.0.0.1", "hostIP": "192.168.0.1", "qosClass": "Guaranteed",
                      "conditions": [{"type": "Ready", "status": "False"}],
                      "containerStatuses": [{"name": "trainer", "image": "img:1", "imageID": "sha256:x",
                                             "containerID": "c://1", "restartCount": 0, "ready": False,
                                             "state": {"terminated": term}, "lastState": {}}]}}
    st = slim("Pod", raw)["status"]
    assert st == {"phase": "Succeeded", "podIP": "10.0.0.1", "conditions": [{"type": "Ready", "status": "False"}],
                  "containerStatuses": [{"name": "trainer", "restartCount": 0, "state": {"terminated": term},
                                         "lastState": {}}]}
    assert st["containerStatuses"][0]["state"]["terminated"]["message"] == report  # the stage report travels


def test_compact_interns_keys_and_short_values_and_copies():
    import json
    import sys

    a, b = (json.loads('{"status": {"phase": "Succeeded", "message": "%s"}}' % ("x" * 100)) for _ in range(2))
    ca, cb = compact(a), compact(b)
    assert ca == a and ca is not a
    ka, kb = next(iter(ca["status"])), next(iter(cb["status"]))
    assert ka is kb is sys.intern("phase")  # one key object for every copy
    assert ca["status"]["phase"] is cb["status"]["phase"]
    assert ca["status"]["message"] is not cb["status"]["message"]  # long values (reports) are left alone


def test_the_run_is_held_next_to_its_children_and_forgotten_on_request():
    idx = ChildIndex()
    run = {"apiVersion": "copd.io/v1alpha1", "kind": "CoPDRun", "spec": {"x": 1},
           "metadata": {"name": "r1", "namespace": "ns", "resourceVersion": "7", "managedFields": [1]}}
    idx.upsert(RUN_KIND, run)
    assert idx.get(RUN_KIND, "ns", "r1")["spec"] == {"x": 1}
    assert "managedFields" not in idx.get(RUN_KIND, "ns", "r1")["metadata"]
    idx.remember(RUN_KIND, {**run, "metadata": {**run["metadata"], "resourceVersion": "6"}, "spec": {"x": 0}})
    assert idx.get(RUN_KIND, "ns", "r1")["spec"] == {"x": 1}  # older than what is held: ignored
    idx.forget(RUN_KIND, "ns", "r1")
    assert idx.get(RUN_KIND, "ns", "r1") is None


# -- requests: verb/resource, limit --------------------------------------------------------------


@pytest.mark.parametrize("method, url, want", [
    ("GET", "https://h/apis/copd.io/v1alpha1/namespaces/ns/copdruns/demo", ("get", "copdruns")),
    ("PUT", "https://h/apis/copd.io/v1alpha1/namespaces/ns/copdruns/demo/status", ("update", "copdruns/status")),
    ("GET", "https://h/api/v1/namespaces/ns/pods?labelSelector=copd.io%2Frun", ("list", "pods")),
    ("GET", "https://h/api/v1/pods?labelSelector=copd.io%2Frun&watch=true", ("watch", "pods")),
    ("POST", "https://h/apis/batch/v1/namespaces/ns/jobs", ("create", "jobs")),
    ("PATCH", "https://h/apis/batch/v1/namespaces/ns/jobs/j", ("patch", "jobs")),
    ("DELETE", "https://h/api/v1/namespaces/ns/pods/p", ("delete", "pods")),
    ("GET", "https://h/apis/scheduling.k8s.io/v1/priorityclasses/high", ("get", "priorityclasses")),
    ("GET", "https://h/api/v1/namespaces/ns", ("get", "namespaces")),
    ("GET", "https://h/apis/copd.io/v1alpha1", ("get", "discovery")),
    ("GET", "https://h/api", ("get", "discovery")),
    ("GET", "https://h/version", ("get", "discovery")),
])
def test_classify(method, url, want):
    assert classify(method, url) == want


def test_token_bucket_allows_burst_then_qps():
    t = [0.0]
    slept = []

    def sleep(s):
        slept.append(s)
        t[0] += s

    b = TokenBucket(qps=10, burst=3, clock=lambda: t[0], sleep=sleep)
    assert [b.take() for _ in range(3)] == [0, 0, 0]
    assert b.take() == pytest.approx(0.1)
    t[0] += 1.0  # a second later: 10 tokens accrued, capped at the burst
    assert [b.take() for _ in range(3)] == [0, 0, 0]
    assert b.take() == pytest.approx(0.1)
    assert TokenBucket(0, 1).take() == 0.0  # no limit


def test_instrument_counts_every_request():
    seen = []

    class Rest:
        def request(self, method, url, headers=None, body=None, post_params=None, _request_timeout=None):
            seen.append((method, url))
            return "ok"

    class Client:
        rest_client = Rest()

    m = CoPDMetrics()
    c = Client()
    instrument(c, qps=0, burst=1, count=m.api_request)
    assert c.rest_client.request("GET", "https://h/api/v1/namespaces/ns/pods/p") == "ok"
    c.rest_client.request("POST", "https://h/api/v1/namespaces/ns/pods", body={})
    assert len(seen) == 2
    assert m.registry.get_sample_value("copd_api_requests_total", {"verb": "get", "resource": "pods"}) == 1
    assert m.registry.get_sample_value("copd_api_requests_total", {"verb": "create", "resource": "pods"}) == 1


def test_aiohttp_counter_counts_what_an_aiohttp_session_sends():
    """kopf's session (handlers.login) carries this TraceConfig: its LIST and WATCH of the runs are counted."""
    import asyncio

    import aiohttp
    from aiohttp import web

    async def go():
        async def answer(_request):
            return web.json_response({})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", answer)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        base = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        m = CoPDMetrics()
        try:
            async with aiohttp.ClientSession(trace_configs=[aiohttp_counter(m.api_request)]) as s:
                for method, path in [("GET", "/apis/copd.io/v1alpha1/namespaces/ns/copdruns"),
                                     ("GET", "/apis/copd.io/v1alpha1/namespaces/ns/copdruns?watch=true"),
                                     ("GET", "/apis/copd.io/v1alpha1/namespaces/ns/copdruns?watch=true"),
                                     ("GET", "/apis/copd.io/v1alpha1")]:
                    async with s.request(method, base + path) as r:
                        assert r.status == 200
        finally:
            await runner.cleanup()
        return m

    m = asyncio.run(go())
    value = m.registry.get_sample_value
    assert value("copd_api_requests_total", {"verb": "list", "resource": "copdruns"}) == 1
    assert value("copd_api_requests_total", {"verb": "watch", "resource": "copdruns"}) == 2
    assert value("copd_api_requests_total", {"verb": "get", "resource": "discovery"}) == 1


# -- the work queue: events before resyncs -------------------------------------------------------


def test_event_keys_go_before_resync_keys_and_promote_them():
    m = CoPDMetrics()
    q = WorkQueue(m)
    for i in range(5):
        q.add(("ns", f"idle-{i}"), resync=True)
    q.add(("ns", "idle-3"))  # an event for a key already waiting as a resync: promoted
    q.add(("ns", "busy"))
    assert m.registry.get_sample_value("copd_workqueue_depth", {"priority": "event"}) == 2
    assert m.registry.get_sample_value("copd_workqueue_depth", {"priority": "resync"}) == 4
    got = [q.get(0.1) for _ in range(6)]
    assert got[:2] == [("ns", "idle-3"), ("ns", "busy")]
    assert got[2:] == [("ns", f"idle-{i}") for i in (0, 1, 2, 4)]
    assert q.get(0.01) is None and q.depth() == 0
    assert m.registry.get_sample_value("copd_workqueue_latency_seconds_count", {"priority": "event"}) == 2
    assert m.registry.get_sample_value("copd_workqueue_latency_seconds_count", {"priority": "resync"}) == 4


def test_a_resync_of_a_waiting_event_key_keeps_it_an_event():
    q = WorkQueue()
    q.add(("ns", "a"), resync=True)
    q.add(("ns", "b"))
    q.add(("ns", "b"), resync=True)
    assert q.get(0.1) == ("ns", "b") and q.get(0.1) == ("ns", "a") and q.get(0.01) is None


def test_queue_under_concurrent_adds_hands_each_key_out_once_at_a_time():
    q = WorkQueue()
    keys = [("ns", f"r{i}") for i in range(50)]
    out, lock = [], threading.Lock()

    def producer(resync):
        for k in keys:
            q.add(k, resync=resync)

    ts = [threading.Thread(target=producer, args=(r,)) for r in (True, False, True)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    while (k := q.get(0.05)) is not None:
        with lock:
            out.append(k)
    assert sorted(out) == sorted(keys)  # deduplicated while waiting


# -- cleanup: only Jobs whose reports the persisted status holds ---------------------------------


BRANCHES = ["arith", "reverse", "maxbox"]


def test_jobs_still_read_are_the_current_stage_the_current_diagnose_and_the_merge():
    run = run_ref()
    st = RunStatus(phase=Phase.RUNNING, stage=Stage.OPD, cycle=2,
                   branches={"arith": BranchStatus(attempt=1)})
    keep = jobs_still_read(run, BRANCHES, st)
    assert keep == {merge_job_name(run), diagnose_job_name(run, 2), stage_job_name(run, "arith", 2, "OPD", 1),
                    stage_job_name(run, "reverse", 2, "OPD"), stage_job_name(run, "maxbox", 2, "OPD")}
    assert jobs_still_read(run, BRANCHES, RunStatus(phase=Phase.SUCCEEDED, cycle=2)) == set()


def test_finished_jobs_past_the_status_get_a_ttl_once():
    run = run_ref()
    old_rl = stage_job_name(run, "arith", 1, "RL")
    old_diag = diagnose_job_name(run, 1)
    now_opd = stage_job_name(run, "arith", 2, "OPD")
    failed_attempt = stage_job_name(run, "reverse", 2, "OPD")
    running_old = stage_job_name(run, "maxbox", 1, "OPD")
    snap = (SnapB(run).job(JobB(old_rl).succeeded("")).job(JobB(old_diag).succeeded(""))
            .job(JobB(now_opd).succeeded("")).job(JobB(failed_attempt).failed("boom"))
            .job(JobB(running_old).active())).obj()
    st = RunStatus(phase=Phase.RUNNING, stage=Stage.OPD, cycle=2, branches={"reverse": BranchStatus(attempt=1)})
    ops = finished_job_cleanup(run, BRANCHES, st, snap, 30)
    assert ops == [Patch("Job", n, {"spec": {"ttlSecondsAfterFinished": 30}})
                   for n in sorted([old_rl, old_diag, failed_attempt])]
    snap.jobs[old_rl]["spec"]["ttlSecondsAfterFinished"] = 30  # patched already: not again
    assert old_rl not in {op.name for op in finished_job_cleanup(run, BRANCHES, st, snap, 30)}
    # suspended or blocked in the same stage: the current stage's Jobs are still read when it goes on
    st.phase = Phase.SUSPENDED
    assert now_opd not in {op.name for op in finished_job_cleanup(run, BRANCHES, st, snap, 30)}


# -- the run read from the index, not the apiserver ----------------------------------------------


class _Custom:
    """get_namespaced_custom_object answers from `objs` and counts the GETs."""

    def __init__(self, objs):
        self.objs, self.gets = objs, 0

    def get_namespaced_custom_object(self, group, version, ns, plural, name, _preload_content=True):
        import json
        from types import SimpleNamespace

        from kubernetes.client.rest import ApiException

        self.gets += 1
        if (ns, name) not in self.objs:
            raise ApiException(status=404, reason="Not Found")
        return SimpleNamespace(data=json.dumps(self.objs[(ns, name)]).encode())


def _apis_with_index(run_objs):
    from types import SimpleNamespace

    from copd_operator.io.gather import Ttl
    from copd_operator.io.informer import KINDS

    idx = ChildIndex()
    for k in KINDS:
        idx.expect(k, "ns")
        idx.replace(k, "ns", [])
    core = SimpleNamespace(read_namespaced_service_account=lambda name, ns, _preload_content=False: None)
    return SimpleNamespace(index=idx, custom=_Custom(run_objs), core=core, exists_cache=Ttl()), idx


def test_gather_reads_the_run_from_the_index_and_asks_only_when_it_is_not_there():
    from copd_operator.io.gather import gather

    run = {"apiVersion": "copd.io/v1alpha1", "kind": "CoPDRun", "spec": {},
           "metadata": {"name": "r1", "namespace": "ns", "uid": "u1", "resourceVersion": "3"}}
    apis, idx = _apis_with_index({("ns", "r1"): run})
    snap = gather(apis, "ns", "r1", "copd-trainer")
    assert snap.run["metadata"]["uid"] == "u1" and apis.custom.gets == 1  # not seen by the watch yet: a GET
    idx.upsert(RUN_KIND, {**run, "metadata": {**run["metadata"], "resourceVersion": "4"}})
    for _ in range(3):
        assert gather(apis, "ns", "r1", "copd-trainer").run["metadata"]["resourceVersion"] == "4"
    assert apis.custom.gets == 1  # from the index: no request
    idx.remove(RUN_KIND, run)  # deleted (the watch's DELETED): asked again, and gone
    del apis.custom.objs[("ns", "r1")]
    assert gather(apis, "ns", "r1", "copd-trainer") is None and apis.custom.gets == 2


def test_a_status_write_conflict_forgets_the_held_run_and_a_write_remembers_the_answer(monkeypatch):
    from types import SimpleNamespace

    from copd_operator import reconcile as rec
    from kubernetes.client.rest import ApiException

    from copd_core.cycle import RunStatus

    idx = ChildIndex()
    run = {"apiVersion": "copd.io/v1alpha1", "kind": "CoPDRun", "spec": {}, "status": {},
           "metadata": {"name": "r1", "namespace": "ns", "uid": "u1", "resourceVersion": "3", "generation": 1}}
    idx.upsert(RUN_KIND, run)
    r = rec.Reconciler(SimpleNamespace(index=idx), None, CoPDMetrics())  # type: ignore[arg-type]
    answer = {**run, "metadata": {**run["metadata"], "resourceVersion": "9"}, "status": {"phase": "Running"}}
    monkeypatch.setattr(rec, "write_run_status", lambda apis, obj, body: answer)
    r._write(run, {}, RunStatus(phase=Phase.RUNNING))
    assert idx.get(RUN_KIND, "ns", "r1")["metadata"]["resourceVersion"] == "9"  # the next reconcile reads it

    def conflict(apis, obj, body):
        raise ApiException(status=409, reason="Conflict")

    monkeypatch.setattr(rec, "write_run_status", conflict)
    monkeypatch.setattr(rec, "read_run", lambda apis, ns, name: {**answer, "status": {"phase": "Failed"}})
    with pytest.raises(rec.Conflict):
        r._write(answer, {"phase": "Running"}, RunStatus(phase=Phase.SUCCEEDED))
    assert idx.get(RUN_KIND, "ns", "r1") is None  # the retry reads the run from the apiserver


def test_run_events_feed_the_index_and_a_delete_drops_the_run():
    from types import SimpleNamespace

    from copd_operator import handlers
    from copd_operator.control.workqueue import WorkQueue

    idx = ChildIndex()
    queue = WorkQueue()
    rt = SimpleNamespace(queue=queue, reconciler=SimpleNamespace(apis=SimpleNamespace(index=idx),
                                                                 metrics=CoPDMetrics(), wrote=lambda *a: False))
    memo = SimpleNamespace(runtime=rt)
    raw = {"metadata": {"name": "r1", "namespace": "ns", "resourceVersion": "5"}, "spec": {"a": 1}}
    handlers.run_event(type="ADDED", name="r1", namespace="ns", body=raw, memo=memo, event={"object": raw})
    assert idx.get(RUN_KIND, "ns", "r1")["spec"] == {"a": 1} and ("ns", "r1") in queue._prio  # and enqueued
    handlers.run_event(type="DELETED", name="r1", namespace="ns", body=raw, memo=memo, event={"object": raw})
    assert idx.get(RUN_KIND, "ns", "r1") is None


def test_the_allocator_settings_apply_on_glibc_and_the_trimmer_stops():
    import platform

    from copd_operator.control import memory

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    assert memory.limit_arenas(2) is True
    assert isinstance(memory.trim(), bool)
    t = memory.Trimmer(0.01).start()
    assert t._thread.is_alive()
    t.stop()
    t._thread.join(5)
    assert not t._thread.is_alive()
