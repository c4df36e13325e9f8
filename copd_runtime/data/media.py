"""Media of the builtin vision domains: deterministic PNG images and video frames.

- `color`  (image): one 32x32 PNG, a noisy patch of one colour on a noisy grey
  background; prompt `<|vision_start|><|image_pad|><|vision_end|>color?=`,
  answer the colour word.
- `motion` (video): 4 frames (32x32 PNGs) of a white square moving one way;
  prompt `<|vision_start|><|video_pad|><|vision_end|>motion?=`, answer the
  direction word.

Media files are written once under `media_dir` (atomically, skipped when they
exist, so several branch processes can share a storage volume) and are a pure
function of (domain, seed, index).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from copd_runtime.data.examples import Example

IMAGE_SIZE = 32
N_FRAMES = 4
VIDEO_FPS = 1.0  # frames are 1 s apart: Qwen3-VL prompts carry "<0.5 seconds>"-style timestamps

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (30, 60, 230),
    "yellow": (235, 220, 30),
}
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}

IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO_PLACEHOLDER = "<|vision_start|><|video_pad|><|vision_end|>"


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
