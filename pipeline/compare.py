"""`kind: compare`: train variants of one job (dense and sparse attention, say) on the same
preprocessed data with the same steps, and compare them: held-out perplexity against the
attention compute each spent, as an MLflow table and plot on a parent run, a table on the
terminal, and the best variant promoted to `champion` of the registered model.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from pipeline.config import JobSpec, validate_spec


def variant_specs(spec: JobSpec) -> dict[str, JobSpec]:
    """Each variant: the job's resolved spec with the variant's overrides merged in, named
    `<job>-<variant>`, trained as a `train` job."""
    base = spec.model_dump(mode="json")
    out = {}
    for name, overrides in spec.compare.variants.items():
        tree = _merge(copy.deepcopy(base), overrides)
        tree["job"].update(name=f"{spec.job.name}-{name}", kind="train")
        tree["tracking"]["register_name"] = spec.tracking.register_name or spec.job.name
        tree["compare"] = {"variants": {}}
        out[name] = validate_spec(tree, f"compare.variants.{name}")
    return out


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


def run_compare(spec: JobSpec, show: Any, uri: str) -> dict[str, Any]:
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.retrain import challenge
    from pipeline.run import data_dir, run_preprocess
    from pipeline.tracking import use_experiment
    from pipeline.train.driver import run_train

    variants = variant_specs(spec)
    name = spec.tracking.register_name or spec.job.name
    client = MlflowClient(uri)
    use_experiment(uri, spec.tracking.experiment, spec.storage.work_dir)
    with mlflow.start_run(run_name=spec.job.name, tags={"attnpipe.stage": "compare"}) as parent:
        run_preprocess(spec, show, nested=True)
        rows, models = [], {}
        for label, vspec in variants.items():
            attention = vspec.attention
            show(f"training variant {label!r}: {attention.pattern} on {attention.backend}")
            result = run_train(vspec, data_dir(spec), uri, progress=show, nested=True)
            per_token = attention_flops_per_token(vspec)
            tokens = vspec.training.steps * vspec.training.global_batch_size * spec.data.seq_len
            rows.append(
                {
                    "variant": label,
                    "pattern": vspec.attention.pattern,
                    "backend": vspec.attention.backend,
                    "val_loss": result["metrics"].get("val/loss"),
                    "val_perplexity": result["metrics"].get("val/perplexity"),
                    "attention_gflops_per_token": per_token / 1e9,
                    "attention_pflops_spent": per_token * tokens / 1e15,
                    "train_seconds": result["seconds"],
                    "model_version": str(result["model"]["version"]) if result["model"] else None,
                    "mlflow_run_id": result["mlflow_run_id"],
                }
            )
            models[label] = result["model"]
        rows.sort(key=lambda r: r["val_loss"])
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
        mlflow.log_figure(_plot(rows), "comparison.png")
        for row in rows:
            mlflow.log_metric(f"{row['variant']}/val_perplexity", row["val_perplexity"], step=0)
        show_table(rows, show)
        show(f"see it in the MLflow UI: attnpipe ui --work-dir {spec.storage.work_dir}")
        return {"parent_run_id": parent.info.run_id, "registered_model": name, "rows": rows}


def _columns(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    return {key: [row.get(key) for row in rows] for key in rows[0]}


def _plot(rows: list[dict[str, Any]]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    for row in rows:
        ax.scatter(row["attention_gflops_per_token"], row["val_perplexity"], s=60)
        ax.annotate(
            row["variant"],
            (row["attention_gflops_per_token"], row["val_perplexity"]),
            textcoords="offset points",
            xytext=(6, 4),
        )
    ax.set_xlabel("attention GFLOPs per training token")
    ax.set_ylabel("validation perplexity")
    ax.set_title("perplexity against attention compute")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def show_table(rows: list[dict[str, Any]], show: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="variants, best first")
    for column in ("variant", "attention", "val ppl", "attn GFLOP/token", "seconds", "registry"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["variant"],
            f"{row['pattern']} / {row['backend']}",
            f"{row['val_perplexity']:.2f}",
            f"{row['attention_gflops_per_token']:.4f}",
            f"{row['train_seconds']:.0f}",
            f"v{row['model_version']} {row.get('decision', '')}",
        )
    Console(stderr=True).print(table)
