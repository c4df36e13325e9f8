"""The tiny Qwen3-VL of `builtin://tiny-qwen3-vl`: small enough for CPU.

Random-init Qwen3-VL (text: hidden 64, 2 layers; vision: depth 2, hidden 32,
patch 8) with a processor built offline from the character tokenizer, warm-started
briefly on color/motion plus the text domains.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import torch

from copd_runtime.builtin.tiny_text import build_char_tokenizer
from copd_runtime.builtin.warm_start import sft_warm_start
from copd_runtime.data.datasets import text_examples
from copd_runtime.data.media import VIDEO_FPS, vision_examples
from copd_runtime.models.policy import Policy

PATCH_SIZE = 8
MERGE_SIZE = 2
TEMPORAL_PATCH = 2
VISION_SPECIAL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


def build_processor():
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    tok = build_char_tokenizer()
    tok.padding_side = "left"
    common = dict(patch_size=PATCH_SIZE, temporal_patch_size=TEMPORAL_PATCH, merge_size=MERGE_SIZE,
                  image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    factor = PATCH_SIZE * MERGE_SIZE
    image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": factor * factor, "longest_edge": 64 * 64}, **common
    )
    video_processor = Qwen3VLVideoProcessor(
        size={"shortest_edge": factor * factor, "longest_edge": 64 * 64 * 8},
        do_sample_frames=False, min_frames=TEMPORAL_PATCH, fps=VIDEO_FPS, cap_pixels_per_frame=False,
        **common,
    )
    return Qwen3VLProcessor(image_processor=image_processor, tokenizer=tok, video_processor=video_processor)


def tiny_qwen3_vl_config(tokenizer):
    from transformers import Qwen3VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in VISION_SPECIAL_TOKENS}
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2],
                         "mrope_interleaved": True},
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        in_channels=3,
        patch_size=PATCH_SIZE,
        spatial_merge_size=MERGE_SIZE,
        temporal_patch_size=TEMPORAL_PATCH,
        out_hidden_size=64,
        num_position_embeddings=64,  # an 8x8 learned grid, interpolated to each image's patch grid
        deepstack_visual_indexes=[0],
    )
    return Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


WARM_DOMAINS = ("color", "motion", "arith", "reverse", "maxbox")


@contextlib.contextmanager
def single_thread():
    """Intra-op threads buy nothing on a model this small, and on a busy CPU they cost 5-10x."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def build_tiny_qwen3_vl(seed: int = 0, warm_steps: int = 60, media_dir: Path | None = None) -> Policy:
    """A random-init tiny Qwen3-VL + processor; `warm_steps` > 0 adds a short supervised warm start
    on color/motion and the text domains (media for it go to `media_dir`, a temp dir by default).
    60 steps (~10 s on one CPU core): greedy color ~95%, motion ~30%; sampled at T=1 ~35% / ~20%."""
    from transformers import Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    processor = build_processor()
    model = Qwen3VLForConditionalGeneration(tiny_qwen3_vl_config(processor.tokenizer))
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.generation_config.bos_token_id = None
    model.eval()
    policy = Policy(model=model, tokenizer=processor.tokenizer, processor=processor)
    if warm_steps:
        with tempfile.TemporaryDirectory(prefix="tiny-qwen3-vl-media-") as tmp, single_thread():
            media = Path(media_dir or tmp)
            examples = [e for d in ("color", "motion") for e in vision_examples(d, 400, seed + 7, media)]
            examples += [e for d in ("arith", "reverse", "maxbox") for e in text_examples(d, 400, seed + 7)]
            sft_warm_start(policy, examples, warm_steps, seed=seed)
    return policy
