"""Stage pods for many GPUs: torchrun with one process per GPU, a memory-backed /dev/shm, and
for trainer.nodes > 1 an Indexed Job with a headless rendezvous Service."""

from copd_operator.logic import builders
from copd_operator.logic.naming import rendezvous_name, stage_job_name
from copd_operator.logic.observe import job_outcome

from tests.unit.operator.builders_test_helpers import CFG, DEMO, run_ref
from tests.unit.operator.pod_security import violations


def _gpu_run(gpu: int, nodes: int = 1, **trainer):
    run = run_ref()
    run.spec.trainer.resources.gpu = gpu
    run.spec.trainer.nodes = nodes
    for k, v in trainer.items():
        setattr(run.spec.trainer, k, v)
    return run


def _container(job):
    return job["spec"]["template"]["spec"]["containers"][0]


def test_one_gpu_runs_copd_directly_with_a_memory_backed_shm():
    job = builders.build_stage_job(_gpu_run(1), CFG, "arith", "uid-arith", 1, "RL")
    c, pod = _container(job), job["spec"]["template"]["spec"]
    assert c["command"] == list(CFG.trainer_command)
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in pod["volumes"]
    assert "completionMode" not in job["spec"]


def test_a_cpu_only_single_process_stage_is_unchanged():
    job = builders.build_stage_job(_gpu_run(0), CFG, "arith", "uid-arith", 1, "RL")
    assert _container(job)["command"] == list(CFG.trainer_command)
    assert all(v["name"] != "dshm" for v in job["spec"]["template"]["spec"]["volumes"])


def test_four_gpus_get_torchrun_with_four_processes_and_the_zero_stage():
    job = builders.build_stage_job(_gpu_run(4), CFG, "arith", "uid-arith", 2, "OPD",
                                   hub_url="http://h:1")
    c = _container(job)
    assert c["command"] == ["torchrun", "--nproc-per-node=4", "--nnodes=1", "--standalone", "--no-python",
                            *CFG.trainer_command]
    assert c["args"][0] == "stage" and "--hub-url" in c["args"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "4"
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert '"zeroStage":2' in env["COPD_MANIFEST"]  # the trainers read the stage from the spec
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    assert "completionMode" not in job["spec"]
    assert not violations(job["spec"]["template"]["spec"])


def test_two_nodes_get_an_indexed_job_and_a_headless_rendezvous_service():
    run = _gpu_run(8, nodes=2)
    job = builders.build_stage_job(run, CFG, "arith", "uid-arith", 1, "RL", attempt=1)
    name = stage_job_name(DEMO, "arith", 1, "RL", 1)
    svc_name = rendezvous_name(DEMO, "arith")
    spec, pod, c = job["spec"], job["spec"]["template"]["spec"], _container(job)
    assert (spec["completionMode"], spec["completions"], spec["parallelism"], spec["backoffLimit"]) == \
        ("Indexed", 2, 2, 0)
    assert pod["subdomain"] == svc_name
    assert c["command"][:3] == ["torchrun", "--nproc-per-node=8", "--nnodes=2"]
    assert "--rdzv-backend=c10d" in c["command"] and f"--rdzv-id={name}" in c["command"]
    assert f"--rdzv-endpoint={name}-0.{svc_name}.ns.svc:{builders.RDZV_PORT}" in c["command"]
    assert c["command"][-len(CFG.trainer_command) - 1:] == ["--no-python", *CFG.trainer_command]
    assert {"name": "rdzv", "containerPort": builders.RDZV_PORT} in c["ports"]
    assert len(f"{name}-1") <= 63  # the pod's hostname
    assert not violations(pod)

    svc = builders.build_rendezvous_service(run, "arith", "uid-arith")
    assert svc["metadata"]["name"] == svc_name and len(svc_name) <= 63
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["metadata"]["ownerReferences"][0]["kind"] == "Branch"
    # it selects exactly this branch's trainer pods
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert all(labels[k] == v for k, v in svc["spec"]["selector"].items())


def test_a_gpu_hub_gets_shm_too():
    run = run_ref()
    run.spec.trainer.hub_resources.gpu = 1
    pod = builders.build_hub_pod(run, CFG, 1)
    assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in pod["spec"]["volumes"]


def test_the_report_of_a_multi_pod_stage_comes_from_the_pod_that_wrote_one():
    def pod(name, msg, t):
        return {"metadata": {"name": name}, "status": {"containerStatuses": [{"state": {"terminated": {
            "exitCode": 0, "message": msg, "finishedAt": t}}}]}}

    job = {"metadata": {"name": "j"}, "spec": {}, "status": {"succeeded": 2}}
    out = job_outcome(job, [pod("j-0", '{"branch": "arith", "done": true}', "2026-01-01T00:00:01Z"),
                            pod("j-1", "", "2026-01-01T00:00:02Z")])
    assert out.report == {"branch": "arith", "done": True}
