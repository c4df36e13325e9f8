"""The comparison's driver: CoPD against its baselines and ablations at one optimizer-step budget.

    python -m experiments.compare examples/compare.yaml --output runs/compare [--jobs 2]

Jobs are (method, seed) (see `methods.py`) and the pilot's (domain, seed) (see
`pilot.py`); each writes `<output>/runs/<method>/seed-<s>.json` once it has
finished, so an interrupted comparison continues where it stopped (an unfinished
job restarts from scratch). Then `report.py` aggregates and plots.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

from copd_runtime.builtin.build import file_sums, weights_sha256
from copd_runtime.data.datasets import read_jsonl
from copd_runtime.model_uri import resolve_model_dir
from experiments.compare.context import Ctx, dataset_spec, write_datasets
from experiments.compare.kernels import describe
from experiments.compare.methods import job_list, run_job
from experiments.compare.pilot import pilot_jobs, run_pilot_one
from experiments.compare.report import write_report
from experiments.compare.spec import CompareSpec, load_compare_spec, ratio_name

_CTX: Ctx | None = None


def _worker_init(spec_json: str, storage: str, threads: int) -> None:
    global _CTX
    torch.set_num_threads(threads)
    _CTX = Ctx(CompareSpec.model_validate_json(spec_json), Path(storage))


def _pool_worker_init(harness_pid: int, spec_json: str, storage: str, threads: int) -> None:
    """A pool worker ends with the harness: killed, it would otherwise run the jobs already in its queue
    into storage directories the next invocation starts the same jobs in. Linux: PR_SET_PDEATHSIG, with
    SIGKILL (a job's runner stops gracefully on SIGTERM; an unfinished job restarts from scratch anyway);
    a harness that died while this worker was still starting is no longer its parent."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != harness_pid:
        os._exit(1)
    _worker_init(spec_json, storage, threads)


def _worker_run(kind: str, args: tuple) -> tuple[str, tuple, dict, float]:
    t0 = time.perf_counter()
    res = run_job(_CTX, *args) if kind == "method" else run_pilot_one(_CTX, *args)
    return kind, args, res, time.perf_counter() - t0


def _pilot_path(out: Path, domain: str, seed: int) -> Path:
    return out / "runs" / "pilot" / f"{domain}-seed-{seed}.json"


def base_eval(spec: CompareSpec, out: Path) -> dict[str, float]:
    """The base model's scores, computed once per output directory."""
    p = Path(out) / "base_eval.json"
    if p.exists():
        return json.loads(p.read_text())
    ctx = _CTX if _CTX is not None and _CTX.spec == spec else Ctx(spec, Path(out) / "storage")
    p.write_text(json.dumps(ctx.base_eval))
    return ctx.base_eval


def run_comparison(spec: CompareSpec, out: Path, jobs: int = 1, log=print, pilot: bool = True,
                   threads: int = 1) -> dict:
    """Run every (method, seed) job not already on disk, then aggregate and plot.

    `threads` is torch's intra-op threads per worker. Keep 1: the model is ~100k
    parameters and on a shared 2-core machine 2 threads made a GRPO step ~10× slower.
    """
    out = Path(out).resolve()
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(spec.model_dump_json(by_alias=True, indent=2))
    storage = out / "storage"
    resolve_model_dir(spec.base_uri(), storage)  # build the builtin base once, before any worker
    write_datasets(spec, storage)  # the one copy of the data every job reads
    t0 = time.monotonic()

    todo: list[tuple[str, tuple]] = []
    for m, seed in job_list(spec):
        if not (out / "runs" / m / f"seed-{seed}.json").exists():
            todo.append(("method", (m, seed)))
    if pilot and spec.pilot is not None:
        for args in pilot_jobs(spec.pilot):
            if not _pilot_path(out, *args).exists():
                todo.append(("pilot", args))
    log(f"compare: {len(todo)} jobs to run ({jobs} worker(s))")

    def save(kind: str, args: tuple, res: dict, secs: float) -> None:
        if kind == "method":
            for name, r in res.items():
                p = out / "runs" / name / f"seed-{args[1]}.json"
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_text(json.dumps({"method": name, "seed": args[1], "seconds": round(secs, 1), **r}))
        else:
            p = _pilot_path(out, *args)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps({**res, "seconds": round(secs, 1)}))
        log(f"  done {kind} {args} in {secs:.1f}s ({time.monotonic() - t0:.0f}s total)")

    spec_json = spec.model_dump_json()
    if jobs <= 1:
        _worker_init(spec_json, str(storage), threads)
        for kind, args in todo:
            save(*_worker_run(kind, args))
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_pool_worker_init,
                                 initargs=(os.getpid(), spec_json, str(storage), threads)) as ex:
            futs = [ex.submit(_worker_run, kind, args) for kind, args in todo]
            for f in as_completed(futs):
                save(*f.result())
    wall = time.monotonic() - t0
    return write_report(spec, out, base_eval(spec, out), wall_seconds=wall, provenance=base_provenance(spec),
                        eval_overlap=eval_overlap(spec, storage), kernels=describe())


def restrict(spec: CompareSpec, only: list[str]) -> CompareSpec:
    """The spec with only the named methods (and ratio arms `copd@r`)."""
    unknown = sorted(set(only) - set(spec.method_names()))
    if unknown:
        raise SystemExit(f"--only: {unknown} are not methods of this spec ({spec.method_names()})")
    return spec.model_copy(update={"methods": [m for m in spec.methods if m in only],
                                   "ratios": [r for r in spec.ratios if ratio_name(r) in only]})


def base_provenance(spec: CompareSpec) -> dict:
    """The base model's identity: for a builtin, the SHA-256 of its shipped weights."""
    if spec.base_model.startswith("builtin://"):
        return {"sha256": weights_sha256(spec.base_model.removeprefix("builtin://"))}
    d = Path(spec.base_uri().removeprefix("file://"))
    return {"sha256": file_sums(d).get("model.safetensors")} if d.is_dir() else {}


def eval_overlap(spec: CompareSpec, storage: Path) -> dict:
    """Measured, per domain: how many eval examples' prompts also occur among the train prompts."""
    res = {}
    for d in spec.domains:
        ds = dataset_spec(storage, d)
        train = {e.prompt for e in read_jsonl(Path(ds.path), d)}
        ev = read_jsonl(Path(ds.eval_path), d)
        hits = sum(e.prompt in train for e in ev)
        res[d] = {"eval_examples": len(ev), "eval_distinct_prompts": len({e.prompt for e in ev}),
                  "train_distinct_prompts": len(train), "eval_in_train": hits,
                  "fraction_in_train": round(hits / len(ev), 4)}
    return res


def main(spec_path: Path, output: Path, jobs: int = 1, pilot: bool = True, only: list[str] | None = None) -> dict:
    """Run, then print the table (comparison.md). `only`: a subset of the spec's methods."""
    spec = load_compare_spec(spec_path)
    if only is not None:
        spec = restrict(spec, only)
    doc = run_comparison(spec, output, jobs=jobs, pilot=pilot)
    print((Path(output) / "comparison.md").read_text())
    return doc
