"""The `attnpipe` command: a thin layer over the pipeline package.

Bad input exits with code 2 and one line on stderr; commands are added here only when they
work end to end.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from pipeline.config import JobSpec, resolved_yaml, spec_warnings
from pipeline.errors import UserError
from pipeline.jobs.scheduler import default_state_dir
from pipeline.jobs.submit import Cluster
from pipeline.kinds import load_job

app = typer.Typer(
    name="attnpipe",
    help="Train dense and sparse attention transformers with Ray, DeepSpeed and MLflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

SpecArg = Annotated[Path, typer.Argument(help="Job spec (YAML), e.g. jobs/decoder-tiny.yaml.")]
OverridesArg = Annotated[
    list[str] | None,
    typer.Argument(help="Overrides applied last, as key.path=value (e.g. training.lr=3e-4)."),
]


def fail(message: str) -> NoReturn:
    """One line on stderr, exit code 2: the contract for every user error."""
    typer.echo(f"attnpipe: error: {message}", err=True)
    raise typer.Exit(2)


def choose(option: str, value: str, *allowed: str) -> str:
    """An option that takes one of a few words: anything else is one line."""
    if value not in allowed:
        fail(f"{option}: expected {' or '.join(allowed)}, got {value!r}")
    return value


def load(spec: Path, overrides: list[str] | None) -> JobSpec:
    """The validated spec; its warnings go to stderr, one line each."""
    try:
        resolved = load_job(spec, overrides or [])
    except UserError as exc:
        fail(str(exc))
    for line in spec_warnings(resolved):
        typer.echo(f"attnpipe: warning: {line}", err=True)
    return resolved


@app.command()
def validate(
    spec: SpecArg,
    overrides: OverridesArg = None,
    output: Annotated[str, typer.Option("--format", help="yaml or json")] = "yaml",
) -> None:
    """Check a job spec and print it fully resolved (defaults, preset, file, overrides)."""
    choose("--format", output, "yaml", "json")
    resolved = load(spec, overrides)
    if output == "json":
        typer.echo(json.dumps(resolved.model_dump(mode="json"), indent=2))
    else:
        typer.echo(resolved_yaml(resolved), nl=False)


@app.command()
def schema(
    output: Annotated[str, typer.Option("--format", help="markdown or json")] = "markdown",
    update: Annotated[
        Path | None,
        typer.Option("--update", help="Rewrite the reference block in this file (README.md)."),
    ] = None,
) -> None:
    """The job-spec reference generated from the schema: every key, type, default, range."""
    from pipeline.config.reference import BEGIN, json_schema, reference_markdown, splice

    choose("--format", output, "markdown", "json")
    text = json_schema() if output == "json" else reference_markdown()
    if update is None:
        typer.echo(text)
        return
    if output != "markdown":
        fail("--update: writes the Markdown reference; drop --format json")
    try:
        current = update.read_text()
    except OSError as exc:
        fail(f"--update {update}: {exc.strerror}")
    if BEGIN not in current:
        fail(f"--update {update}: no line {BEGIN!r} to replace from")
    update.write_text(splice(current, text))
    typer.echo(f"{update}: job-spec reference updated", err=True)


ResumeOpt = Annotated[
    str | None,
    typer.Option(
        "--resume-from",
        help="A checkpoint folder, a folder of checkpoints (the newest complete one), "
        "or the MLflow run id of a training run.",
    ),
]


@app.command()
def run(spec: SpecArg, overrides: OverridesArg = None, resume_from: ResumeOpt = None) -> None:
    """Run a job on this machine, on an embedded Ray and MLflow (any kind: preprocess,
    train, pipeline, evaluate, retrain, compare). Prints a JSON summary on stdout; progress
    goes to stderr."""
    resolved = load(spec, overrides)
    from pipeline.kinds import kind_of
    from pipeline.run import run_job
    from pipeline.train.driver import TrainingFailed

    try:
        # the workers' output Ray forwards is progress: keep stdout for the summary
        with contextlib.redirect_stdout(sys.stderr):
            result = run_job(resolved, resume_from=resume_from)
    except UserError as exc:
        fail(str(exc))
    except TrainingFailed as exc:
        typer.echo(f"attnpipe: {training_failure(exc, resolved.training.max_failures)}", err=True)
        raise typer.Exit(1) from None
    summary = kind_of(resolved).summary(result)
    typer.echo(json.dumps(summary, indent=2, default=str))


def training_failure(exc: BaseException, max_failures: int) -> str:
    """One line for training that failed beyond training.max_failures: each failed rank
    and the first line of its error (Ray's own message opens with a bare heading and goes
    on for pages: tracebacks, actor ids)."""
    failures = getattr(exc.__cause__, "worker_failures", None) or {}
    ranks = "; ".join(
        f"rank {rank}: {type(error).__name__}: {(str(error).strip() or '-').splitlines()[0][:160]}"
        for rank, error in sorted(failures.items())
    )
    return f"training failed (training.max_failures={max_failures}): {ranks}" if ranks else str(exc)


@app.command("plan")
def plan_memory(
    spec: SpecArg,
    overrides: OverridesArg = None,
    output: Annotated[str, typer.Option("--format", help="text or json")] = "text",
) -> None:
    """Estimate per-GPU memory (ZeRO states, activations) and whether it fits resources.gpu_type."""
    choose("--format", output, "text", "json")
    resolved = load(spec, overrides)
    from pipeline.plan import plan_job, render

    try:
        result = plan_job(resolved, source=str(spec))
    except UserError as exc:
        fail(str(exc))
    if output == "json":
        typer.echo(json.dumps(result.to_json(), indent=2))
    else:
        render(result)


TrackingUriOpt = Annotated[
    str | None,
    typer.Option(
        "--tracking-uri",
        help="MLflow store holding the run id or registered model (default: "
        "$MLFLOW_TRACKING_URI, else the local store in attnpipe-work).",
    ),
]


@app.command("export")
def export_model(
    target: Annotated[
        str,
        typer.Argument(
            help="A checkpoint folder, a folder of checkpoints (the newest complete one), "
            "or the MLflow run id of a training run."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Folder to write (new or empty).")],
    tracking_uri: TrackingUriOpt = None,
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            help="attnpipe (model.safetensors + config.json + tokenizer.json) or hf (a "
            "transformers folder: GPT-2, GPT-NeoX or LLaMA style decoders)",
        ),
    ] = "attnpipe",
) -> None:
    """Consolidate a checkpoint's ZeRO partitions into model.safetensors + config.json +
    tokenizer.json, or a Hugging Face transformers folder."""
    from pipeline.train.export import export

    choose("--format", fmt, "attnpipe", "hf")
    try:
        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's progress: not the summary
            result = export(target, out, store(tracking_uri), fmt)
    except UserError as exc:
        fail(str(exc))
    typer.echo(json.dumps(result, indent=2))


@app.command()
def generate(
    model: Annotated[
        str,
        typer.Argument(
            help="models:/NAME@ALIAS, models:/NAME/VERSION, an MLflow run id, a checkpoint "
            "folder, a folder of checkpoints or an exported folder."
        ),
    ],
    prompt: Annotated[
        str,
        typer.Argument(
            help="Text a decoder continues, an encoder-decoder maps to its target, or an "
            "encoder fills at each <|mask|>."
        ),
    ],
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 32,
    temperature: Annotated[
        float, typer.Option("--temperature", min=0.0, help="0: greedy (the default).")
    ] = 0.0,
    top_k: Annotated[
        int | None, typer.Option("--top-k", min=1, help="Sample from the k likeliest only.")
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of the sampling.")] = None,
    tracking_uri: TrackingUriOpt = None,
) -> None:
    """Generate text from a trained model, printed on stdout as it comes."""
    import tempfile

    from models.generate import complete
    from models.pretrained import load_for_text
    from pipeline.kinds.evaluate import resolve_model

    def show(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    with tempfile.TemporaryDirectory(prefix="attnpipe-generate-") as work:
        try:
            with contextlib.redirect_stdout(sys.stderr):  # downloads' progress
                found = resolve_model(model, store(tracking_uri), Path(work), "MODEL")
        except UserError as exc:
            fail(str(exc))
        net, tok, family = load_for_text(found.folder)
        complete(net, tok, family, prompt, max_new_tokens, temperature, top_k, seed, show)
    sys.stdout.write("\n")


def store(tracking_uri: str | None) -> str:
    """The MLflow store a command reads: --tracking-uri, $MLFLOW_TRACKING_URI, or the
    local store of the default work directory."""
    import os

    from pipeline.tracking import tracking_uri as default_uri

    return (
        tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri(None, "attnpipe-work")
    )


@app.command()
def ui(
    work_dir: Annotated[
        Path, typer.Option("--work-dir", help="The jobs' storage.work_dir.")
    ] = Path("attnpipe-work"),
    port: Annotated[int, typer.Option("--port", help="Port on 127.0.0.1.")] = 5000,
) -> None:
    """Serve the local MLflow store of a work directory on 127.0.0.1 (Ctrl-C stops it)."""
    from pipeline.tracking import tracking_uri
    from pipeline.tracking.server import MlflowServer

    if not (work_dir / "mlflow.db").exists():
        fail(f"--work-dir {work_dir}: no MLflow store (mlflow.db) there yet; run a job first")
    server = MlflowServer(
        work_dir / "ui",
        store_uri=tracking_uri(None, work_dir),
        port=port,
        artifacts=work_dir / "mlartifacts",
    )
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill PID` stops it cleanly
    try:
        server.start()
        typer.echo(f"MLflow UI: {server.uri}  (serving {work_dir}; Ctrl-C stops it)", err=True)
        while server.proc is not None and server.proc.poll() is None:
            time.sleep(0.5)
    except RuntimeError as exc:
        fail(f"mlflow server on 127.0.0.1:{port} did not start: {str(exc).splitlines()[-1]}")
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


@app.command("models")
def list_models(
    seq_len: Annotated[
        int | None, typer.Option(help="Sequence length for FLOPs/token; default each max_seq_len.")
    ] = None,
) -> None:
    """List the model presets with their exact parameter counts and training FLOPs per token."""
    from rich.console import Console
    from rich.table import Table

    from models.config import PRESETS, count_params, flops_per_token, preset_config

    table = Table(title="attnpipe model presets")
    for column in (
        "preset",
        "family",
        "layers",
        "d_model",
        "heads",
        "kv heads",
        "d_ff",
        "positional",
        "params",
        "FLOPs/token",
    ):
        table.add_column(
            column, justify="left" if column in ("preset", "family", "positional") else "right"
        )
    for name in PRESETS:
        cfg = preset_config(name)
        layers = (
            f"{cfg.encoder_layers}+{cfg.decoder_layers}"
            if cfg.family == "encoder_decoder"
            else str(cfg.n_layers)
        )
        flops = flops_per_token(cfg, seq_len or cfg.max_seq_len)
        table.add_row(
            name,
            cfg.family,
            layers,
            str(cfg.d_model),
            str(cfg.n_heads),
            str(cfg.kv_heads),
            str(cfg.ffn_dim),
            cfg.positional,
            f"{count_params(cfg):,}",
            f"{flops:.3e}",
        )
    Console(width=160).print(table)


# --------------------------------------------------------------------------- Ray jobs

AddressOpt = Annotated[
    str | None,
    typer.Option(
        "--address", help="The cluster's dashboard, http://HOST:8265 (default: $RAY_ADDRESS)."
    ),
]
ImageOpt = Annotated[
    str | None,
    typer.Option("--image", help="Run in this container image (attnpipe installed in it)."),
]
PipOpt = Annotated[
    list[str] | None,
    typer.Option("--pip", help="A package the job needs beyond the cluster's (repeatable)."),
]
EntrypointCpusOpt = Annotated[
    float,
    typer.Option(
        "--entrypoint-cpus", min=0, help="CPUs the driver reserves (0: all for the workers)."
    ),
]
SubmissionArg = Annotated[str, typer.Argument(help="The job's submission id.")]
StateDirOpt = Annotated[
    Path,
    typer.Option(
        "--state-dir",
        envvar="ATTNPIPE_SCHEDULER_DIR",
        help="The scheduler's state folder (schedules, firings, log, lock).",
    ),
]
DEFAULT_STATE = default_state_dir()
# A job's end as an exit code, for scripts and CI: 2 stays bad input (an unknown id, an
# unreachable cluster), as everywhere in attnpipe.
JOB_EXIT = {"FAILED": 1, "STOPPED": 3}
JOB_EXIT_HELP = (
    "Exit code: 0 when the job SUCCEEDED (or, for status, is PENDING or RUNNING), 1 when it "
    "FAILED, 3 when it was STOPPED, 2 for bad input (an unknown id, no cluster)."
)


def cluster(address: str | None = None) -> Cluster:
    try:
        return Cluster(address)
    except UserError as exc:
        fail(str(exc))


@app.command()
def submit(
    spec: SpecArg,
    overrides: OverridesArg = None,
    address: AddressOpt = None,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the logs until it ends.")] = False,
    image: ImageOpt = None,
    pip: PipOpt = None,
    entrypoint_cpus: EntrypointCpusOpt = 0.0,
) -> None:
    """Submit a job spec to a Ray cluster, to run there with `attnpipe run`.

    Prints the submission id and the MLflow link; --wait follows the logs until it ends.
    Exit code: 0 when submitted (with --wait: when the job SUCCEEDED), 1 when the job
    FAILED, 3 when it was STOPPED (--wait), 2 for bad input (nothing submitted)."""
    from datetime import datetime, timezone

    from pipeline.jobs import submit as jobs

    resolved = load(spec, overrides)
    notes = jobs.cluster_notes(resolved)
    try:
        sid = jobs.submission_id(resolved.job.name, datetime.now(timezone.utc))
        ray = cluster(address)
        jobs.submit_spec(
            resolved, ray, sid, image=image, pip=pip or (), entrypoint_cpus=entrypoint_cpus,
            notes=notes,
        )  # fmt: skip
    except UserError as exc:
        fail(str(exc))
    for note in notes:
        typer.echo(f"attnpipe: note: {note}", err=True)
    typer.echo(f"submission_id: {sid}")
    t = resolved.tracking
    if not wait:
        link = jobs.mlflow_link(t.uri, t.experiment)
        typer.echo(f"mlflow: {link['url'] if link else t.uri or 'sqlite under storage.work_dir'}")
        return
    try:
        details = jobs.follow(ray, sid, lambda text: typer.echo(text, err=True, nl=False))
    except KeyboardInterrupt:
        typer.echo(f"attnpipe: {sid} goes on; attnpipe logs {sid} --follow", err=True)
        raise typer.Exit(130) from None
    link = jobs.mlflow_link(t.uri, t.experiment, sid)
    if link:
        typer.echo(f"mlflow: {link['url']}")
    status = jobs.status_of(details)
    typer.echo(f"status: {status}")
    if status != "SUCCEEDED":
        # Ray's message goes on with the tail of the logs just streamed: its first line
        message = (details.message or "").split("\n")[0].split(", last available logs")[0]
        typer.echo(f"attnpipe: job {sid} {status}: {message}", err=True)
        raise typer.Exit(JOB_EXIT.get(status, 1))


@app.command(help=f"A submitted job's state, times and MLflow link. {JOB_EXIT_HELP}")
def status(submission: SubmissionArg, address: AddressOpt = None) -> None:
    from pipeline.jobs.submit import describe, status_of

    try:
        details = cluster(address).info(submission)
        typer.echo("\n".join(describe(details)))
    except UserError as exc:
        fail(str(exc))
    raise typer.Exit(JOB_EXIT.get(status_of(details), 0))


@app.command()
def logs(
    submission: SubmissionArg,
    address: AddressOpt = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Until the job ends.")] = False,
) -> None:
    """A submitted job's output (its driver's stdout and stderr)."""
    from pipeline.jobs.submit import follow as follow_logs

    ray = cluster(address)
    try:
        if follow:
            follow_logs(ray, submission, lambda text: typer.echo(text, nl=False))
        else:
            typer.echo(ray.logs(submission), nl=False)
    except UserError as exc:
        fail(str(exc))


@app.command()
def stop(submission: SubmissionArg, address: AddressOpt = None) -> None:
    """Stop a submitted job."""
    from pipeline.jobs.submit import status_of

    ray = cluster(address)
    try:
        stopped = ray.stop(submission)
        state = status_of(ray.info(submission))
    except UserError as exc:
        fail(str(exc))
    typer.echo(f"{submission}: {'stop requested' if stopped else 'not running'} ({state})")


@app.command("list")
def list_jobs(address: AddressOpt = None) -> None:
    """The jobs submitted to the cluster, oldest first."""
    from pipeline.jobs.submit import table

    try:
        typer.echo("\n".join(table(cluster(address).jobs())))
    except UserError as exc:
        fail(str(exc))


schedule_app = typer.Typer(
    help="Recurring jobs: a spec's `schedule` node (cron, timezone), fired by `attnpipe "
    "scheduler`.",
    no_args_is_help=True,
)
app.add_typer(schedule_app, name="schedule")


@schedule_app.command("add")
def schedule_add(
    spec: SpecArg,
    overrides: OverridesArg = None,
    name: Annotated[str | None, typer.Option(help="Default: job.name.")] = None,
    address: AddressOpt = None,
    image: ImageOpt = None,
    pip: PipOpt = None,
    entrypoint_cpus: EntrypointCpusOpt = 0.0,
    replace: Annotated[bool, typer.Option("--replace", help="Replace a schedule.")] = False,
    state_dir: StateDirOpt = DEFAULT_STATE,
) -> None:
    """Schedule a job spec by its schedule.cron (5 fields, or 6 with seconds first)."""
    from pipeline.jobs.scheduler import add_schedule, slot_text

    resolved = load(spec, overrides)
    try:
        added = add_schedule(
            resolved, str(spec), state_dir, name=name, address=address, image=image,
            pip=pip or (), entrypoint_cpus=entrypoint_cpus, replace=replace,
        )  # fmt: skip
    except UserError as exc:
        fail(str(exc))
    slot = added.next_slot()
    typer.echo(
        f"schedule {added.name}: '{added.cron}' {added.timezone}, next slot "
        f"{slot_text(slot) if slot else 'none'}, to {added.address or '$RAY_ADDRESS'}; "
        f"`attnpipe scheduler --state-dir {state_dir}` fires it"
    )


@schedule_app.command("list")
def schedule_list(state_dir: StateDirOpt = DEFAULT_STATE) -> None:
    """The schedules, their next slots and last firings."""
    from pipeline.jobs.scheduler import Store, schedule_table

    try:
        typer.echo("\n".join(schedule_table(Store(state_dir))))
    except UserError as exc:
        fail(str(exc))


@schedule_app.command("remove")
def schedule_remove(name: str, state_dir: StateDirOpt = DEFAULT_STATE) -> None:
    """Remove a schedule; a running scheduler drops it within its poll interval."""
    from pipeline.jobs.scheduler import Store

    try:
        Store(state_dir).remove(name)
    except UserError as exc:
        fail(str(exc))
    typer.echo(f"schedule {name}: removed")


@app.command()
def scheduler(
    state_dir: StateDirOpt = DEFAULT_STATE,
    misfire_grace: Annotated[
        int, typer.Option(min=1, help="Seconds a late slot still fires (a restart, a pause).")
    ] = 600,
    poll: Annotated[float, typer.Option(min=0.1, help="Seconds between schedule reads.")] = 5.0,
) -> None:
    """The one scheduling process: submits every schedule's slots until stopped.

    Ctrl-C or SIGTERM (`kill PID`; the pid is in <state-dir>/scheduler.lock) stops it."""
    from pipeline.jobs.scheduler import run_scheduler

    try:
        run_scheduler(state_dir, misfire_grace_s=misfire_grace, poll_s=poll)
    except UserError as exc:
        fail(str(exc))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
