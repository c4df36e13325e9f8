"""One rank of the 2-process DeepSpeed test (test_zero_data_parallel.py), started by torchrun.

    python -m torch.distributed.run --standalone --nproc-per-node=2 -m tests.model.zero_worker \
        MODEL_DIR CASE_FILE OUT_DIR ZERO_STAGE

Each rank takes its share of the case's GRPO groups and runs two `policy_update`s through
`ZeroOptimizer`, saving the sharded state after the first; then a fresh engine loads that
state and runs the second update again (a resume). Rank 0 writes the weights after each.
"""

import sys
from pathlib import Path

import torch

from copd_core.spec import RLSpec
from copd_runtime.models import distributed
from copd_runtime.models.device import placement
from copd_runtime.models.distributed import ZeroOptimizer
from copd_runtime.models.policy import load_policy
from copd_runtime.recipes.grpo import policy_update
from copd_runtime.rollout import teacher_scores


def main(model_dir: str, case_file: str, out_dir: str, zero_stage: str) -> None:
    out = Path(out_dir)
    place = placement("fp32", device="cpu")
    distributed.init(place)
    case = torch.load(case_file, weights_only=False)
    rollout, adv, G = case["rollout"], case["advantages"], case["group_size"]
    groups = distributed.share(list(range(len(rollout) // G)))
    rows = [g * G + j for g in groups for j in range(G)]
    sub, adv_r = rollout.select(rows), adv[rows]
    rl = RLSpec(**case["rl"])

    def update(pol, opt):
        mask = sub.response_mask
        return policy_update(pol, opt, sub, adv_r[:, None] * mask, mask, rl)

    def params(pol, opt):
        full = opt.full_state_dict()  # ZeRO-3: gathered onto rank 0 (every rank takes part)
        if full is not None:
            return {n: t.detach().clone() for n, t in full.items()}
        return {n: p.detach().clone() for n, p in pol.model.named_parameters()}

    pol = load_policy(model_dir, placement=place)
    opt = ZeroOptimizer(pol.model, case["lr"], int(zero_stage), bf16=False)
    partitioned = [n for n, p in pol.model.named_parameters() if p.numel() == 0]  # ZeRO-3: slices only
    stats1 = update(pol, opt)
    after1 = params(pol, opt)
    opt.save(out / "ckpt")
    stats2 = update(pol, opt)
    after2 = params(pol, opt)

    resumed = load_policy(model_dir, placement=place)  # the base weights: the checkpoint must restore them
    opt2 = ZeroOptimizer(resumed.model, case["lr"], int(zero_stage), bf16=False)
    opt2.load(out / "ckpt")
    update(resumed, opt2)
    resumed2 = params(resumed, opt2)
    scores = teacher_scores(resumed, sub, 1.0, 4)  # the LM head's top-k too, under ZeRO-3 through its module
    if distributed.rank() == 0:
        torch.save({"after1": after1, "after2": after2, "resumed2": resumed2, "stats1": stats1,
                    "stats2": stats2, "world": distributed.world_size(), "partitioned": partitioned,
                    "scores": scores, "rows": rows},
                   out / "result.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
