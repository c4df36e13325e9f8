"""Loading and saving policies: any HF causal LM, or a Qwen-VL style VLM with its processor."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    PreTrainedModel,
)
from transformers.utils import logging as hf_logging

from copd_runtime.models.device import CPU_FP32, Placement

hf_logging.disable_progress_bar()  # one bar per checkpoint load/save drowns the run's own progress
hf_logging.set_verbosity_error()

@dataclass
class Policy:
    model: PreTrainedModel
    tokenizer: object  # a PreTrainedTokenizerBase
    processor: object | None = None  # VLMs only
    # What samples this policy's rollouts instead of transformers' `generate`: an object with
    # `sample(policy, examples, max_new_tokens, temperature, greedy) -> Rollout` (the vLLM engine).
    generator: object | None = None

    @property
    def is_vlm(self) -> bool:
        return self.processor is not None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def eos_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(self.eos_id if pad is None else pad)


def activation_checkpointing(model: PreTrainedModel) -> bool:
    """Whether the model recomputes its layers' activations in backward. transformers 5.23 calls it
    activation checkpointing; 5.20 (the `gpu` extra's pin, vllm's) gradient checkpointing."""
    if hasattr(model, "is_activation_checkpointing"):
        return model.is_activation_checkpointing
    return model.is_gradient_checkpointing


def set_activation_checkpointing(model: PreTrainedModel, on: bool) -> None:
    """Turn it on (non-reentrant `torch.utils.checkpoint`) or off, with either transformers' names."""
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def _is_vlm_config(cfg) -> bool:
    return getattr(cfg, "vision_config", None) is not None


def load_policy(path: str | Path, kind: str = "auto", placement: Placement = CPU_FP32) -> Policy:
    """The model in `placement.dtype` on `placement.device` (the CPU in fp32 by default)."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: not a Hugging Face model directory (no config.json)")
    cfg = AutoConfig.from_pretrained(path)
    vlm = kind == "vlm" or (kind == "auto" and _is_vlm_config(cfg))
    if vlm:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=placement.dtype).to(placement.device)
        processor = AutoProcessor.from_pretrained(path)
        return Policy(model=model, tokenizer=processor.tokenizer, processor=processor)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=placement.dtype).to(placement.device)
    return Policy(model=model, tokenizer=AutoTokenizer.from_pretrained(path))


def save_policy(policy: Policy, path: str | Path, max_shard_bytes: int | None = None,
                state_dict: dict | None = None) -> None:
    """The model in its own dtype (bf16 when training in bf16) as Hugging Face safetensors, in shards of
    at most `max_shard_bytes` (transformers' default, 50 GB, when None) with their index; `state_dict`
    replaces the model's own tensors (ZeRO-3's gathered weights)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    kw = {} if max_shard_bytes is None else {"max_shard_size": max_shard_bytes}
    if state_dict is not None:
        kw["state_dict"] = state_dict
    policy.model.save_pretrained(path, safe_serialization=True, **kw)
    (policy.processor or policy.tokenizer).save_pretrained(path)


def atomic_dir(final: Path):
    """A temp directory beside `final`; call `.commit()` to rename it into place."""
    return _AtomicDir(Path(final))


class _AtomicDir:
    def __init__(self, final: Path):
        self.final = final

    def __enter__(self) -> Path:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{self.final.name}-", dir=self.final.parent))
        self.lock = hold_writer_lock(self.tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._finish(exc_type)
        finally:
            release_writer_lock(self.tmp, self.lock)

    def _finish(self, exc_type) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        _fsync_tree(self.tmp)
        try:
            os.rename(self.tmp, self.final)
        except OSError:
            # someone else renamed an identical result into place first, or an old one is there
            if self.final.exists():
                old = self.final.with_name(f".old-{self.final.name}-{os.getpid()}")
                os.rename(self.final, old)
                os.rename(self.tmp, self.final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                raise


def writer_lock_path(tmp: Path) -> Path:
    """The lock file beside a temp directory being written (`<tmp>.lock`: outside it, so never part of
    what is renamed into place)."""
    return tmp.with_name(tmp.name + ".lock")


def hold_writer_lock(tmp: Path) -> int | None:
    """Take an exclusive `flock` on `<tmp>.lock` for as long as this process writes `tmp`: the kernel (or
    the file server) drops it when the process dies, even by SIGKILL, which is how a later save or load
    tells a dead writer's leftovers from a live writer's work (`writer_alive`). None where the volume
    has no locks (the leftover is then never taken for dead)."""
    try:
        fd = os.open(writer_lock_path(tmp), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def release_writer_lock(tmp: Path, fd: int | None) -> None:
    if fd is None:
        return
    try:
        os.unlink(writer_lock_path(tmp))
    except OSError:
        pass
    os.close(fd)


def writer_alive(tmp: Path) -> bool | None:
    """True while a process holds `<tmp>.lock`; False when the lock file exists and nobody holds it
    (its writer died); None when there is no lock file or locks cannot be taken here (unknown)."""
    try:
        fd = os.open(writer_lock_path(tmp), os.O_RDWR)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        return True if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) else None
    finally:
        os.close(fd)  # (closing drops a lock we took)
    return False


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
