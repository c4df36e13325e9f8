"""Vision: the synthetic image/video domains, prompt encoding for Qwen3-VL, and the tiny VLM.

- `color`  (image): one 32x32 PNG, a noisy patch of one colour on a noisy grey
  background; prompt `<|vision_start|><|image_pad|><|vision_end|>color?=`,
  answer the colour word.
- `motion` (video): 4 frames (32x32 PNGs) of a white square moving one way;
  prompt `<|vision_start|><|video_pad|><|vision_end|>motion?=`, answer the
  direction word.

Media files are written once under `media_dir` (atomically, skipped when they
exist, so several branch processes can share a storage volume) and are a pure
function of (domain, seed, index).

`encode_vlm_prompts` runs the model's own `Qwen3VLProcessor` (image processor,
video processor, placeholder expansion with Qwen3-VL's per-frame timestamps) and
returns left-padded ids plus the packed vision tensors. The multimodal token
types that Qwen3-VL's M-RoPE needs are NOT returned: they are a function of the
ids (`mm_token_type_ids`), so the rollout recomputes them for prompt+response.

`build_tiny_qwen3_vl` makes a random-init Qwen3-VL small enough for CPU
(text: hidden 64, 2 layers; vision: depth 2, hidden 32, patch 8) with a
processor built offline from the character tokenizer, and warm-starts it
briefly on color/motion plus the text domains.

The video processor of transformers needs torchvision (no video decoding is
used: frames are passed as PIL images).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .data import Example, text_examples
from .models import Policy

IMAGE_SIZE = 32
N_FRAMES = 4
VIDEO_FPS = 1.0  # frames are 1 s apart: Qwen3-VL prompts carry "<0.5 seconds>"-style timestamps
PATCH_SIZE = 8
MERGE_SIZE = 2
TEMPORAL_PATCH = 2

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (30, 60, 230),
    "yellow": (235, 220, 30),
}
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}

IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO_PLACEHOLDER = "<|vision_start|><|video_pad|><|vision_end|>"
VISION_SPECIAL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


# ---------------------------------------------------------------------------
# Synthetic domains


def _write_png(path: Path, pixels: np.ndarray) -> None:
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(pixels, "RGB").save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _noise(rng: np.random.Generator, shape, scale: float) -> np.ndarray:
    return rng.normal(0.0, scale, size=shape)


def _color_image(rng: np.random.Generator, rgb: tuple[int, int, int]) -> np.ndarray:
    S = IMAGE_SIZE
    img = np.full((S, S, 3), rng.uniform(60, 140), dtype=np.float64) + _noise(rng, (S, S, 3), 12)
    h, w = rng.integers(S // 2, S + 1, size=2)
    y, x = rng.integers(0, S - h + 1), rng.integers(0, S - w + 1)
    jitter = rng.normal(0, 12, size=3)
    img[y : y + h, x : x + w] = np.array(rgb) + jitter + _noise(rng, (h, w, 3), 10)
    return np.clip(img, 0, 255).astype(np.uint8)


def _motion_frames(rng: np.random.Generator, direction: tuple[int, int]) -> list[np.ndarray]:
    S, side, step = IMAGE_SIZE, 8, 6
    travel = step * (N_FRAMES - 1)
    dx, dy = direction
    # start so that the whole path stays inside the frame
    def start(d: int) -> int:
        if d > 0:
            return int(rng.integers(0, S - side - travel + 1))
        if d < 0:
            return int(rng.integers(travel, S - side + 1))
        return int(rng.integers(0, S - side + 1))

    x0, y0 = start(dx), start(dy)
    bg = rng.uniform(0, 50)
    frames = []
    for t in range(N_FRAMES):
        img = np.full((S, S, 3), bg) + _noise(rng, (S, S, 3), 8)
        x, y = x0 + dx * step * t, y0 + dy * step * t
        img[y : y + side, x : x + side] = 235 + _noise(rng, (side, side, 3), 8)
        frames.append(np.clip(img, 0, 255).astype(np.uint8))
    return frames


def vision_examples(domain: str, n: int, seed: int, media_dir: Path) -> list[Example]:
    """n deterministic examples of a builtin vision domain; media written under media_dir."""
    media_dir = Path(media_dir)
    out = []
    if domain == "color":
        words = list(COLORS)
        for i in range(n):
            rng = np.random.default_rng([seed & 0xFFFFFFFF, i, 1])
            word = words[int(rng.integers(len(words)))]
            path = media_dir / f"color-s{seed}-{i:06d}.png"
            if not path.exists():
                _write_png(path, _color_image(rng, COLORS[word]))
            out.append(Example(IMAGE_PLACEHOLDER + "color?=", word, domain, images=(str(path),)))
    elif domain == "motion":
        words = list(DIRECTIONS)
        for i in range(n):
            rng = np.random.default_rng([seed & 0xFFFFFFFF, i, 2])
            word = words[int(rng.integers(len(words)))]
            paths = [media_dir / f"motion-s{seed}-{i:06d}-f{t}.png" for t in range(N_FRAMES)]
            if not all(p.exists() for p in paths):
                for p, px in zip(paths, _motion_frames(rng, DIRECTIONS[word])):
                    _write_png(p, px)
            out.append(Example(VIDEO_PLACEHOLDER + "motion?=", word, domain, video=tuple(map(str, paths))))
    else:
        raise ValueError(f"unknown vision domain {domain!r}")
    return out


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


# ---------------------------------------------------------------------------
# The tiny Qwen3-VL


def build_processor():
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    from .tiny_models import build_char_tokenizer

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
            from .tiny_models import sft_warm_start

            sft_warm_start(policy, examples, warm_steps, seed=seed)
    return policy
