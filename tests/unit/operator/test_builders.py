import json

from copd_operator.logic import builders
from copd_operator.logic.naming import (
    branch_cr_name,
    dns_name,
    hub_name,
    hub_port_for,
    pvc_name,
    stage_job_name,
)

from copd_core.spec import Toleration, parse_manifest
from tests.unit.operator.builders_test_helpers import CFG, DEMO, run_ref


def test_names_are_deterministic_and_fit_a_dns_label():
    assert stage_job_name(DEMO, "arith", 2, "OPD") == stage_job_name(DEMO, "arith", 2, "OPD")
    assert stage_job_name(DEMO, "arith", 2, "OPD").startswith("demo-arith-c2-opd-")
    long = dns_name("r" * 53, "b" * 40, "c12", "OPD")
    assert len(long) <= 63 and long == dns_name("r" * 53, "b" * 40, "c12", "OPD")
    assert 10000 <= hub_port_for("ns", "demo", 1) < 20000


def test_stage_job_carries_gpu_scheduling_and_the_manifest():
    run = run_ref()
    run.spec.trainer.node_selector = {"nvidia.com/gpu.present": "true"}
    run.spec.trainer.tolerations = [Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")]
    run.spec.trainer.priority_class_name = "training"
    run.spec.trainer.image_pull_secrets = ["regcred"]
    job = builders.build_stage_job(run, CFG, "arith", "uid-arith", 1, "OPD", hub_url="http://1.2.3.4:9")
    assert job["metadata"]["name"] == stage_job_name(DEMO, "arith", 1, "OPD")
    assert job["metadata"]["ownerReferences"][0]["kind"] == "Branch"
    pod = job["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert c["resources"]["requests"] == {"cpu": "2", "memory": "4Gi"}
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["priorityClassName"] == "training" and pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["serviceAccountName"] == "copd-trainer" and pod["restartPolicy"] == "Never"
    assert c["command"] == ["python", "-m", "copd_runtime.cli"]
    assert c["args"][:1] == ["stage"] and "--hub-url" in c["args"] and "/dev/termination-log" in c["args"]
    env = {e["name"]: e["value"] for e in c["env"]}
    doc = json.loads(env["COPD_MANIFEST"])
    assert parse_manifest(doc).spec == run.spec  # the pod runs exactly the spec the operator decided on
    assert c["volumeMounts"][0] == {"name": "storage", "mountPath": "/copd"}
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == pvc_name(DEMO)


SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def test_only_stage_pods_get_a_short_lived_token_and_name_their_branch():
    run = run_ref()
    job = builders.build_stage_job(run, CFG, "arith", "uid-arith", 2, "RL")
    pod = job["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert pod["automountServiceAccountToken"] is False  # no automount: this one explicit volume
    assert {"name": "kube-api-access", "mountPath": SA_DIR, "readOnly": True} in c["volumeMounts"]
    (vol,) = [v for v in pod["volumes"] if v["name"] == "kube-api-access"]
    sources = vol["projected"]["sources"]
    token = sources[0]["serviceAccountToken"]
    assert token["path"] == "token" and 600 <= token["expirationSeconds"] <= 3600 and "audience" not in token
    assert sources[1]["configMap"] == {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}
    assert sources[2]["downwardAPI"]["items"][0]["fieldRef"]["fieldPath"] == "metadata.namespace"
    args = c["args"]
    assert args[args.index("--branch-object") + 1] == branch_cr_name(DEMO, "arith")  # the Branch that owns the Job
    assert args[args.index("--api-credentials") + 1] == SA_DIR  # explicit: the process node rewrites it
    assert job["metadata"]["ownerReferences"][0]["name"] == branch_cr_name(DEMO, "arith")
    others = [builders.build_hub_pod(run, CFG, 1)["spec"],
              builders.build_diagnose_job(run, CFG, 1)["spec"]["template"]["spec"],
              builders.build_merge_job(run, CFG)["spec"]["template"]["spec"]]
    for spec in others:
        assert spec["automountServiceAccountToken"] is False
        assert [v["name"] for v in spec["volumes"]] == ["storage"]
        assert all(m["mountPath"] != SA_DIR for m in spec["containers"][0]["volumeMounts"])
        assert "--branch-object" not in spec["containers"][0]["args"]


def test_no_gpu_limit_when_zero_and_merge_never_asks_for_gpus():
    run = run_ref()
    merge = builders.build_merge_job(run, CFG)
    assert "nvidia.com/gpu" not in merge["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert merge["metadata"]["ownerReferences"][0]["kind"] == "CoPDRun"
    assert "--output" in merge["spec"]["template"]["spec"]["containers"][0]["args"]


def test_pvc_reuses_claim_or_is_created_from_storage():
    run = run_ref()
    pvc = builders.build_pvc(run)
    assert pvc["spec"]["resources"]["requests"]["storage"] == "1Gi"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    doc = run_ref().spec.model_dump(by_alias=True)
    doc["storage"]["claimName"] = "shared"
    assert builders.claim_name(run_ref(storage=doc["storage"])) == "shared"


def test_hub_address_modes():
    run = run_ref()
    svc_cfg = builders.OperatorConfig(hub_address="service")
    assert builders.hub_url(run, svc_cfg, 2, None) == f"http://{hub_name(DEMO, 2)}.ns.svc:8000"
    assert builders.hub_url(run, CFG, 2, None) is None
    port = hub_port_for("ns", "demo", 2)
    assert builders.hub_url(run, CFG, 2, "127.0.0.1") == f"http://127.0.0.1:{port}"
    pod = builders.build_hub_pod(run, CFG, 2)
    assert str(port) in pod["spec"]["containers"][0]["args"] and pod["spec"]["restartPolicy"] == "Always"
