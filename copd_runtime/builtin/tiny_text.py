"""Tiny models of real architectures, built locally (no model hub).

`builtin://tiny-qwen3` is a random-init Qwen3 with a character-level tokenizer
built with the `tokenizers` library, then warm-started by a short supervised
step on the built-in text domains, so that RL starts with some signal but far
from perfect. `builtin://tiny-qwen3-vl` is the same idea for Qwen3-VL (see
tiny_vlm.py). Both are deterministic given their seed.
"""

from __future__ import annotations

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from copd_runtime.builtin.warm_start import sft_warm_start
from copd_runtime.data.datasets import text_examples
from copd_runtime.models.policy import Policy

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


def build_tiny_qwen3(seed: int = 0, warm_steps: int = 200) -> Policy:
    torch.manual_seed(seed)
    tok = build_char_tokenizer()
    model = Qwen3ForCausalLM(tiny_qwen3_config(len(tok)))
    policy = Policy(model=model, tokenizer=tok)
    if warm_steps:
        examples = [e for d in TEXT_DOMAINS_FOR_BASE for e in text_examples(d, 2000, seed + 7)]
        sft_warm_start(policy, examples, warm_steps, seed=seed)
    return policy
