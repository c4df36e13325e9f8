"""Shared by the model tests."""

import torch


class SamplerLogits:
    """Wraps `policy.model.generate` to keep the logits the sampler drew from
    (`sample()` itself no longer asks for them: π_old is the trainer's own forward)."""

    def __init__(self, policy):
        self.policy, self.logits = policy, None
        self._generate = policy.model.generate

    def __enter__(self):
        def generate(**kwargs):
            out = self._generate(**kwargs, output_logits=True, return_dict_in_generate=True)
            self.logits = torch.stack(out.logits, 1)  # [N, R, V], before temperature
            return out.sequences

        self.policy.model.generate = generate
        return self

    def __exit__(self, *exc):
        del self.policy.model.generate  # back to the class's method

    def behaviour_logprobs(self, rollout, temperature: float) -> torch.Tensor:
        """log π(y) under the sampler's own logits, at the response positions [N, L]."""
        from copd_runtime.maths.losses import token_logprobs_B_T
        from copd_runtime.models.vlm import mask_vision_logits

        logits = self.logits
        if self.policy.is_vlm:
            logits = mask_vision_logits(self.policy.model.config, logits)
        R = logits.shape[1]
        gen = rollout.input_ids[:, -R:]
        lp = token_logprobs_B_T(logits, gen, temperature)
        out = torch.zeros(rollout.input_ids.shape)
        out[:, -R:] = lp
        return out * rollout.response_mask
