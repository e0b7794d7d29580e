"""Held-out evaluation of trained models, and `kind: evaluate`.

`evaluate_model` scores one exported folder (models/pretrained.py) on a split of a
preprocessed output: loss, perplexity and, for a decoder, bits per byte. Every model scored
on the same output sees the same samples, so models compare on equal terms; the retrain
and compare jobs' challenge (pipeline/kinds/retrain.py) calls it too.

Bits per byte: the loss in bits of the tokens a model predicts, spread over the UTF-8 bytes
of the text they encode, `loss / ln 2 x predicted tokens / bytes`, with the split's own
counts from the manifest (preprocessing counts every document's tokens, its end token and
its bytes). A model's tokenizer no longer matters, so models with different vocabularies
compare. The ratio is the split's: exact when the whole split is scored (`batches: null`),
an estimate from the first batches otherwise. Reported for the decoder only: a masked-LM
loss is not a code length, and a pair's target may be cut at `max_target_len`.

`run_evaluate` (the job): each model of `evaluate.models`, resolved to an exported folder,
scored on each split of `evaluate.data` (or of the spec's data node preprocessed with the
model's own tokenizer), one nested MLflow run per model with its metrics linked to the
model version's LoggedModel and the dataset, tags on the version keyed by the data's
fingerprint, and a table of generated samples. With `evaluate.probe`, the long-range probe
(pipeline/probe.py) on each model's own attention, and on its window alone.
"""

from __future__ import annotations

import math
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from pipeline.kinds.base import Job, Kind


def bits_per_byte(loss: float | None, split: dict[str, Any], family: str) -> float | None:
    """`loss` (nats per predicted token) of a model of `family` in bits per UTF-8 byte of
    the split's text; None for no loss, a family other than the decoder (see above), or an
    output written before preprocessing counted bytes."""
    tokens, size = split.get("predicted_tokens"), split.get("bytes")
    if loss is None or family != "decoder" or not tokens or not size:
        return None
    return loss / math.log(2) * tokens / size


