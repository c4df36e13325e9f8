"""Fleet scale pieces, pure or in-process: the child index, the request counter/limiter, the two-level
work queue, and which finished Jobs may be cleaned up."""

import threading

import pytest
from copd_operator.control.workqueue import WorkQueue
from copd_operator.io.apiclient import TokenBucket, aiohttp_counter, classify, instrument
from copd_operator.io.informer import ChildIndex, slim
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
