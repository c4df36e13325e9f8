"""Branch checkpoints: weights (safetensors), optimizer, RNG and counters, written atomically.

Layout: `<storage>/branches/<branch>/checkpoints/c{cycle:03d}-{stage}-s{step:05d}/`
with the HF model files, `optimizer.pt`, `rng.pt`, `state.json` and `manifest.json`
(size and SHA-256 of every other file, written last). A directory only appears under
its final name once complete (temp dir + fsync + rename), so a trainer killed at any
moment, or a write that runs out of space (`StorageFull`: the temp dir is removed),
leaves the previous checkpoint as the newest one.

Whoever loads a checkpoint asks `latest_checkpoint`, which verifies the candidates
newest first against their manifests: a damaged one (a file changed, truncated or
missing on the volume) is moved aside as `.corrupt-<name>` (kept for a post-mortem,
only the newest such per branch) and the next older valid one is used; a warning
names both on stderr. Checkpoints from before manifests existed are trusted.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from copd_runtime.models import distributed
from copd_runtime.models.policy import (
    Policy,
    atomic_dir,
    hold_writer_lock,
    release_writer_lock,
    save_policy,
    writer_alive,
    writer_lock_path,
)

STAGE_ORDER = {"RL": 0, "OPD": 1}
MANIFEST = "manifest.json"
ZERO_DIR = "zero"  # DeepSpeed's sharded optimizer state inside a checkpoint of a multi-process trainer
CORRUPT_PREFIX = ".corrupt-"
# the Hugging Face model part of a checkpoint is written in shards of at most this size (plus
# model.safetensors.index.json), so that no single file nor the merge's one output shard is huge
MAX_SHARD_BYTES = 2 * 10**9
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class StorageFull(OSError):
    """A checkpoint could not be written for lack of space (ENOSPC/EDQUOT); nothing was half-written."""


@dataclass(frozen=True, order=True)
class Counters:
    cycle: int
    stage: str  # "RL" | "OPD"
    step: int  # steps completed in that stage
    stage_steps: int  # steps the stage has in total

    @property
    def stage_done(self) -> bool:
        return self.step >= self.stage_steps

    def key(self) -> tuple[int, int, int]:
        return (self.cycle, STAGE_ORDER[self.stage], self.step)

    def dirname(self) -> str:
        return f"c{self.cycle:03d}-{self.stage}-s{self.step:05d}"


class StorageAhead(RuntimeError):
    """A branch's storage holds a checkpoint from after the stage it is asked to run: the storage went
    further than this run's status (another run's, or another process writing into it). Running the
    stage would not help: its checkpoint would never be the newest, so the run would repeat the stage."""


def branch_dir(storage: Path, branch: str) -> Path:
    return storage / "branches" / branch


def list_checkpoints(storage: Path, branch: str) -> list[tuple[Counters, Path]]:
    root = branch_dir(storage, branch) / "checkpoints"
    out = []
    for d in root.glob("c*-*-s*"):
        state = d / "state.json"
        if state.exists():
            try:
                out.append((Counters(**json.loads(state.read_text())), d))
            except (OSError, ValueError, TypeError) as e:  # damaged: not a checkpoint one can resume from
                print(f"warning: checkpoint {branch}/{d.name}: state.json unreadable ({e}); ignored",
                      file=sys.stderr, flush=True)
    return sorted(out, key=lambda x: x[0].key())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(ckpt: Path) -> None:
    """Size and SHA-256 of every file of a checkpoint directory (but the manifest), as manifest.json."""
    files = {str(p.relative_to(ckpt)): {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(ckpt.rglob("*")) if p.is_file() and p.name != MANIFEST}
    (ckpt / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def verify_checkpoint(ckpt: Path) -> str | None:
    """None when the checkpoint is intact, else what is wrong (one line)."""
    try:
        Counters(**json.loads((ckpt / "state.json").read_text()))
    except (OSError, ValueError, TypeError) as e:
        return f"state.json unreadable ({e})"
    man = ckpt / MANIFEST
    if not man.exists():
        return None  # written before manifests existed: trusted
    try:
        files = json.loads(man.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} unreadable ({e})"
    for rel, want in files.items():
        p = ckpt / rel
        try:
            size = p.stat().st_size
        except OSError:
            return f"{rel} missing"
        if size != want["size"]:
            return f"{rel} has {size} bytes, {want['size']} written"
        if _sha256(p) != want["sha256"]:
            return f"{rel} does not match its SHA-256"
    return None


def _quarantine(ckpt: Path) -> None:
    """Move a damaged checkpoint aside (out of every listing); keep only the newest such per branch."""
    target = ckpt.with_name(f"{CORRUPT_PREFIX}{ckpt.name}-{os.getpid()}")
    try:
        os.rename(ckpt, target)
    except OSError:
        return  # another reader moved it first
    for old in sorted(ckpt.parent.glob(f"{CORRUPT_PREFIX}*"), key=lambda p: p.stat().st_mtime)[:-1]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(storage: Path, branch: str, before: tuple[int, str] | None = None,
                      skipped: list[str] | None = None):
    """Newest complete and intact checkpoint, optionally strictly before stage (cycle, stage) began.
    Damaged ones met on the way are moved aside and named in `skipped` (and on stderr); temp directories
    a killed writer left are removed (`remove_stale_temps`)."""
    if distributed.rank() == 0:
        remove_stale_temps(storage, branch)
    cks = list_checkpoints(storage, branch)
    if before is not None:
        bound = (before[0], STAGE_ORDER[before[1]])
        cks = [c for c in cks if c[0].key()[:2] < bound]
    for c, path in reversed(cks):
        problem = verify_checkpoint(path)
        if problem is None:
            return c, path
        note = f"checkpoint {branch}/{path.name} is damaged ({problem}): moved aside, using an older one"
        print(f"warning: {note}", file=sys.stderr, flush=True)
        if skipped is not None:
            skipped.append(f"{path.name}: {problem}")
        _quarantine(path)
    return None


# Our own temp directories beside a branch's checkpoints: `.tmp-<checkpoint>-<random>` (atomic_dir) and
# `.tmp-<checkpoint>-sharded-<random>` (a multi-process writer); nothing else there is ever removed
_TEMP = re.compile(r"^\.tmp-c\d{3}-(RL|OPD)-s\d{5}-[A-Za-z0-9_-]+$")
# a temp directory without a lock file (written before the locks, or a volume without flock) is
# taken as left over once it has not changed for this long
UNLOCKED_STALE_S = 3600.0


def remove_stale_temps(storage: Path, branch: str) -> list[str]:
    """Remove the temp directories a writer killed mid-checkpoint (SIGKILL, OOM, a lost node) left in a
    branch's checkpoints: only names of ours (`_TEMP`) whose writer no longer holds their lock
    (`models.policy.writer_alive`), or that have no lock file and are older than UNLOCKED_STALE_S. A live
    writer's directory (another process, another pod on the same volume) is never touched. Returns the
    names removed (also on stderr)."""
    root = branch_dir(storage, branch) / "checkpoints"
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return []
    removed = []
    for p in entries:
        d = p.with_name(p.name[: -len(".lock")]) if p.name.endswith(".lock") else p
        if not _TEMP.match(d.name) or (p is d and (p.is_symlink() or not p.is_dir())):
            continue
        if p is not d and d.exists():
            continue  # its directory's turn decides
        alive = writer_alive(d)
        if alive or (alive is None and writer_lock_path(d).exists()):
            continue  # a live writer, or locks unavailable here: cannot tell
        if alive is None:
            try:
                if time.time() - d.stat().st_mtime < UNLOCKED_STALE_S:
                    continue  # maybe a writer between creating the directory and locking it
            except OSError:
                continue
        shutil.rmtree(d, ignore_errors=True)
        try:
            writer_lock_path(d).unlink()
        except OSError:
            pass
        removed.append(d.name)
    if removed:
        print(f"warning: removed {len(removed)} temp dir(s) left by a killed checkpoint writer of {branch}: "
              f"{', '.join(removed)}", file=sys.stderr, flush=True)
    return removed


KEEP = 3  # newest checkpoints kept per branch (plus the two newest stage-final ones: `_gc`)


def checkpoint_fit_warning(checkpoint_bytes: int, weights_bytes: int, keep: int, branches: int,
                           capacity_bytes: int) -> str | None:
    """What the run's checkpoints need at most — every branch keeping `keep` + 2 checkpoints of this
    size, plus a merged model of `weights_bytes` — when that exceeds the volume's capacity; else None
    (also when the capacity is unknown, 0)."""
    need = branches * (keep + 2) * checkpoint_bytes + weights_bytes
    if capacity_bytes <= 0 or need <= capacity_bytes:
        return None
    gb = 1e9
    return (f"checkpoints need up to {need / gb:.1f} GB ({branches} branches × {keep + 2} checkpoints × "
            f"{checkpoint_bytes / gb:.1f} GB + a merged model of {weights_bytes / gb:.1f} GB) on a volume of "
            f"{capacity_bytes / gb:.1f} GB: grow spec.storage.size (or the claim) before it fills")


def fit_warning_for(ckpt: Path, branches: int, keep: int = KEEP) -> str | None:
    """`checkpoint_fit_warning` for a checkpoint just written, against the volume that holds it."""
    weights = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    try:
        st = os.statvfs(ckpt)
        capacity = st.f_blocks * st.f_frsize
    except OSError:
        capacity = 0
    return checkpoint_fit_warning(_size(ckpt), weights, keep, branches, capacity)


def save_checkpoint(storage: Path, branch: str, policy: Policy, optimizer, counters: Counters, keep: int = KEEP):
    """Write a checkpoint atomically. Out of space: raises StorageFull (the partial temp dir is gone, the
    previous checkpoint untouched and still the newest)."""
    final = branch_dir(storage, branch) / "checkpoints" / counters.dirname()
    if distributed.rank() == 0:
        remove_stale_temps(storage, branch)
    if hasattr(optimizer, "save"):  # DeepSpeed across processes: every rank writes its shard
        _save_sharded(final, policy, optimizer, counters)
        if distributed.rank() == 0:
            _gc(storage, branch, keep)
        return final
    try:
        with atomic_dir(final) as tmp:
            save_policy(policy, tmp, MAX_SHARD_BYTES)
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(_rng_state(), tmp / "rng.pt")
            (tmp / "state.json").write_text(json.dumps(asdict(counters)))
            write_manifest(tmp)
    except Exception as e:
        prev = list_checkpoints(storage, branch)
        # torch.save does not always say ENOSPC ("enforce fail ... unexpected pos"): a failed write with less
        # room left than the previous checkpoint takes is out of space too
        if no_space(e) or (prev and _free_bytes(final.parent) < _size(prev[-1][1])):
            kept = f"the newest checkpoint {prev[-1][1].name} is intact" if prev else "no earlier checkpoint"
            raise StorageFull(errno.ENOSPC, f"no space left on the run's storage writing checkpoint "
                              f"{branch}/{final.name} under {final.parent} ({_free(final.parent)}); {kept}; "
                              f"free space or grow the volume ({type(e).__name__}: {str(e)[:200]})") from e
        raise
    _gc(storage, branch, keep)
    return final


def _rng_state() -> dict:
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state()  # this rank's device
    return rng


def _save_sharded(final: Path, policy: Policy, optimizer, counters: Counters) -> None:
    """A checkpoint written by every rank: DeepSpeed's sharded optimizer state (and master weights) in
    `zero/`, the bf16/fp32 Hugging Face model (sharded) and the counters from rank 0 (ZeRO-2: every rank
    holds the whole model; ZeRO-3: its weights are first gathered onto rank 0). One shared temp
    directory, renamed into place by rank 0 once every rank is done."""
    import torch.distributed as dist

    lock = None
    name = [None]
    if distributed.rank() == 0:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-sharded-", dir=final.parent))
        lock = hold_writer_lock(tmp)  # held by rank 0 until the rename (torchrun stops every rank with it)
        name = [tmp.name]
    dist.broadcast_object_list(name, src=0)
    tmp = final.parent / name[0]
    optimizer.save(tmp / ZERO_DIR)
    full = optimizer.full_state_dict()  # ZeRO-3: a collective, the whole weights on rank 0 only
    dist.barrier()
    if distributed.rank() == 0:
        save_policy(policy, tmp, MAX_SHARD_BYTES, state_dict=full)
        torch.save(_rng_state(), tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(asdict(counters)))
        write_manifest(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        release_writer_lock(tmp, lock)
    dist.barrier()


def no_space(e: BaseException) -> bool:
    """An out-of-space error, also when a library wrapped the OSError (safetensors, torch.save)."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in NO_SPACE:
            return True
        if "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _size(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def _free_bytes(path: Path) -> int:
    try:
        st = os.statvfs(path)
        return st.f_bavail * st.f_frsize
    except OSError:
        return 1 << 62


