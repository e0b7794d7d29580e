"""`kind: retrain`: the recurring job that keeps a registered model current.

1. preprocess (a cache hit when the sources did not change);
2. if the data's fingerprint is the one the current champion was trained on, stop and
   record why (there is nothing new to learn from);
3. train a challenger, warm-started from the champion's weights or from scratch;
4. evaluate the challenger and the champion on the same held-out samples;
5. move the `champion` alias only if the challenger is better by `retrain.margin`, else
   give it `challenger`; the decision and both scores go on the model version as tags.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import RetrainNode
from pipeline.errors import UserError
from pipeline.kinds.base import Job, Kind
from pipeline.tracking.registry import Decision


def champion_model_dir(name: str, uri: str, dest: Path) -> Path:
    """The champion's exported folder (model.safetensors, config.json, tokenizer.json),
    downloaded from the registry."""
    from pipeline.kinds.evaluate import resolve_model

    return resolve_model(f"models:/{name}@champion", uri, dest, "tracking.register_name").folder


def run_retrain(job: Job) -> dict[str, Any]:
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.kinds.preprocess import data_dir, run_preprocess
    from pipeline.tracking import use_experiment
    from pipeline.tracking.registry import as_dict, champion
    from pipeline.train.driver import run_train

    spec, show, uri = job.spec, job.show, job.uri
    r = spec.retrain
    name = spec.tracking.register_name or spec.job.name
    client = MlflowClient(uri)
    use_experiment(uri, spec.tracking.experiment, spec.storage.work_dir)
    with mlflow.start_run(run_name=spec.job.name, tags={"attnpipe.stage": "retrain"}) as parent:
        prep = run_preprocess(spec, show, uri, nested=True)
        current = champion(client, name) if _registered(client, name) else None
        out: dict[str, Any] = {"parent_run_id": parent.info.run_id, "registered_model": name}
        if (
            current is not None
            and current.tags.get("attnpipe.data_fingerprint") == prep["fingerprint"]
        ):
            reason = f"data unchanged since champion version {current.version} was trained"
            mlflow.set_tags({"attnpipe.decision": "skipped", "attnpipe.decision_reason": reason})
            show(f"retrain skipped: {reason}")
            return {**out, "decision": "skipped", "reason": reason}
        work = Path(spec.storage.work_dir) / "retrain" / parent.info.run_id
        champion_dir = champion_model_dir(name, uri, work) if current is not None else None
        init = str(champion_dir) if champion_dir is not None and r.warm_start else None
        show(
            f"training a challenger ({'warm start from the champion' if init else 'from scratch'})"
        )
        result = run_train(spec, data_dir(spec), uri, progress=show, nested=True, init_from=init)
        if result.get("model") is None:
            raise UserError("the challenger left no checkpoint to evaluate")
        decision, score, champion_score = challenge(
            client, name, uri, result["model"], data_dir(spec), work, r, spec.training.seed,
            champion_dir,
        )  # fmt: skip
        for who, scored in (("challenger", score), ("champion", champion_score)):
            for metric in ("loss", "bits_per_byte"):
                if scored and scored.get(metric) is not None:
                    mlflow.log_metric(f"{who}/val_{metric}", scored[metric], step=0)
        mlflow.set_tags(
            {
                "attnpipe.decision": "promoted" if decision.promoted else "not promoted",
                "attnpipe.decision_reason": decision.reason,
            }
        )
        show(f"challenger version {decision.version}: {decision.reason}")
        return {
            **out,
            "decision": "promoted" if decision.promoted else "not promoted",
            "promotion": as_dict(decision),
            "train": {k: result[k] for k in ("mlflow_run_id", "checkpoint", "metrics")},
        }


def challenge(
    client: Any,
    name: str,
    uri: str,
    model: dict[str, Any],
    data: Path,
    work: Path,
    r: RetrainNode,
    seed: int,
    champion_dir: Path | None = None,
) -> tuple[Decision, dict[str, Any], dict[str, Any] | None]:
    """Score the registered `model` (run_train's "model" entry) and the current champion
    on the same held-out samples of `data`, then promote by `r.margin` (see registry)."""
    from pipeline.kinds.evaluate import evaluate_model
    from pipeline.tracking.registry import champion, promote

    current = champion(client, name) if _registered(client, name) else None
    if current is not None and str(current.version) == str(model["version"]):
        current = None
    if current is not None and champion_dir is None:
        champion_dir = champion_model_dir(name, uri, work)
    evaluate = dict(data_dir=data, batches=r.eval_batches, seed=seed)
    score = evaluate_model(model["export_dir"], **evaluate)
    champion_score = evaluate_model(champion_dir, **evaluate) if current is not None else None
    decision = promote(
        client,
        name,
        str(model["version"]),
        "val_loss",
        score["loss"],
        champion_score["loss"] if champion_score else None,
        margin=r.margin,
    )
    return decision, score, champion_score


def _registered(client: Any, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        return False
    return True


KIND = Kind("retrain", run_retrain, trains=True)
