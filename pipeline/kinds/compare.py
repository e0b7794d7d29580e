"""`kind: compare`: train variants of one job (dense and sparse attention, say) on the same
preprocessed data with the same steps, and compare them: held-out perplexity against the
attention compute each spent, as an MLflow table and plot on a parent run, a table on the
terminal, and the best variant promoted to `champion` of the registered model.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from pipeline.config import JobSpec, first_error
from pipeline.kinds.base import Job, Kind


def variant_specs(spec: JobSpec) -> dict[str, JobSpec]:
    """Each variant: the job's resolved spec with the variant's overrides merged in, named
    `<job>-<variant>`, trained as a `train` job. An invalid variant is a FieldError at the
    path the variant sets (`compare.variants.<name>.attention.params`)."""
    from pydantic import ValidationError

    from models.config import FieldError

    base = spec.model_dump(mode="json")
    out = {}
    for name, overrides in spec.compare.variants.items():
        tree = _merge(copy.deepcopy(base), overrides)
        tree["job"].update(name=f"{spec.job.name}-{name}", kind="train")
        tree["tracking"]["register_name"] = spec.tracking.register_name or spec.job.name
        tree["compare"] = {"variants": {}, "probe": {"enabled": False}}
        try:
            out[name] = JobSpec.model_validate(tree)
        except ValidationError as exc:
            loc, message = first_error(exc)
            raise FieldError(".".join(["compare", "variants", name, *loc]), message) from None
    return out


def check_compare(spec: JobSpec) -> None:
    """At least two variants, each a valid job."""
    from models.config import FieldError

    if len(spec.compare.variants) < 2:
        raise FieldError("compare.variants", "a compare job needs at least two variants")
    variant_specs(spec)


def _merge(tree: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict) and key != "params":
            _merge(tree[key], value)
        else:
            tree[key] = value
    return tree


def attention_flops_per_token(spec: JobSpec) -> float:
    """The attention part of the training FLOPs per token (PaLM's 12*L*H*Q*T, scaled by
    the fraction of the layout the pattern computes)."""
    from pipeline.train.flops import attention_density

    m = spec.model.architecture()
    seq = spec.data.seq_len
    density = attention_density(spec.attention, m, seq)
    layers = m.encoder_layers + m.decoder_layers
    return 12 * layers * m.n_heads * m.head_dim * seq * density


def run_compare(job: Job) -> dict[str, Any]:
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.kinds.evaluate import bits_per_byte
    from pipeline.kinds.preprocess import data_dir, run_preprocess
    from pipeline.kinds.retrain import challenge
    from pipeline.probe import table as probe_table
    from pipeline.tracking import use_experiment
    from pipeline.train.driver import run_train

    spec, show, uri = job.spec, job.show, job.uri
    variants = variant_specs(spec)
    name = spec.tracking.register_name or spec.job.name
    client = MlflowClient(uri)
    use_experiment(uri, spec.tracking.experiment, spec.storage.work_dir)
    with mlflow.start_run(run_name=spec.job.name, tags={"attnpipe.stage": "compare"}) as parent:
        prep = run_preprocess(spec, show, uri, nested=True)
        rows, models = [], {}
        for label, vspec in variants.items():
            attention = vspec.attention
            show(f"training variant {label!r}: {attention.pattern} on {attention.backend}")
            result = run_train(vspec, data_dir(spec), uri, progress=show, nested=True)
            per_token = attention_flops_per_token(vspec)
            tokens = vspec.training.steps * vspec.training.global_batch_size * spec.data.seq_len
            val_loss = result["metrics"].get("val/loss")
            rows.append(
                {
                    "variant": label,
                    "pattern": vspec.attention.pattern,
                    "backend": vspec.attention.backend,
                    "val_loss": val_loss,
                    "val_perplexity": result["metrics"].get("val/perplexity"),
                    # the same loss per UTF-8 byte of the split (pipeline/kinds/evaluate.py)
                    "val_bits_per_byte": bits_per_byte(
                        val_loss, prep["splits"]["val"], spec.model.family
                    ),
                    "attention_gflops_per_token": per_token / 1e9,
                    "attention_pflops_spent": per_token * tokens / 1e15,
                    "train_seconds": result["seconds"],
                    "model_version": str(result["model"]["version"]) if result["model"] else None,
                    "mlflow_run_id": result["mlflow_run_id"],
                }
            )
            models[label] = result["model"]
        rows.sort(key=lambda r: r["val_loss"])
        probes = _probe(spec, variants, rows, show) if spec.compare.probe.enabled else []
        work = Path(spec.storage.work_dir) / "compare" / parent.info.run_id
        for row in rows:  # the best challenges the champion first; the rest then challenge it
            if models[row["variant"]] is None:
                continue
            decision, _, _ = challenge(
                client, name, uri, models[row["variant"]], data_dir(spec), work,
                spec.retrain, spec.training.seed,
            )  # fmt: skip
            row["decision"] = "champion" if decision.promoted else "challenger"
        mlflow.log_table(_columns(rows), artifact_file="comparison.json")
        mlflow.log_figure(_plot(rows, probes), "comparison.png")
        for row in rows:
            mlflow.log_metric(f"{row['variant']}/val_perplexity", row["val_perplexity"], step=0)
            if row["val_bits_per_byte"] is not None:
                mlflow.log_metric(f"{row['variant']}/val_bits_per_byte", row["val_bits_per_byte"])
        if probes:
            mlflow.log_table(probe_table(probes), artifact_file="probe.json")
            for probe in probes:
                for distance, accuracy in probe["accuracy"].items():
                    key = f"probe/{_metric_name(probe['variant'])}/accuracy_d{distance}"
                    mlflow.log_metric(key, accuracy, step=0)
        show_table(rows, show)
        if probes:
            show_probe_table(probes, show)
        show(f"see it in the MLflow UI: attnpipe ui --work-dir {spec.storage.work_dir}")
        return {
            "parent_run_id": parent.info.run_id,
            "registered_model": name,
            "rows": rows,
            "probe": probes,
        }


def _probe(
    spec: JobSpec, variants: dict[str, JobSpec], rows: list[dict[str, Any]], show: Any
) -> list[dict[str, Any]]:
    """The long-range probe for the variants `compare.probe.variants` names (and each sparse
    one's window alone), with each row's attention compute at the job's sequence length."""
    from pipeline.probe import run_probe

    probes = run_probe(variants, spec.compare.probe, show)
    by_name = {row["variant"]: row for row in rows}
    for probe in probes:
        base = variants[probe["of_variant"]]
        attention = base.attention.model_copy(
            update={"pattern": probe["pattern"], "params": probe["params"]}
        )
        probe["attention_gflops_per_token"] = (
            attention_flops_per_token(base.model_copy(update={"attention": attention})) / 1e9
        )
        if probe["variant"] in by_name:
            by_name[probe["variant"]]["probe_accuracy"] = probe["accuracy"]
    return probes


def _metric_name(variant: str) -> str:
    return variant.replace(" (window only)", "-window-only").replace(" ", "-")


def _columns(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Every key any row has (a variant left out of the probe has no probe_accuracy)."""
    keys = list(dict.fromkeys(key for row in rows for key in row))
    return {key: [row.get(key) for row in rows] for key in keys}


def _plot(rows: list[dict[str, Any]], probes: list[dict[str, Any]]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if probes else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 3.8), dpi=120, squeeze=False)
    ax = axes[0][0]
    for row in rows:
        x = row["attention_gflops_per_token"] * 1e3
        ax.scatter(x, row["val_perplexity"], s=60)
        ax.annotate(
            row["variant"], (x, row["val_perplexity"]), textcoords="offset points", xytext=(6, 4)
        )
    ax.margins(x=0.3, y=0.2)
    ax.set_xlabel("attention MFLOPs per training token")
    ax.set_ylabel("validation perplexity")
    ax.set_title("perplexity against attention compute")
    ax.grid(alpha=0.3)
    if probes:
        ax = axes[0][1]
        far = max(probes[0]["accuracy"])
        for probe in probes:
            x, y = probe["attention_gflops_per_token"] * 1e3, probe["accuracy"][far]
            ax.scatter(x, y, s=60, marker="o" if "window only" not in probe["variant"] else "x")
            ax.annotate(probe["variant"], (x, y), textcoords="offset points", xytext=(6, 4))
        ax.axhline(probes[0]["chance"], color="grey", linestyle=":", label="chance")
        ax.margins(x=0.3)
        ax.set_ylim(-0.05, 1.12)
        ax.set_xlabel("attention MFLOPs per training token")
        ax.set_ylabel(f"probe accuracy, key {far} tokens back")
        ax.set_title("long-range retrieval against attention compute")
        ax.legend(loc="lower right")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def show_table(rows: list[dict[str, Any]], show: Any) -> None:
    from rich.table import Table

    table = Table(title="variants, best first")
    probed = any("probe_accuracy" in row for row in rows)
    columns = ["variant", "attention", "val ppl", "val bpb", "attn GFLOP/token"]
    columns += ["probe acc (far)"] if probed else []
    for column in (*columns, "seconds", "registry"):
        table.add_column(column)
    for row in rows:
        cells = [
            row["variant"],
            f"{row['pattern']} / {row['backend']}",
            f"{row['val_perplexity']:.2f}",
            "-" if row.get("val_bits_per_byte") is None else f"{row['val_bits_per_byte']:.3f}",
            f"{row['attention_gflops_per_token']:.4f}",
        ]
        if probed:
            accuracy = row.get("probe_accuracy") or {}
            cells.append(f"{accuracy[max(accuracy)]:.2f}" if accuracy else "-")
        cells += [
            f"{row['train_seconds']:.0f}",
            f"v{row['model_version']} {row.get('decision', '')}",
        ]
        table.add_row(*cells)
    _console().print(table)


def _console() -> Any:
    """stderr; where it is not a terminal (`make demo | tee`, a Ray job's log) wide enough
    for the tables instead of rich's 80 columns."""
    import sys

    from rich.console import Console

    return Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def show_probe_table(probes: list[dict[str, Any]], show: Any) -> None:
    from rich.table import Table

    distances = list(probes[0]["accuracy"])
    table = Table(
        title=f"long-range probe: key accuracy by distance (chance {probes[0]['chance']:.2f})"
    )
    for column in ("model", "attention", "window reach", *(f"d={d}" for d in distances)):
        table.add_column(column)
    for probe in probes:
        params = ", ".join(f"{k}={v}" for k, v in probe["params"].items()).replace(" ", "")
        table.add_row(
            probe["variant"],
            f"{probe['pattern']}" + (f" ({params})" if params else ""),
            "-" if probe["reach"] is None else f"{probe['reach']} tokens",
            *(f"{probe['accuracy'][d]:.2f}" for d in distances),
        )
    _console().print(table)


KIND = Kind("compare", run_compare, trains=True, check=check_compare)