def _free(path: Path) -> str:
    try:
        st = os.statvfs(path)
        return f"{st.f_bavail * st.f_frsize} of {st.f_blocks * st.f_frsize} bytes free"
    except OSError:
        return "free space unknown"


def _gc(storage: Path, branch: str, keep: int) -> None:
    """Keep the newest `keep` checkpoints and the two newest stage-final ones: the stage that
    just ended is the frozen teacher a peer's hub may still be loading."""
    cks = list_checkpoints(storage, branch)
    protected = set([p for c, p in cks if c.stage_done][-2:])
    for _, p in cks[:-keep]:
        if p not in protected:
            shutil.rmtree(p, ignore_errors=True)


def load_optimizer_and_rng(ckpt: Path, optimizer) -> None:
    if hasattr(optimizer, "load"):  # DeepSpeed: its own sharded state (a single-process checkpoint has none)
        if (ckpt / ZERO_DIR).exists():
            optimizer.load(ckpt / ZERO_DIR)
    elif (ckpt / "optimizer.pt").exists():  # (a checkpoint of a multi-process trainer has none)
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=False, map_location=_device_of(optimizer)))
    rng = torch.load(ckpt / "rng.pt", weights_only=False, map_location="cpu")  # rank 0's; each rank's own draws
    # differ by their prompts, not their seeds
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])


def _device_of(optimizer) -> torch.device:
    for g in optimizer.param_groups:
        for p in g["params"]:
            return p.device
    return torch.device("cpu")
