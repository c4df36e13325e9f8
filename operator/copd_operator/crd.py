"""Generate the CRDs in crds/ from the pydantic models (the single source of truth).

    python -m copd_operator.crd --out crds/          write crds/*.yaml
    python -m copd_operator.crd --out crds/ --check  exit 1 if crds/ drifted

The pydantic JSON schema is turned into a Kubernetes *structural* schema:
`$ref`s inlined, `anyOf [X, null]` collapsed to X (omit a field instead of
writing null), JSON-Schema-2020 exclusive bounds rewritten to OpenAPI v3.0,
`additionalProperties: false` dropped (the apiserver rejects unknown fields
under `kubectl apply`'s strict field validation instead), `default: {}` added
to optional objects so the apiserver fills nested defaults exactly like pydantic.

Cross-field checks of `CoPDRunSpec._cross_field` & co. cannot be expressed in
JSON schema; they are re-stated below as CEL rules (`x-kubernetes-validations`),
each next to the pydantic validator it mirrors. tests/operator/test_crd.py feeds
the same bad manifests to pydantic and to the CEL rules' expectations, and
tests/cluster/test_operator_admission.py to the real apiserver.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from copd_core.cycle import RunStatus
from copd_core.spec import LABEL_VALUE, QUALIFIED_NAME, RESERVED_POD_KEYS, CoPDRunSpec
from copd_operator.api import BranchCRSpec, BranchCRStatus
from copd_operator.logic.naming import BRANCH_KIND, BRANCH_PLURAL, GROUP, RUN_KIND, RUN_PLURAL, VERSION

# A qualified key (spec.QUALIFIED_NAME; the name part at most 63, the prefix at most 253) not reserved.
_KEY_OK = (f"k.matches('{QUALIFIED_NAME}') && size(k) <= 317 "
           "&& (k.contains('/') ? size(k.split('/')[1]) <= 63 && size(k.split('/')[0]) <= 253 : size(k) <= 63)")
_NOT_RESERVED = " && ".join(f"!k.startsWith('{r}')" if r.endswith("/") else f"k != '{r}'"
                            for r in RESERVED_POD_KEYS)

# CEL rules keyed by the path (camelCase property names from spec) of the object they sit on.
RUN_SPEC_RULES: dict[tuple[str, ...], list[dict]] = {
    (): [
        {   # CoPDRunSpec._cross_field: duplicate names
            "rule": "self.branches.all(b, self.branches.exists_one(c, c.name == b.name))",
            "message": "branches: duplicate branch names", "fieldPath": ".branches",
        },
        {   # hub-and-spoke needs a hub
            "rule": "!has(self.opd) || !has(self.opd.topology) || self.opd.topology != 'hub-and-spoke' "
                    "|| has(self.opd.hub)",
            "message": "opd.hub: required when opd.topology is hub-and-spoke", "fieldPath": ".opd.hub",
        },
        {   # the hub must be a branch
            "rule": "!has(self.opd) || !has(self.opd.hub) || self.branches.exists(b, b.name == self.opd.hub)",
            "message": "opd.hub: is not a branch name", "fieldPath": ".opd.hub",
        },
        {   # merge weights name branches
            "rule": "!has(self.merge) || !has(self.merge.weights) "
                    "|| self.merge.weights.all(k, self.branches.exists(b, b.name == k))",
            "message": "merge.weights: every key must be a branch name", "fieldPath": ".merge.weights",
        },
        {   # rollout.engine vllm: temperature 1 (vLLM's prompt log-probs are at temperature 1)
            "rule": "!has(self.rollout) || !has(self.rollout.engine) || self.rollout.engine != 'vllm' "
                    "|| !has(self.rl) || !has(self.rl.temperature) || self.rl.temperature == 1.0",
            "message": "rollout.engine: vllm needs rl.temperature 1", "fieldPath": ".rollout.engine",
        },
        {   # rollout.engine vllm: text models only
            "rule": "!has(self.rollout) || !has(self.rollout.engine) || self.rollout.engine != 'vllm' "
                    "|| !has(self.baseModel.kind) || self.baseModel.kind != 'vlm'",
            "message": "rollout.engine: vllm serves text models only (baseModel.kind vlm)",
            "fieldPath": ".rollout.engine",
        },
        {   # rollout.engine vllm: whole weights in every trainer process
            "rule": "!has(self.rollout) || !has(self.rollout.engine) || self.rollout.engine != 'vllm' "
                    "|| !has(self.trainer) || !has(self.trainer.zeroStage) || self.trainer.zeroStage != 3",
            "message": "rollout.engine: vllm needs trainer.zeroStage 2", "fieldPath": ".rollout.engine",
        },
        {   # readiness cannot start after the last cycle
            "rule": "!has(self.mergeReadiness) || !has(self.mergeReadiness.minCycles) "
                    "|| self.mergeReadiness.minCycles <= (has(self.schedule) && has(self.schedule.cycles) "
                    "? self.schedule.cycles : 4)",
            "message": "mergeReadiness.minCycles: exceeds schedule.cycles", "fieldPath": ".mergeReadiness.minCycles",
        },
    ],
    ("baseModel",): [
        {"rule": "self == oldSelf", "message": "baseModel: immutable once the run exists"},
        {   # BaseModelSpec._known_scheme
            "rule": "!self.uri.contains('://') || self.uri.startsWith('file://') "
                    "|| self.uri.startsWith('storage://') || self.uri.startsWith('builtin://')",
            "message": "baseModel.uri: unsupported scheme: use file://, storage://, builtin:// or a path",
            "fieldPath": ".uri",
        },
    ],
    ("branches",): [
        {"rule": "self == oldSelf", "message": "branches: immutable once the run exists"},
    ],
    ("branches", "[]", "dataset"): [
        {   # DatasetSpec._exactly_one_source
            "rule": "has(self.builtin) != has(self.path)",
            "message": "dataset: set exactly one of `builtin` or `path`",
        },
    ],
    ("schedule",): [
        {   # ScheduleSpec._some_work
            "rule": "self.rlStepsPerCycle + self.opdStepsPerCycle > 0",
            "message": "schedule: rlStepsPerCycle and opdStepsPerCycle cannot both be 0",
        },
        {   # ScheduleSpec._some_work: adaptive decides which directions use the OPD steps
            "rule": "!has(self.mode) || self.mode != 'adaptive' || self.opdStepsPerCycle > 0",
            "message": "schedule.mode: adaptive needs opdStepsPerCycle > 0", "fieldPath": ".mode",
        },
    ],
    ("schedule", "adaptive"): [
        {   # AdaptiveSpec._ordered
            "rule": "!has(self.lowerAlignment) || !has(self.upperAlignment) "
                    "|| self.lowerAlignment <= self.upperAlignment",
            "message": "schedule.adaptive.lowerAlignment: exceeds upperAlignment (a direction starts distilling "
                       "below lowerAlignment and stops above upperAlignment)", "fieldPath": ".lowerAlignment",
        },
        {   # AdaptiveSpec._ordered
            "rule": "!has(self.maxPhaseCycles) || self.maxPhaseCycles >= (has(self.minPhaseCycles) "
                    "? self.minPhaseCycles : 1)",
            "message": "schedule.adaptive.maxPhaseCycles: is below minPhaseCycles", "fieldPath": ".maxPhaseCycles",
        },
    ],
    ("merge",): [
        {   # MergeSpec._non_negative (each value >= 0 is a schema bound)
            "rule": "!has(self.weights) || self.weights.exists(k, self.weights[k] > 0.0)",
            "message": "merge.weights: must not all be 0", "fieldPath": ".weights",
        },
    ],
    ("storage",): [
        {   # all but retainPolicy, which decides only what deleting the run does (the claim follows it)
            "rule": "self.path == oldSelf.path && self.size == oldSelf.size && self.accessMode == oldSelf.accessMode"
                    " && has(self.claimName) == has(oldSelf.claimName)"
                    " && (!has(self.claimName) || self.claimName == oldSelf.claimName)"
                    " && has(self.storageClassName) == has(oldSelf.storageClassName)"
                    " && (!has(self.storageClassName) || self.storageClassName == oldSelf.storageClassName)",
            "message": "storage: immutable once the run exists, but for retainPolicy",
        },
    ],
    ("seed",): [
        {"rule": "self == oldSelf", "message": "seed: immutable once the run exists"},
    ],
    ("trainer", "podLabels"): [
        {   # TrainerSpec._pod_labels
            "rule": f"self.all(k, {_KEY_OK})",
            "message": "trainer.podLabels: every key must be a valid label key (an optional DNS prefix and '/', "
                       "then at most 63 characters: letters, digits, '-', '_', '.')",
        },
        {"rule": f"self.all(k, {_NOT_RESERVED})",
         "message": "trainer.podLabels: keys under copd.io/, batch.kubernetes.io/, kueue.x-k8s.io/, "
                    "app.kubernetes.io/managed-by, job-name and controller-uid are reserved"},
        {"rule": f"self.all(k, self[k].matches('{LABEL_VALUE}'))",
         "message": "trainer.podLabels: every value must be a valid label value (at most 63 characters: "
                    "letters, digits, '-', '_', '.', starting and ending alphanumeric)"},
    ],
    ("trainer", "podAnnotations"): [
        {   # TrainerSpec._pod_annotations
            "rule": f"self.all(k, {_KEY_OK})",
            "message": "trainer.podAnnotations: every key must be a valid annotation key (an optional DNS prefix "
                       "and '/', then at most 63 characters: letters, digits, '-', '_', '.')",
        },
        {"rule": f"self.all(k, {_NOT_RESERVED})",
         "message": "trainer.podAnnotations: keys under copd.io/, batch.kubernetes.io/, kueue.x-k8s.io/, "
                    "app.kubernetes.io/managed-by, job-name and controller-uid are reserved"},
    ],
}

# Bounds pydantic cannot express but the apiserver needs for CEL cost estimation.
RUN_SPEC_EXTRA: dict[tuple[str, ...], dict] = {
    ("merge", "weights"): {"maxProperties": 32},
    ("trainer", "env"): {"maxProperties": 256},
    ("trainer", "nodeSelector"): {"maxProperties": 64},
    ("trainer", "imagePullSecrets"): {"maxItems": 32},
    ("trainer", "tolerations"): {"maxItems": 64},
    ("trainer", "podLabels", "*"): {"maxLength": 63},
    ("trainer", "podAnnotations", "*"): {"maxLength": 65536},
    ("merge", "weights", "*"): {"minimum": 0},
}

# Root rule: the run's name is the value of the label copd.io/run on every child (<= 63); children's
# names are cut to fit and hashed (naming.py), so a long run name costs readability, not correctness.
# ObjectMeta in spec.py says the same.
RUN_ROOT_RULES = [
    {"rule": "size(self.metadata.name) <= 63", "message": "metadata.name: at most 63 characters"},
]


# ---------------------------------------------------------------------------
# pydantic JSON schema -> structural schema


def _resolve(node: dict, defs: dict) -> dict:
    if "$ref" in node:
        target = copy.deepcopy(defs[node["$ref"].split("/")[-1]])
        rest = {k: v for k, v in node.items() if k != "$ref"}
        target.update(rest)
        return _resolve(target, defs)
    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"cannot make a structural schema of anyOf {node['anyOf']}")
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        merged = _resolve(options[0], defs)
        merged.update(rest)
        return merged
    return node


def structural(node: dict, defs: dict, object_defaults: bool = True) -> dict:
    node = _resolve(node, defs)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("title", "$defs"):
            continue
        if key == "additionalProperties":
            if isinstance(value, dict):
                out[key] = structural(value, defs, object_defaults)
            continue
        if key == "properties":
            out[key] = {name: structural(sub, defs, object_defaults) for name, sub in value.items()}
            continue
        if key == "items":
            out[key] = structural(value, defs, object_defaults)
            continue
        if key == "default" and value is None:
            continue
        if key == "exclusiveMinimum":
            out["minimum"], out["exclusiveMinimum"] = value, True
            continue
        if key == "exclusiveMaximum":
            out["maximum"], out["exclusiveMaximum"] = value, True
            continue
        if key == "const":
            out["enum"] = [value]
            continue
        out[key] = value
    if "enum" in out and "type" not in out:
        out["type"] = "string" if all(isinstance(v, str) for v in out["enum"]) else "integer"
    if out.get("type") == "object" and "properties" not in out and "additionalProperties" not in out:
        out["x-kubernetes-preserve-unknown-fields"] = True
    if object_defaults and out.get("type") == "object" and "properties" in out:
        required = set(out.get("required", []))
        for name, sub in out["properties"].items():
            if (name not in required and sub.get("type") == "object" and "properties" in sub
                    and "default" not in sub and not sub.get("required")):
                sub["default"] = _defaults_of(sub)
    return _order(out)


def _defaults_of(obj: dict) -> dict:
    """The object pydantic would build from `{}`: the apiserver validates a default as written."""
    out = {}
    for name, sub in obj.get("properties", {}).items():
        if "default" in sub:
            out[name] = copy.deepcopy(sub["default"])  # no shared objects: the YAML gets no anchors
    return out


_KEY_ORDER = ["description", "type", "format", "enum", "default", "minimum", "exclusiveMinimum", "maximum",
              "exclusiveMaximum", "minLength", "maxLength", "pattern", "minItems", "maxItems", "maxProperties",
              "required", "properties", "items", "additionalProperties"]


def _order(d: dict) -> dict:
    rank = {k: i for i, k in enumerate(_KEY_ORDER)}
    return dict(sorted(d.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0])))


def model_schema(model: type[BaseModel], object_defaults: bool = True) -> dict:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.get("$defs", {})
    schema = structural({k: v for k, v in raw.items() if k != "$defs"}, defs, object_defaults)
    return schema


def _at(schema: dict, path: tuple[str, ...]) -> dict:
    node = schema
    for part in path:
        if part == "[]":
            node = node["items"]
        elif part == "*":
            node = node["additionalProperties"]
        else:
            node = node["properties"][part]
    return node


def run_spec_schema() -> dict:
    schema = model_schema(CoPDRunSpec)
    for path, extra in RUN_SPEC_EXTRA.items():
        _at(schema, path).update(extra)
    for path, rules in RUN_SPEC_RULES.items():
        _at(schema, path).setdefault("x-kubernetes-validations", []).extend(copy.deepcopy(rules))
    return schema


def _crd(kind: str, plural: str, short: list[str], spec: dict, status: dict, columns: list[dict],
         root_rules: list[dict] | None = None, description: str = "") -> dict:
    root: dict[str, Any] = {
        "type": "object",
        "description": description,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }
    if root_rules:
        root["x-kubernetes-validations"] = root_rules
    names = {"kind": kind, "listKind": f"{kind}List", "plural": plural, "singular": kind.lower(),
             "categories": ["copd"]}
    if short:
        names["shortNames"] = short
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "names": names,
            "scope": "Namespaced",
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": columns,
                "schema": {"openAPIV3Schema": root},
            }],
        },
    }


def copdrun_crd() -> dict:
    columns = [
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Cycle", "type": "integer", "jsonPath": ".status.cycle"},
        {"name": "Stage", "type": "string", "jsonPath": ".status.stage"},
        {"name": "Queue", "type": "string", "jsonPath": ".status.queue.name",
         "description": "The Kueue LocalQueue of a queued run"},
        {"name": "Admission", "type": "string", "jsonPath": ".status.queue.state",
         "description": "Queued: waiting for quota; Admitted; QueueNotFound"},
        {"name": "Overlap", "type": "number", "jsonPath": ".status.minTopkOverlap",
         "description": "Lowest top-k overlap of any direction in the latest cycle"},
        {"name": "SymKL", "type": "number", "jsonPath": ".status.maxSymmetricKl",
         "description": "Highest symmetric KL of any direction in the latest cycle"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]
    return _crd(RUN_KIND, RUN_PLURAL, ["crun"], run_spec_schema(), model_schema(RunStatus, object_defaults=False),
                columns, RUN_ROOT_RULES,
                "A Co-Evolving Policy Distillation run: K branches of one base model alternate RL and mutual "
                "on-policy distillation, then merge.")


def branch_crd() -> dict:
    columns = [
        {"name": "Run", "type": "string", "jsonPath": ".spec.run"},
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Cycle", "type": "integer", "jsonPath": ".status.cycle"},
        {"name": "Stage", "type": "string", "jsonPath": ".status.stage"},
        {"name": "Step", "type": "integer", "jsonPath": ".status.step"},
        {"name": "Reward", "type": "number", "jsonPath": ".status.reward"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]
    return _crd(BRANCH_KIND, BRANCH_PLURAL, [], model_schema(BranchCRSpec, False),
                model_schema(BranchCRStatus, False), columns,
                description="One branch of a CoPDRun (owned by it): the stage the run wants, what its trainer "
                            "reported.")


HEADER = "# GENERATED by `python -m copd_operator.crd --out crds/` from copd_core.spec; do not edit.\n"


def render() -> dict[str, str]:
    dump = lambda d: HEADER + yaml.safe_dump(d, sort_keys=False, width=100, allow_unicode=True)  # noqa: E731
    return {f"{RUN_PLURAL}.{GROUP}.yaml": dump(copdrun_crd()), f"{BRANCH_PLURAL}.{GROUP}.yaml": dump(branch_crd())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("crds"))
    p.add_argument("--check", action="store_true", help="exit 1 when the files differ from the model")
    a = p.parse_args(argv)
    drift = []
    for name, text in render().items():
        path = a.out / name
        if a.check:
            if not path.exists() or path.read_text() != text:
                drift.append(str(path))
        else:
            a.out.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if drift:
        print(f"CRDs drifted from the model (run python -m copd_operator.crd --out {a.out}): {drift}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
