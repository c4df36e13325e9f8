"""Prompt encoding for Qwen3-VL style models, and the vision token rules every forward follows.

`encode_vlm_prompts` runs the model's own `Qwen3VLProcessor` (image processor,
video processor, placeholder expansion with Qwen3-VL's per-frame timestamps) and
returns left-padded ids plus the packed vision tensors. The multimodal token
types that Qwen3-VL's M-RoPE needs are NOT returned: they are a function of the
ids (`mm_token_type_ids`), so the rollout recomputes them for prompt+response.

The video processor of transformers needs torchvision (no video decoding is
used: frames are passed as PIL images).
"""

from __future__ import annotations

import torch
from PIL import Image

from copd_runtime.data.examples import Example
from copd_runtime.data.media import VIDEO_FPS

# ---------------------------------------------------------------------------
# Prompt encoding


def _load_rgb(path: str) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def _prompt_text(e: Example, image_token: str, video_token: str) -> str:
    """The prompt with one placeholder per image / video (added in front when missing)."""
    text = e.prompt
    missing_img = len(e.images) - text.count(image_token)
    missing_vid = int(bool(e.video)) - text.count(video_token)
    if missing_img < 0 or missing_vid < 0:
        raise ValueError(f"prompt has more media placeholders than media: {e.prompt!r}")
    prefix = "<|vision_start|>" + image_token + "<|vision_end|>"
    vprefix = "<|vision_start|>" + video_token + "<|vision_end|>"
    return prefix * missing_img + vprefix * missing_vid + text


def encode_vlm_prompts(processor, examples: list[Example]) -> dict[str, torch.Tensor]:
    """Left-padded `input_ids`/`attention_mask` and packed vision tensors, examples in order:
    `pixel_values`+`image_grid_thw` (one grid row per image), `pixel_values_videos`+
    `video_grid_thw` (one grid row per video)."""
    from transformers.video_utils import VideoMetadata

    texts = [_prompt_text(e, processor.image_token, processor.video_token) for e in examples]
    images = [_load_rgb(p) for e in examples for p in e.images]
    videos = [[_load_rgb(p) for p in e.video] for e in examples if e.video]
    kwargs: dict = {}
    if videos:
        kwargs["video_metadata"] = [
            VideoMetadata(total_num_frames=len(v), fps=VIDEO_FPS, frames_indices=list(range(len(v))))
            for v in videos
        ]
        kwargs["do_sample_frames"] = False
    processor.tokenizer.padding_side = "left"
    enc = processor(
        text=texts,
        images=images or None,
        videos=videos or None,
        padding=True,
        padding_side="left",
        return_tensors="pt",
        add_special_tokens=False,
        **kwargs,
    )
    keep = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
    return {k: enc[k] for k in keep if k in enc}


def vision_token_ids(config) -> dict[str, int]:
    return {
        "image": int(config.image_token_id),
        "video": int(config.video_token_id),
        "start": int(config.vision_start_token_id),
        "end": int(config.vision_end_token_id),
    }


def mm_token_type_ids(config, input_ids: torch.Tensor) -> torch.Tensor:
    """Qwen3-VL's token types for M-RoPE: 0 text, 1 image placeholder, 2 video placeholder."""
    types = torch.zeros_like(input_ids)
    types[input_ids == config.image_token_id] = 1
    types[input_ids == config.video_token_id] = 2
    return types


def mask_vision_logits(config, logits: torch.Tensor) -> torch.Tensor:
    """The policy never emits vision special tokens (a sampled placeholder would not match
    the vision features). A large finite negative, not -inf, keeps p·log p finite."""
    ids = list(vision_token_ids(config).values())
    out = logits.clone()
    out[..., ids] = -1e4
    return out
