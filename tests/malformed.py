"""Malformed CoPDRun manifests, each with the field a refusal must name.

Shared by the pure test (pydantic, what `copd run`/`copd validate` use) and the cluster test
(the apiserver's schema + CEL rules generated from the same model): both must refuse every case
and name the field. Fields are written as the apiserver writes them (`spec.branches[0].name`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import yaml

from tests import ROOT

Doc = dict


def example() -> Doc:
    return yaml.safe_load((ROOT / "examples/copdrun.yaml").read_text())


def _walk(doc: Doc, path: str):
    *parents, leaf = path.replace("]", "").replace("[", ".").split(".")
    node = doc
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
    return node, (int(leaf) if isinstance(node, list) else leaf)


def put(path: str, value) -> Callable[[Doc], None]:
    def mutate(doc: Doc) -> None:
        node, key = _walk(doc, path)
        node[key] = value
    return mutate


def drop(path: str) -> Callable[[Doc], None]:
    def mutate(doc: Doc) -> None:
        node, key = _walk(doc, path)
        del node[key]
    return mutate


def _dup_branch(doc: Doc) -> None:
    doc["spec"]["branches"].append({**copy.deepcopy(doc["spec"]["branches"][0]), "dataset": {"builtin": "color"}})


def _many_branches(doc: Doc) -> None:
    doc["spec"]["branches"] = [{"name": f"b{i}", "dataset": {"builtin": "arith"}} for i in range(33)]


# name -> (mutation of the whole manifest, the field the refusal must name)
MALFORMED: dict[str, tuple[Callable[[Doc], None], str]] = {
    # cross-field rules (CEL on the apiserver, model validators in pydantic)
    "duplicate branch": (_dup_branch, "duplicate branch names"),
    "hub missing": (put("spec.opd.topology", "hub-and-spoke"), "opd.hub"),
    "hub not a branch": (lambda d: d["spec"]["opd"].update(topology="hub-and-spoke", hub="nope"), "opd.hub"),
    "weights unknown": (put("spec.merge.weights", {"nope": 1.0}), "merge.weights"),
    "weights all zero": (put("spec.merge.weights", {"arith": 0.0}), "merge.weights"),
    "minCycles > cycles": (put("spec.mergeReadiness.minCycles", 9), "mergeReadiness.minCycles"),
    "two dataset sources": (put("spec.branches[0].dataset.path", "x.jsonl"), "exactly one of `builtin` or `path`"),
    "no dataset source": (put("spec.branches[0].dataset", {}), "exactly one of `builtin` or `path`"),
    "no steps": (lambda d: d["spec"]["schedule"].update(rlStepsPerCycle=0, opdStepsPerCycle=0), "cannot both be 0"),
    "bad scheme": (put("spec.baseModel.uri", "hf://Qwen/x"), "baseModel.uri"),
    "vllm at temperature 0.7": (lambda d: (put("spec.rollout.engine", "vllm")(d), put("spec.rl.temperature", 0.7)(d)),
                                "rollout.engine: vllm needs rl.temperature 1"),
    "vllm with ZeRO-3": (lambda d: (put("spec.rollout.engine", "vllm")(d), put("spec.trainer.zeroStage", 3)(d)),
                         "rollout.engine: vllm needs trainer.zeroStage 2"),
    "vllm with a VLM": (lambda d: (put("spec.rollout.engine", "vllm")(d), put("spec.baseModel.kind", "vlm")(d)),
                        "rollout.engine: vllm serves text models only"),
    "adaptive lower > upper": (put("spec.schedule.adaptive", {"lowerAlignment": 0.97, "upperAlignment": 0.9}),
                               "exceeds upperAlignment"),
    "adaptive max < min phase": (put("spec.schedule.adaptive", {"minPhaseCycles": 3, "maxPhaseCycles": 2}),
                                 "below minPhaseCycles"),
    "adaptive without OPD": (lambda d: d["spec"]["schedule"].update(mode="adaptive", opdStepsPerCycle=0),
                             "adaptive needs opdStepsPerCycle > 0"),
    "adaptive threshold > 1": (put("spec.schedule.adaptive.upperAlignment", 1.5),
                               "spec.schedule.adaptive.upperAlignment"),
    "unknown schedule mode": (put("spec.schedule.mode", "sometimes"), "spec.schedule.mode"),
    # required fields and types
    "no baseModel": (drop("spec.baseModel"), "spec.baseModel"),
    "no branches": (drop("spec.branches"), "spec.branches"),
    "branch without dataset": (drop("spec.branches[0].dataset"), "spec.branches[0].dataset"),
    "branch without name": (drop("spec.branches[1].name"), "spec.branches[1].name"),
    "empty uri": (put("spec.baseModel.uri", ""), "spec.baseModel.uri"),
    "suspend not a bool": (put("spec.suspend", "yes"), "spec.suspend"),
    "cycles not an int": (put("spec.schedule.cycles", "four"), "spec.schedule.cycles"),
    "unknown field": (put("spec.rl.learningRat", 0.1), "learningRat"),
    "unknown top-level field": (put("spec.gpus", 8), "gpus"),
    # ranges
    "one branch": (lambda d: d["spec"].update(branches=d["spec"]["branches"][:1]), "spec.branches"),
    "33 branches": (_many_branches, "spec.branches"),
    "cycles 0": (put("spec.schedule.cycles", 0), "spec.schedule.cycles"),
    "cycles 1001": (put("spec.schedule.cycles", 1001), "spec.schedule.cycles"),
    "negative rl steps": (put("spec.schedule.rlStepsPerCycle", -1), "spec.schedule.rlStepsPerCycle"),
    "group of 1": (put("spec.rl.groupSize", 1), "spec.rl.groupSize"),
    "batch of 0": (put("spec.rl.batchSize", 0), "spec.rl.batchSize"),
    "clip low 1.5": (put("spec.rl.clipEpsLow", 1.5), "spec.rl.clipEpsLow"),
    "clip high 0": (put("spec.rl.clipEpsHigh", 0), "spec.rl.clipEpsHigh"),
    "learning rate 0": (put("spec.rl.learningRate", 0), "spec.rl.learningRate"),
    "learning rate 2": (put("spec.rl.learningRate", 2.0), "spec.rl.learningRate"),
    "no new tokens": (put("spec.rl.maxNewTokens", 0), "spec.rl.maxNewTokens"),
    "temperature 0": (put("spec.rl.temperature", 0), "spec.rl.temperature"),
    "mini-batches 0": (put("spec.rl.miniBatches", 0), "spec.rl.miniBatches"),
    "negative kl": (put("spec.rl.klCoef", -0.1), "spec.rl.klCoef"),
    "beta 0": (put("spec.opd.beta", 0), "spec.opd.beta"),
    "samples per prompt 0": (put("spec.opd.samplesPerPrompt", 0), "spec.opd.samplesPerPrompt"),
    "opd batch 0": (put("spec.opd.batchSize", 0), "spec.opd.batchSize"),
    "top-k 0": (put("spec.diagnostics.topK", 0), "spec.diagnostics.topK"),
    "probe prompts 0": (put("spec.diagnostics.probePrompts", 0), "spec.diagnostics.probePrompts"),
    "overlap threshold 1.5": (put("spec.mergeReadiness.minTopkOverlap", 1.5), "spec.mergeReadiness.minTopkOverlap"),
    "negative kl threshold": (put("spec.mergeReadiness.maxSymmetricKl", -0.1), "spec.mergeReadiness.maxSymmetricKl"),
    "minCycles 0": (put("spec.mergeReadiness.minCycles", 0), "spec.mergeReadiness.minCycles"),
    "merge scale 0": (put("spec.merge.scale", 0), "spec.merge.scale"),
    "gpu -1": (put("spec.trainer.resources.gpu", -1), "spec.trainer.resources.gpu"),
    "gpu 65": (put("spec.trainer.resources.gpu", 65), "spec.trainer.resources.gpu"),
    "per-branch beta 0": (put("spec.branches[0].beta", 0), "spec.branches[0].beta"),
    "dataset size 1": (put("spec.branches[0].dataset.size", 1), "spec.branches[0].dataset.size"),
    "negative tolerance": (put("spec.branches[0].reward.tolerance", -1), "spec.branches[0].reward.tolerance"),
    "negative seed": (put("spec.seed", -1), "spec.seed"),
    "long branch name": (put("spec.branches[0].name", "b" * 41), "spec.branches[0].name"),
    # enums and patterns
    "bad enum": (put("spec.opd.topology", "ring"), "spec.opd.topology"),
    "bad truncation": (put("spec.rl.truncation", "drop"), "spec.rl.truncation"),
    "bad merge method": (put("spec.merge.method", "ties"), "spec.merge.method"),
    "bad whenNotReady": (put("spec.merge.whenNotReady", "retry"), "spec.merge.whenNotReady"),
    "bad model kind": (put("spec.baseModel.kind", "diffusion"), "spec.baseModel.kind"),
    "bad rollout engine": (put("spec.rollout.engine", "sglang"), "spec.rollout.engine"),
    "vllm memory fraction 1": (put("spec.rollout.gpuMemoryUtilization", 1.0), "spec.rollout.gpuMemoryUtilization"),
    "bad builtin domain": (put("spec.branches[0].dataset.builtin", "chess"), "spec.branches[0].dataset.builtin"),
    "bad verifier": (put("spec.branches[0].reward.verifier", "fuzzy"), "spec.branches[0].reward.verifier"),
    "bad branch name": (put("spec.branches[0].name", "Bad_Name"), "spec.branches[0].name"),
    "bad access mode": (put("spec.storage.accessMode", "ReadOnlyMany"), "spec.storage.accessMode"),
    "bad claim name": (put("spec.storage.claimName", "Bad_Claim"), "spec.storage.claimName"),
    "bad storage size": (put("spec.storage.size", "ten gigs"), "spec.storage.size"),
    "bad cpu": (put("spec.trainer.resources.cpu", "lots"), "spec.trainer.resources.cpu"),
    "bad memory": (put("spec.trainer.resources.memory", "4 GB"), "spec.trainer.resources.memory"),
    "bad toleration operator": (put("spec.trainer.tolerations[0].operator", "Maybe"),
                                "spec.trainer.tolerations[0].operator"),
    "bad toleration effect": (put("spec.trainer.tolerations[0].effect", "Never"), "spec.trainer.tolerations[0].effect"),
}


def malformed(case: str) -> Doc:
    doc = example()
    MALFORMED[case][0](doc)
    return doc
