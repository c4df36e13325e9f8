"""Tiny models of real architectures, built locally (no model hub).

`builtin://tiny-qwen3` is a random-init Qwen3 with a character-level tokenizer
built with the `tokenizers` library, then warm-started by a short supervised
step on the built-in text domains, so that RL starts with some signal but far
from perfect. `builtin://tiny-qwen3-vl` is the same idea for Qwen3-VL (see
vision_data.py). Both are deterministic given their seed.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from .data import Example, text_examples
from .models import Policy, save_policy

CHARS = list(" abcdefghijklmnopqrstuvwxyz0123456789+-*/=.,:;?!()[]{}<>\\_")
SPECIALS = ["<|endoftext|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
TEXT_DOMAINS_FOR_BASE = ("arith", "reverse", "maxbox")


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    vocab["[UNK]"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="[UNK]"
    )
    fast.add_special_tokens({"additional_special_tokens": SPECIALS[2:]})
    return fast


def tiny_qwen3_config(vocab_size: int) -> Qwen3Config:
    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=1,
        pad_token_id=0,
    )


def sft_warm_start(
    policy: Policy, examples: list[Example], steps: int, lr: float = 3e-3, batch: int = 32, seed: int = 0
) -> list[float]:
    """Teacher-forced cross-entropy on answer tokens (+EOS). Returns the loss curve.

    Same layout as a rollout, [left-padded prompt | answer | right pad], with the
    prompts encoded like a rollout's (the processor for a VLM, vision tensors included).
    """
    from .rollout import encode_prompts, forward_logits

    rng = random.Random(seed)
    tok = policy.tokenizer
    opt = torch.optim.AdamW(policy.model.parameters(), lr=lr, weight_decay=0.0)
    policy.model.train()
    losses = []
    for _ in range(steps):
        rows = rng.sample(examples, min(batch, len(examples)))
        enc = encode_prompts(policy, rows)
        p_ids, p_mask = enc.pop("input_ids"), enc.pop("attention_mask")
        answers = [tok(e.answer, add_special_tokens=False)["input_ids"] + [policy.eos_id] for e in rows]
        A = max(map(len, answers))
        a_ids = torch.tensor([a + [policy.pad_id] * (A - len(a)) for a in answers])
        a_mask = torch.tensor([[1] * len(a) + [0] * (A - len(a)) for a in answers])
        input_ids = torch.cat([p_ids, a_ids], 1)
        mask = torch.cat([p_mask, a_mask], 1)
        labels = torch.cat([torch.full_like(p_ids, -100), a_ids.masked_fill(a_mask == 0, -100)], 1)
        logits = forward_logits(policy, input_ids, mask, enc)
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    policy.model.eval()
    return losses


def build_tiny_qwen3(seed: int = 0, warm_steps: int = 200) -> Policy:
    torch.manual_seed(seed)
    tok = build_char_tokenizer()
    model = Qwen3ForCausalLM(tiny_qwen3_config(len(tok)))
    policy = Policy(model=model, tokenizer=tok)
    if warm_steps:
        examples = [e for d in TEXT_DOMAINS_FOR_BASE for e in text_examples(d, 2000, seed + 7)]
        sft_warm_start(policy, examples, warm_steps, seed=seed)
    return policy


def build_builtin(name: str, dest: Path) -> None:
    if name == "tiny-qwen3":
        save_policy(build_tiny_qwen3(), dest)
    elif name == "tiny-qwen3-vl":
        from .vision_data import build_tiny_qwen3_vl

        save_policy(build_tiny_qwen3_vl(), dest)
    else:
        raise ValueError(f"unknown builtin model {name!r}")
