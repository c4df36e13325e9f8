"""The builtin base models: shipped bytes with recorded SHA-256, and a deterministic builder."""

import json

import pytest

from copd_runtime.builtin.build import (
    SHIPPED,
    build_builtin,
    copy_shipped,
    file_sums,
    shipped_sums,
    weights_sha256,
)
from copd_runtime.model_uri import resolve_model_dir
from copd_runtime.models.policy import load_policy


def test_building_twice_gives_the_same_bytes(tmp_path):
    build_builtin("tiny-qwen3", tmp_path / "one")
    build_builtin("tiny-qwen3", tmp_path / "two")
    one, two = file_sums(tmp_path / "one"), file_sums(tmp_path / "two")
    assert one == two and set(one) >= {"model.safetensors", "config.json", "tokenizer.json"}


@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-qwen3-vl"])
def test_shipped_weights_match_their_recorded_sha256_and_load(tmp_path, name):
    assert file_sums(SHIPPED / name) == shipped_sums()[name]
    d = resolve_model_dir(f"builtin://{name}", tmp_path)
    assert file_sums(d)["model.safetensors"] == weights_sha256(name)
    assert load_policy(d).model.num_parameters() > 0


def test_damaged_shipped_weights_are_refused(tmp_path, monkeypatch):
    fake = tmp_path / "weights"
    (fake / "tiny-qwen3").mkdir(parents=True)
    for f in (SHIPPED / "tiny-qwen3").iterdir():
        (fake / "tiny-qwen3" / f.name).write_bytes(f.read_bytes())
    (fake / "SHA256SUMS.json").write_text(json.dumps(shipped_sums()))
    data = bytearray((fake / "tiny-qwen3" / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (fake / "tiny-qwen3" / "model.safetensors").write_bytes(bytes(data))
    monkeypatch.setattr("copd_runtime.builtin.build.SHIPPED", fake)
    monkeypatch.setattr("copd_runtime.builtin.build.SUMS", fake / "SHA256SUMS.json")
    with pytest.raises(ValueError, match="model.safetensors"):
        copy_shipped("tiny-qwen3", tmp_path / "out")