def evaluate_model(
    model_dir: str | Path,
    data_dir: str | Path,
    batches: int | None = 20,
    batch_size: int = 8,
    seed: int = 0,
    split: str = "val",
) -> dict[str, Any]:
    """{"loss", "perplexity", "bits_per_byte", "tokens", "samples"} of the model in
    `model_dir` on `split` of `data_dir`: its first `batches` batches (None: all), in order
    (masked-LM corruption seeded, so it repeats exactly)."""
    import torch

    from models.pretrained import load_config, load_pretrained
    from pipeline.data.reader import ShardReader
    from pipeline.data.remote import local_copy
    from pipeline.data.shards import read_manifest
    from pipeline.train.objectives import Objective

    model = load_pretrained(model_dir)
    data_dir = local_copy(data_dir)  # a URI: this node's mirror of it
    manifest = read_manifest(data_dir)
    family = load_config(model_dir)["model"]["family"]
    objective = Objective(
        family=family,
        special_ids=manifest["special_ids"],
        max_source_len=manifest.get("max_source_len"),
        vocab_size=manifest["vocab_size"],
    )
    reader = ShardReader(data_dir, split, seed=seed, shuffle=False)
    whole = -(-len(reader) // batch_size)
    batches = whole if batches is None else min(batches, max(1, len(reader) // batch_size))
    total, count, seen = 0.0, 0, 0
    for i in range(batches):
        size = min(batch_size, len(reader) - seen)
        gen = torch.Generator().manual_seed(seed * 7_919 + i)
        with torch.no_grad():
            loss, n = objective.loss(model, reader.next_batch(size), gen)
        total, count, seen = total + float(loss), count + n, seen + size
    loss = total / max(count, 1)
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "bits_per_byte": bits_per_byte(loss, manifest["splits"][split], family),
        "tokens": count,
        "samples": seen,
    }


# --------------------------------------------------------------------------- which model


@dataclass(frozen=True)
class Resolved:
    """A model to evaluate: its exported folder and, for a registered one, its version."""

    ref: str
    label: str
    folder: Path
    name: str | None = None
    version: str | None = None
    model_id: str | None = None


MODEL_URI = re.compile(r"^models:/([^/@]+)(?:@([^/]+)|/(\d+))$")


def resolve_model(ref: str, uri: str, work: Path, option: str = "evaluate.models") -> Resolved:
    """`ref` as an exported folder: `models:/name@alias` or `models:/name/3` downloaded from
    the registry; an exported folder as it is; a checkpoint, a folder of checkpoints or an
    MLflow run id exported into `work`."""
    found = MODEL_URI.match(ref)
    if found:
        return _registered_model(ref, found, uri, work, option)
    path = Path(ref)
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return Resolved(ref, path.name, path.resolve())
    if ref.startswith("models:/"):
        raise UserError(f"{option}: {ref!r} is not models:/NAME@ALIAS or models:/NAME/VERSION")
    from pipeline.train.export import export

    out = work / "exported" / re.sub(r"[^A-Za-z0-9._-]", "_", ref.strip("/"))[-80:]
    if out.exists():
        shutil.rmtree(out)
    export(ref, out, uri, option=option)
    return Resolved(ref, path.name if path.exists() else ref[:8], out)


def _registered_model(ref: str, found: re.Match, uri: str, work: Path, option: str) -> Resolved:
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    name, alias, number = found.groups()
    client = MlflowClient(uri)
    try:
        if alias:
            version = client.get_model_version_by_alias(name, alias)
        else:
            version = client.get_model_version(name, number)
    except MlflowException as exc:
        first = (str(exc).strip() or type(exc).__name__).splitlines()[0][:200]
        raise UserError(f"{option}: {ref}: not in the registry at {uri} ({first})") from None
    dest = work / "registry" / name / str(version.version)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    mlflow.set_tracking_uri(uri)
    local = Path(
        mlflow.artifacts.download_artifacts(f"models:/{name}/{version.version}", dst_path=str(dest))
    )
    configs = sorted(local.rglob("config.json"))
    if not configs:
        raise UserError(f"{option}: {ref} holds no attnpipe model")
    return Resolved(
        ref,
        alias or f"v{version.version}",
        configs[0].parent,
        name=name,
        version=str(version.version),
        model_id=logged_model_id(version),
    )


def logged_model_id(version: Any) -> str | None:
    """The MLflow 3 LoggedModel a model version was registered from: its `model_id`, which
    a SQLite registry leaves empty, else its source `models:/m-...`."""
    if getattr(version, "model_id", None):
        return str(version.model_id)
    source = str(getattr(version, "source", "") or "")
    return source.removeprefix("models:/") if source.startswith("models:/m-") else None


def check_tokenizer(model: Resolved, manifest: dict[str, Any], data: str | Path) -> None:
    """A model scored on data its own tokenizer did not write is scored on other tokens."""
    from pipeline.data.tokenizer import load_tokenizer, tokenizer_hash

    path = model.folder / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"evaluate.models: {model.ref}: the model has no tokenizer.json")
    mine = tokenizer_hash(load_tokenizer(path))
    theirs = manifest["tokenizer_sha256"]
    if mine != theirs:
        raise UserError(
            f"evaluate.data: {data} was tokenized with tokenizer {theirs[:12]}, but "
            f"{model.ref} uses {mine[:12]}; leave evaluate.data out to preprocess the data "
            "node with the model's tokenizer"
        )


# --------------------------------------------------------------------------- the job


def generated_samples(
    folder: Path, data_dir: str | Path, count: int, prompt_tokens: int, new_tokens: int
) -> list[dict[str, str]]:
    """A decoder's greedy continuation of the first `prompt_tokens` tokens of each of the
    first `count` validation samples (within the sample's first document)."""
    from models.generate import complete
    from models.pretrained import load_config, load_for_text
    from pipeline.data.reader import ShardReader
    from pipeline.data.remote import local_copy

    if count == 0 or load_config(folder)["model"]["family"] != "decoder":
        return []
    model, tok, family = load_for_text(folder)
    reader = ShardReader(local_copy(data_dir), "val", seed=0, shuffle=False)
    batch = reader.next_batch(min(count, len(reader)))
    rows = []
    for tokens, docs in zip(batch[:, 0], batch[:, 1], strict=True):
        ids = [int(t) for t, d in zip(tokens, docs, strict=True) if d == docs[0]][:prompt_tokens]
        prompt = tok.decode(ids)
        rows.append(
            {"prompt": prompt, "continuation": complete(model, tok, family, prompt, new_tokens)}
        )
    return rows


def tag_version(client: Any, model: Resolved, fingerprint: str, scores: dict[str, Any]) -> None:
    """The scores on the model version as tags, keyed by the data's fingerprint, so the
    registry shows what each version scored on which data."""
    if model.name is None:
        return
    for split, metrics in scores.items():
        for metric, value in metrics.items():
            if value is not None and metric in ("loss", "perplexity", "bits_per_byte"):
                key = f"attnpipe.eval.{fingerprint[:12]}.{split}.{metric}"
                client.set_model_version_tag(model.name, model.version, key, f"{value:.6g}")


def run_evaluate(job: Job) -> dict[str, Any]:
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.data.remote import local_copy
    from pipeline.data.shards import read_manifest
    from pipeline.probe import table as probe_table
    from pipeline.tracking import log_dataset, use_experiment

    spec, show, uri = job.spec, job.show, job.uri
    e = spec.evaluate
    client = MlflowClient(uri)
    use_experiment(uri, spec.tracking.experiment, spec.storage.work_dir)
    work = Path(spec.storage.work_dir) / "evaluate" / spec.job.name
    rows, samples, probes, prepared = [], [], [], {}
    with mlflow.start_run(run_name=spec.job.name, tags={"attnpipe.stage": "evaluate"}) as parent:
        labels: list[str] = []
        for ref in e.models:
            model = resolve_model(ref, uri, work)
            if model.label in labels:  # two names@champion: the rows and runs stay apart
                model = replace(model, label=f"{model.label}-{len(labels) + 1}")
            labels.append(model.label)
            data = e.data or _preprocessed_for(job, model, work, prepared)
            manifest = read_manifest(local_copy(data))
            check_tokenizer(model, manifest, data)
            show(f"evaluating {ref} on {data}")
            scores = {
                split: evaluate_model(model.folder, data, e.batches, e.batch_size, e.seed, split)
                for split in e.splits
            }
            tags = {"attnpipe.stage": "evaluate", "attnpipe.model": ref}
            if model.version:
                tags["attnpipe.model_version"] = model.version
            with mlflow.start_run(
                run_name=f"{spec.job.name}-{model.label}", nested=True, tags=tags
            ):
                dataset = log_dataset(data, manifest["fingerprint"], spec.job.name, "evaluation")
                metrics = {
                    f"{split}/{metric}": float(value)
                    for split, s in scores.items()
                    for metric, value in s.items()
                    if value is not None
                }
                mlflow.log_metrics(metrics, step=0, model_id=model.model_id, dataset=dataset)
                table = generated_samples(
                    model.folder, data, e.samples, e.prompt_tokens, e.sample_tokens
                )
                if table:
                    mlflow.log_table(_columns(table), artifact_file="samples.json")
                samples += [{"model": model.label, **row} for row in table]
                if e.probe is not None and e.probe.enabled:
                    found = probe_model(model.folder, model.label, e.probe, show)
                    for row in found:  # the model's attention, then its window alone
                        alone = row["variant"] != row["of_variant"]
                        name = "probe/window-only" if alone else "probe"
                        for distance, accuracy in row["accuracy"].items():
                            mlflow.log_metric(f"{name}/accuracy_d{distance}", accuracy, step=0)
                    probes += found
            tag_version(client, model, manifest["fingerprint"], scores)
            for split, s in scores.items():
                rows.append({"model": model.label, "ref": ref, "version": model.version,
                             "split": split, **s})  # fmt: skip
        mlflow.log_table(_columns(rows), artifact_file="evaluation.json")
        if samples:
            mlflow.log_table(_columns(samples), artifact_file="samples.json")
        if probes:
            mlflow.log_table(probe_table(probes), artifact_file="probe.json")
    for row in rows:
        bpb = row["bits_per_byte"]
        show(
            f"{row['model']:>12} {row['split']:>5}: loss {row['loss']:.4f}, perplexity "
            f"{row['perplexity']:.2f}, bits per byte {'-' if bpb is None else f'{bpb:.4f}'}"
        )
    for row in probes:
        accuracy = ", ".join(f"d={d} {a:.2f}" for d, a in row["accuracy"].items())
        show(f"probe {row['variant']}: {accuracy} (chance {row['chance']:.2f})")
    return {
        "mlflow_run_id": parent.info.run_id,
        "results": rows,
        "samples": samples,
        "probe": probes,
    }


def probe_model(folder: str | Path, label: str, probe: Any, show: Any) -> list[dict[str, Any]]:
    """The long-range probe on the attention of the model in `folder` (its pattern,
    parameters and backend; a fresh probe-size model learns the task with it), and on its
    window alone for a sparse pattern: one row each (pipeline.probe.run_probe)."""
    from types import SimpleNamespace

    from models.config import AttentionConfig
    from models.pretrained import load_config
    from pipeline.probe import run_probe

    attention = AttentionConfig(**load_config(folder)["attention"])
    variants = {label: SimpleNamespace(attention=attention)}
    return run_probe(variants, probe.model_copy(update={"variants": None}), show)


def _columns(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    return {key: [row.get(key) for row in rows] for key in rows[0]}


def _preprocessed_for(
    job: Job, model: Resolved, work: Path, prepared: dict[str, str | Path]
) -> str | Path:
    """The spec's data node preprocessed with the model's own tokenizer (a cache hit when
    it was before; once per tokenizer in a job, `prepared`): the tokenizer is copied under a
    name from its hash, so the data's fingerprint does not depend on where the model was
    downloaded."""
    from models.pretrained import load_config
    from pipeline.data.remote import join
    from pipeline.data.tokenizer import load_tokenizer, tokenizer_hash
    from pipeline.kinds.preprocess import data_dir, run_preprocess

    spec = job.spec

    digest = tokenizer_hash(load_tokenizer(model.folder / "tokenizer.json"))[:16]
    if digest in prepared:
        return prepared[digest]
    stable = work.parent / "tokenizers" / f"{digest}.json"
    if not stable.is_file():
        stable.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(model.folder / "tokenizer.json", stable)
    tokenizer = spec.data.tokenizer.model_copy(update={"path": str(stable.resolve())})
    data = spec.data.model_copy(update={"tokenizer": tokenizer})
    base = data_dir(spec)
    out = (
        join(base, f"tokenizer-{digest}") if isinstance(base, str) else base / f"tokenizer-{digest}"
    )
    family = load_config(model.folder)["model"]["family"]
    paired = family == "encoder_decoder"
    run_preprocess(spec, job.show, job.uri, nested=True, data=data, out=out, paired=paired)
    prepared[digest] = out
    return out


def check_evaluate(spec: Any) -> None:
    from models.config import FieldError

    if not spec.evaluate.models:
        raise FieldError("evaluate.models", "an evaluate job needs at least one model")


KIND = Kind("evaluate", run_evaluate, trains=False, check=check_evaluate)
