"""Hub request size for a VLM batch: media by path (what the client sends) vs pixels on the wire.

1. A VLM OPD batch of the builtin tiny Qwen3-VL (32×32 images, 4-frame 32×32 videos): `--rows`
   rows of `color` (one image each) and as many of `motion` (one video each), sampled with
   `--max-new-tokens`, as ONE request. `path_bytes` = `hub.encode_request` (ids, masks, the
   student's top-k query ids, and each row's media paths); `pixel_bytes` = the same request
   with the rollout's vision tensors added as tensors, which is what the client sent before
   media travelled by path.
2. One image at a real size: Qwen3-VL's image processing (patch 16, temporal patch 2, merge 2,
   transformers' `Qwen2VLImageProcessor` built locally with those values, default pixel bounds)
   of a `--image` W×H picture: its `pixel_values` bytes in fp32 and bf16 vs the bytes of its path.

Prints one JSON line: {"tiny_vlm": {"path_bytes", "pixel_bytes", "ratio", ...}, "real_image": {...}}.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save as st_save

from copd_runtime.builtin.tiny_vlm import build_tiny_qwen3_vl, single_thread
from copd_runtime.data.media import vision_examples
from copd_runtime.hub import decode_request, encode_request
from copd_runtime.rollout import sample


def with_pixels(blob: bytes, rollout) -> int:
    """Size of the same request with the vision tensors on the wire (the earlier format)."""
    from safetensors.torch import load as st_load

    from copd_runtime.hub import _metadata

    tensors = dict(st_load(blob))
    tensors.update({f"vision.{n}": t.contiguous() for n, t in rollout.vision.items()})
    return len(st_save(tensors, metadata=_metadata(blob)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=8, help="rows of each of color and motion")
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--image", default="640x480", help="W×H of the real-size image")
    a = ap.parse_args()

    with single_thread(), tempfile.TemporaryDirectory() as d:
        media = Path(d) / "media"
        policy = build_tiny_qwen3_vl(seed=0, warm_steps=0, media_dir=Path(d) / "warm")
        ex = vision_examples("color", a.rows, 0, media) + vision_examples("motion", a.rows, 0, media)
        torch.manual_seed(0)
        r = sample(policy, ex, a.max_new_tokens, 1.0, logprobs=False)
        q = torch.zeros(len(r), r.input_ids.shape[1], a.topk, dtype=torch.long)
        blob = encode_request("t", r, a.topk, q)
        decode_request(blob)  # it is a valid request
        pixels = with_pixels(blob, r)
        vision_bytes = sum(t.numel() * t.element_size() for t in r.vision.values())
        tiny = {"rows": len(r), "seq_len": r.input_ids.shape[1], "path_bytes": len(blob), "pixel_bytes": pixels,
                "ratio": round(pixels / len(blob), 2), "vision_tensor_bytes": vision_bytes,
                "pixel_values_shape": list(r.vision["pixel_values"].shape),
                "pixel_values_videos_shape": list(r.vision["pixel_values_videos"].shape)}

        from transformers import Qwen2VLImageProcessor

        w, h = (int(x) for x in a.image.lower().split("x"))
        img_path = Path(d) / "datasets" / "images" / "photo-000001.png"
        img_path.parent.mkdir(parents=True)
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(img_path)
        proc = Qwen2VLImageProcessor(patch_size=16, temporal_patch_size=2, merge_size=2)
        with Image.open(img_path) as im:
            pv = proc(images=[im.convert("RGB")], return_tensors="pt")["pixel_values"]
        one_path = len(json.dumps(str(img_path)))
        real = {"image": f"{w}x{h}", "pixel_values_shape": list(pv.shape), "fp32_bytes": pv.numel() * 4,
                "bf16_bytes": pv.numel() * 2, "path_bytes": one_path,
                "bf16_vs_path": round(pv.numel() * 2 / one_path)}
    print(json.dumps({"tiny_vlm": tiny, "real_image": real}))


if __name__ == "__main__":
    main()
