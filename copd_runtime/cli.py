"""`copd`: run CoPD on one machine, or run one piece of it inside a pod.

    copd run MANIFEST --output DIR        the whole run, locally (the demo)
    copd validate MANIFEST                check a manifest, print the resolved spec
    copd build-base NAME --output DIR     build a builtin tiny base model
    copd stage | hub | diagnose | merge   the entry points the operator puts in pods

Pod entry points print one JSON report line on stdout and also write it to
`--report-file` (the pod's terminationMessagePath), which is how the operator
learns the outcome without reading volumes. `copd stage --branch-object NAME`
also reports each step live into that Branch's status.progress (progress_report.py;
best effort, rate-limited; off when the pod has no API token).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from copd_core.spec import SpecError, load_manifest, parse_manifest
from copd_runtime.progress_report import SA_DIR

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
EXIT_STORAGE_FULL = 3  # the run's storage is full: the operator fails the Job at once (reason StorageFull)


def _manifest(path: Path):
    """A manifest file, or `env:NAME` for a manifest (YAML/JSON) held in an environment variable."""
    try:
        if str(path).startswith("env:"):
            import os

            import yaml

            name = str(path).removeprefix("env:")
            if name not in os.environ:
                raise ValueError(f"environment variable {name} is not set")
            return parse_manifest(yaml.safe_load(os.environ[name]))
        return load_manifest(path)
    except SpecError as e:
        typer.secho(f"invalid CoPDRun {path}: {e}", fg="red", err=True)
        raise typer.Exit(2) from None
    except (OSError, ValueError) as e:
        typer.secho(f"cannot read {path}: {e}", fg="red", err=True)
        raise typer.Exit(2) from None


def _preflight(spec, storage: Path, report_file: Path | None = None, branches: list[str] | None = None) -> None:
    """Refuse bad input before any work: one line naming the spec field and the path, exit 2.
    In a pod the same line is the report (termination message) and the operator fails the run
    with reason InvalidInput instead of retrying (exit code 2 is a FailJob rule)."""
    from copd_runtime.preflight import check_inputs

    problems = check_inputs(spec, storage, branches)
    if not problems:
        return
    first = problems[0].line()
    if report_file is not None:
        _report({"failed": True, "reason": "InvalidInput", "field": problems[0].field, "message": first},
                 report_file, quiet=True)
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    typer.secho(f"invalid input: {first}{more}", fg="red", err=True)
    raise typer.Exit(2)


def _engine_check(spec, report_file: Path | None) -> None:
    """`rollout.engine: vllm` where vLLM cannot run (not installed, no CUDA GPU): one line naming the
    field, exit 2 and an InvalidInput report, so the operator fails the run with the reason instead
    of retrying a pod that cannot get further."""
    if spec.rollout.engine != "vllm":
        return
    from copd_runtime.vllm_engine import unavailable

    reason = unavailable()
    if reason:
        _engine_failed(reason, report_file)


def _engine_failed(reason: str, report_file: Path | None) -> None:
    msg = f"spec.rollout.engine: vllm: {reason}"
    if report_file is not None:
        _report({"failed": True, "reason": "InvalidInput", "field": "spec.rollout.engine", "message": msg},
                report_file, quiet=True)
    typer.secho(f"invalid input: {msg}", fg="red", err=True)
    raise typer.Exit(2)


def _torch_threads() -> None:
    """Intra-op threads for torch (COPD_TORCH_THREADS, default 1). On GPU they barely matter;
    on a shared CPU, small models run several times faster on one thread than on two that
    fight other processes (a GRPO step of the tiny model: 0.05 s vs 0.45 s on a loaded
    2-core machine)."""
    import os

    import torch

    torch.set_num_threads(max(1, int(os.environ.get("COPD_TORCH_THREADS", "1"))))


def _report(obj: dict, report_file: Path | None, quiet: bool = False) -> None:
    line = json.dumps(obj)
    if not quiet:
        print(line, flush=True)
    if report_file is not None:
        try:
            report_file.parent.mkdir(parents=True, exist_ok=True)
            report_file.write_text(line)
        except OSError as e:
            print(f"warning: cannot write report to {report_file}: {e}", file=sys.stderr)


@app.command()
def validate(manifest: Path) -> None:
    """Validate a CoPDRun manifest and print the spec with defaults filled in."""
    m = _manifest(manifest)
    print(m.spec.model_dump_json(by_alias=True, indent=2))


@app.command()
def run(
    manifest: Path,
    output: Annotated[Path, typer.Option("--output", "-o", help="Run directory (also its storage).")],
    metrics_port: Annotated[int | None, typer.Option(help="Serve Prometheus /metrics on this port.")] = None,
    checkpoint_every: Annotated[int, typer.Option(help="Also checkpoint every N steps inside a stage.")] = 2,
    live: Annotated[bool | None, typer.Option("--live/--no-live", help="Live table (default: on a TTY).")] = None,
) -> None:
    """Run a whole CoPD run on this machine: branches, hub, diagnostics and merge."""
    import time

    m = _manifest(manifest)
    _preflight(m.spec, output.resolve())
    if m.spec.rollout.engine == "vllm":  # one process running every branch in turn: engines would pile up
        _engine_failed("`copd run` (one machine) samples with the hf engine; the vllm engine runs in the "
                       "operator's pods (`copd stage`, `copd hub`)", None)
    _torch_threads()
    from copd_core.metrics import CoPDMetrics
    from copd_runtime.local.progress import Progress
    from copd_runtime.local.runner import LocalRun

    metrics = CoPDMetrics()
    if metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(metrics_port, registry=metrics.registry)
    t0 = time.monotonic()
    from copd_runtime.checkpoint import StorageAhead

    try:
        with Progress(m.metadata.name, [b.name for b in m.spec.branches], live=live) as progress:
            lr = LocalRun(m, output, on_event=progress.event, on_step=progress.step, metrics=metrics,
                          checkpoint_every=checkpoint_every)
            status = lr.run()
    except StorageAhead as e:  # another run's output directory, or a second writer: not this run's to repeat
        typer.secho(f"storage ahead of the run: {e}", fg="red", err=True)
        raise typer.Exit(2) from None
    summary = lr.summary(status)
    summary["wall_seconds"] = round(time.monotonic() - t0, 1)
    (lr.out / "summary.json").write_text(json.dumps(summary, indent=2))
    _print_summary(summary)
    raise typer.Exit(0 if status.phase.value == "Succeeded" else 1)


def _print_summary(s: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    c = Console()
    t = Table(title=f"run {s['run']}: {s['phase']} after {s['cycles_completed']} cycles in {s['wall_seconds']}s")
    domains = sorted({d for b in s["branches"].values() for d in b["eval"]})
    for col in ["model", "reward first→last", *domains]:
        t.add_column(col)
    for name, b in s["branches"].items():
        rf, rl = b["reward_first"], b["reward_last"]
        t.add_row(name, f"{rf:.3f} → {rl:.3f}" if rf is not None and rl is not None else "",
                  *[f"{b['eval'].get(d, 0):.3f}" for d in domains])
    if s["merge"]["path"]:
        t.add_row("merged", "", *[f"{s['merge']['eval'].get(d, 0):.3f}" for d in domains])
    c.print(t)
    c.print(f"merge ready: {s['merge']['ready']} ({s['merge']['reason']})")
    c.print(f"merged model: {s['merge']['path']}")


@app.command("build-base")
def build_base(name: str, output: Annotated[Path, typer.Option("--output", "-o")]) -> None:
    """Rebuild a builtin tiny base model (tiny-qwen3, tiny-qwen3-vl) from its builder into a HF directory
    (runs use the shipped copy in copd_runtime/builtin/weights)."""
    from copd_runtime.builtin.build import build_builtin
    from copd_runtime.models.policy import atomic_dir

    with atomic_dir(output) as tmp:
        build_builtin(name, tmp)
    print(output)


# ---------------------------------------------------------------------------
# Pod entry points

ManifestOpt = Annotated[Path, typer.Option("--manifest", help="The CoPDRun manifest file, or env:VAR holding it.")]
StorageOpt = Annotated[Path, typer.Option("--storage", help="The run's storage directory.")]
ReportOpt = Annotated[Path | None, typer.Option("--report-file", help="Also write the JSON report here.")]


@app.command()
def stage(
    manifest: ManifestOpt,
    storage: StorageOpt,
    branch: Annotated[str, typer.Option()],
    cycle: Annotated[int, typer.Option(min=1)],
    stage: Annotated[str, typer.Option(help="RL or OPD")],
    hub_url: Annotated[str | None, typer.Option(help="Hub service URL (OPD).")] = None,
    checkpoint_every: Annotated[int, typer.Option()] = 0,
    report_file: ReportOpt = None,
    branch_object: Annotated[str | None, typer.Option(
        envvar="COPD_BRANCH_OBJECT",
        help="The Branch object (in the pod's namespace) whose status.progress gets this stage's live "
             "step, reward and OPD overlap.")] = None,
    api_credentials: Annotated[Path, typer.Option(
        envvar="COPD_API_CREDENTIALS",
        help="Directory with the service-account token, ca.crt and namespace.")] = Path(SA_DIR),
    progress_interval: Annotated[float, typer.Option(
        envvar="COPD_PROGRESS_INTERVAL_S", min=0.0,
        help="At most one live progress patch per this many seconds (plus the last step).")] = 5.0,
    steps: Annotated[int | None, typer.Option(
        min=0, help="Steps of this stage as the cycle decision planned them (schedule.mode adaptive); "
                    "default the schedule's.")] = None,
    teachers: Annotated[str | None, typer.Option(
        help="OPD: comma-separated teachers this branch distils from this cycle (schedule.mode adaptive); "
             "default every teacher of the topology.")] = None,
) -> None:
    """Run one RL or OPD stage of one branch (resuming from its newest checkpoint)."""
    import os

    from copd_core.cycle import Stage
    from copd_runtime.progress_report import ProgressReporter
    from copd_runtime.recipes.stage import run_branch_stage

    rank0 = os.environ.get("RANK", "0") in ("", "0")  # under torchrun only global rank 0 reports
    if not rank0:
        report_file, branch_object = None, None
    m = _manifest(manifest)
    _torch_threads()
    if branch not in [b.name for b in m.spec.branches]:
        _report({"failed": True, "message": f"unknown branch {branch!r}"}, report_file)
        raise typer.Exit(2)
    _preflight(m.spec, storage, report_file, [branch])
    _engine_check(m.spec, report_file)
    st = Stage(stage)
    hub = None
    if st == Stage.OPD:
        if not hub_url:
            _report({"failed": True, "message": "OPD needs --hub-url"}, report_file)
            raise typer.Exit(2)
        from copd_runtime.hub import HttpHub

        hub = HttpHub(hub_url, storage=storage, cycle=cycle)  # re-reads a replaced hub's address
    metrics_file = storage / "metrics.jsonl"
    live = ProgressReporter.from_pod(branch_object, api_credentials, interval_s=progress_interval)

    def sink(rec: dict) -> None:
        if not rank0:
            return
        with open(metrics_file, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(json.dumps({k: v for k, v in rec.items() if not isinstance(v, list)}), file=sys.stderr, flush=True)
        if live is not None:
            live.update(rec)

    try:
        rep = run_branch_stage(m.spec, storage, branch, cycle, st, hub=hub, sink=sink, run_name=m.metadata.name,
                               checkpoint_every=checkpoint_every, steps=steps,
                               teachers=[t for t in teachers.split(",") if t] if teachers is not None else None)
    except Exception as e:
        from copd_runtime.checkpoint import no_space
        from copd_runtime.hub import HubRefused
        from copd_runtime.vllm_engine import EngineUnavailable

        if isinstance(e, HubRefused) and e.reason == "InvalidInput":  # the hub refused this run's input
            _report({"branch": branch, "cycle": cycle, "stage": stage, "failed": True, "reason": "InvalidInput",
                     "field": "hub", "message": str(e)[:1000]}, report_file, quiet=True)
            typer.secho(f"invalid input: {e}", fg="red", err=True)
            raise typer.Exit(2) from None
        if isinstance(e, EngineUnavailable):  # vllm failed to import or is another version
            _engine_failed(str(e), report_file)
        from copd_runtime.checkpoint import StorageAhead

        if isinstance(e, StorageAhead):  # a retry meets the same checkpoints: a reason, and an exit that fails the Job
            _report({"branch": branch, "cycle": cycle, "stage": stage, "failed": True, "reason": "StorageAhead",
                     "message": str(e)[:1000]}, report_file, quiet=True)
            typer.secho(f"storage ahead of the run: {e}", fg="red", err=True)
            raise typer.Exit(2) from None
        if no_space(e):  # retrying fills the same volume again: a reason, and an exit code that fails the Job
            _report({"branch": branch, "cycle": cycle, "stage": stage, "failed": True, "reason": "StorageFull",
                     "message": str(e)[:1000]}, report_file, quiet=True)
            typer.secho(f"storage full: {e}", fg="red", err=True)
            raise typer.Exit(EXIT_STORAGE_FULL) from None
        _report({"branch": branch, "cycle": cycle, "stage": stage, "failed": True,
                 "message": f"{type(e).__name__}: {e}"[:1000]}, report_file)
        raise
    finally:
        if live is not None:
            live.close()
            print(json.dumps({"progress_reports": {"sent": live.sent, "failed": live.failed}}), file=sys.stderr,
                  flush=True)
    _report({"branch": branch, **rep}, report_file, quiet=not rank0)


@app.command()
def hub(
    manifest: ManifestOpt,
    storage: StorageOpt,
    cycle: Annotated[int, typer.Option(min=1, help="The OPD stage whose frozen teachers to serve.")],
    port: Annotated[int, typer.Option()] = 8000,
    host: Annotated[str, typer.Option()] = "0.0.0.0",
    advertise_url: Annotated[str | None, typer.Option(
        help="The URL trainers should use, published in <storage>/hub/cycle-NNN.json once listening; "
             "default http://$COPD_POD_IP:PORT (the pod's IP), or HOST:PORT when HOST is not 0.0.0.0.")] = None,
    media_root: Annotated[list[Path] | None, typer.Option(
        help="Another directory whose images/video frames trainers may name (repeatable); the run's storage "
             "and its dataset files' directories are always allowed, nothing else.")] = None,
    report_file: ReportOpt = None,
) -> None:
    """Serve teacher scoring for the OPD stage of CYCLE (teachers frozen at its start)."""
    import os

    from copd_runtime.hub import InProcessHub, make_server, media_roots, write_hub_address
    from copd_runtime.recipes.stage import stage_start_model

    m = _manifest(manifest)
    _preflight(m.spec, storage, report_file)
    _engine_check(m.spec, report_file)
    _torch_threads()
    spec = m.spec
    snaps = {b.name: stage_start_model(spec, storage, b.name, cycle, "OPD") for b in spec.branches}
    from copd_runtime.models.device import placement
    from copd_runtime.vllm_engine import MAX_LOGPROBS, EngineUnavailable

    h = InProcessHub(snaps, spec.rl.temperature, spec.base_model.kind, placement(spec.trainer.precision),
                     engine=spec.rollout.engine, memory_fraction=spec.rollout.gpu_memory_utilization,
                     max_logprobs=max(MAX_LOGPROBS, spec.diagnostics.top_k))
    try:
        for name in snaps:
            h.teacher(name)
    except EngineUnavailable as e:
        _engine_failed(str(e), report_file)
    roots = media_roots(spec, storage) + [Path(r) for r in media_root or []]
    server = make_server(h, host, port, media_roots=roots)  # listening from here on, teachers loaded: ready
    bound = server.server_address[1]
    pod_ip = os.environ.get("COPD_POD_IP")
    url = advertise_url or (f"http://{pod_ip}:{bound}" if pod_ip else
                            f"http://{host}:{bound}" if host not in ("0.0.0.0", "::", "") else None)
    if url:
        write_hub_address(storage, cycle, url)
    print(json.dumps({"hub": "ready", "cycle": cycle, "teachers": {k: str(v) for k, v in snaps.items()},
                      "port": server.server_address[1], "media_roots": [str(r) for r in roots]}), flush=True)
    server.serve_forever()


@app.command()
def diagnose(manifest: ManifestOpt, storage: StorageOpt, cycle: Annotated[int, typer.Option(min=1)],
             report_file: ReportOpt = None) -> None:
    """Measure top-k overlap and symmetric KL of every direction on the probe set."""
    from copd_runtime.local.runner import LocalRun
    from copd_runtime.recipes.diagnose import diagnose as run_diagnose

    m = _manifest(manifest)
    _preflight(m.spec, storage, report_file)
    _torch_threads()
    lr = LocalRun(m, storage, on_event=lambda s: print(s, file=sys.stderr))
    rows = run_diagnose(m.spec, lr.final_model_dirs(), lr.datasets, cycle)
    path = storage / "diagnostics" / f"cycle-{cycle:03d}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([r.as_dict() for r in rows], indent=2))
    from copd_runtime.recipes.diagnose import compact_report

    _report(compact_report(cycle, rows), report_file)


@app.command()
def merge(manifest: ManifestOpt, storage: StorageOpt, output: Annotated[Path | None, typer.Option()] = None,
          report_file: ReportOpt = None) -> None:
    """Merge the branches' newest checkpoints into one HF model directory."""
    from copd_runtime.local.runner import LocalRun
    from copd_runtime.model_uri import resolve_model_dir
    from copd_runtime.recipes.merge import merge_dirs

    m = _manifest(manifest)
    _preflight(m.spec, storage, report_file)
    spec = m.spec
    lr = LocalRun(m, storage, on_event=lambda s: print(s, file=sys.stderr))
    dirs = lr.final_model_dirs()
    w = spec.merge_weights()
    out = output or storage / "merged"
    merge_dirs([dirs[n] for n in dirs], [w[n] for n in dirs], out, method=spec.merge.method,
               base_dir=resolve_model_dir(spec.base_model.uri, storage), scale=spec.merge.scale)
    _report({"merged": True, "path": str(out)}, report_file)


if __name__ == "__main__":
    app()
