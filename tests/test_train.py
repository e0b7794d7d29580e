"""Training: Ray Train + DeepSpeed on 2 CPU workers (gloo), checkpoints, exact resume and
fault tolerance, against a real embedded Ray and an MLflow store."""

from __future__ import annotations

import json
import math
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from corpus import write_corpus

from pipeline.config import load_spec
from pipeline.errors import UserError
from pipeline.train.checkpoint import is_complete, latest_complete, resolve_resume
from pipeline.train.deepspeed_config import LRSchedule, deepspeed_config
from pipeline.train.objectives import IGNORE, Objective

ROOT = Path(__file__).resolve().parent.parent
ATTNPIPE = str(Path(sys.executable).parent / "attnpipe")


def tiny_spec(work: Path, *overrides: str, job: str = "decoder-tiny"):
    return load_spec(
        ROOT / "jobs" / f"{job}.yaml",
        [
            f"storage.work_dir={work}",
            "data.seq_len=32",
            "data.tokenizer.vocab_size=300",
            "training.steps=12",
            "training.global_batch_size=8",
            "training.micro_batch_size=2",
            "training.checkpoint_interval=4",
            "training.eval_interval=6",
            "training.eval_batches=2",
            "training.log_interval=2",
            "training.lr_schedule.warmup_steps=2",
            "training.keep_checkpoints=5",
            "deepspeed.zero_stage=2",
            "tracking.system_metrics=false",
            "tracking.heatmap_tokens=0",
            *overrides,
        ],
    )


# --------------------------------------------------------------------------- units


def test_deepspeed_config_follows_the_spec(tmp_path):
    spec = tiny_spec(tmp_path, "deepspeed.zero_stage=3", "training.precision=bf16")
    cfg = deepspeed_config(spec)
    assert cfg["train_batch_size"] == 8 and cfg["gradient_accumulation_steps"] == 2
    assert cfg["train_micro_batch_size_per_gpu"] == 2
    assert cfg["zero_optimization"]["stage"] == 3 and cfg["bf16"]["enabled"]
    assert cfg["optimizer"]["params"]["torch_adam"] is True
    off = deepspeed_config(tiny_spec(tmp_path, "deepspeed.offload_optimizer=true"))
    assert off["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "torch_adam" not in off["optimizer"]["params"]
    assert deepspeed_config(spec, world_size=4)["gradient_accumulation_steps"] == 1


@pytest.mark.parametrize("name", ["cosine", "linear", "constant"])
def test_lr_schedule_warms_up_then_decays_to_the_floor(name):
    from pipeline.config import ScheduleLRNode

    sched = LRSchedule(ScheduleLRNode(name=name, warmup_steps=10, min_lr_ratio=0.1), 110)
    warm = [sched(s) for s in range(10)]
    assert warm == sorted(warm) and warm[0] > 0 and sched(10) == pytest.approx(1.0)
    end = {"cosine": 0.1, "linear": 0.1, "constant": 1.0}[name]
    assert sched(110) == pytest.approx(end)
    if name == "cosine":
        assert sched(60) == pytest.approx(0.55)  # halfway: the mean of 1 and the floor


def batch_of(tokens: list[list[int]], docs: list[list[int]]) -> np.ndarray:
    return np.stack([np.array(tokens, dtype=np.uint32), np.array(docs, dtype=np.uint32)], axis=1)


def summed_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """What a model's forward returns given labels: the summed cross-entropy."""
    return torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
    )


def test_causal_lm_objective_shifts_and_ignores_padding():
    from pipeline.data.shards import PAD_DOC

    seen = {}

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, ids, key_padding_mask=None, document_ids=None, labels=None):
            seen.update(ids=ids, kpm=key_padding_mask, docs=document_ids, labels=labels)
            return summed_loss(torch.zeros(*ids.shape, 10) + self.w, labels)

    pad = int(PAD_DOC)
    batch = batch_of([[5, 6, 0, 7, 1, 1]], [[0, 0, 0, 1, pad, pad]])
    obj = Objective("decoder", {"eod": 0, "pad": 1, "bos": 2, "mask": 3}, vocab_size=10)
    loss, count = obj.loss(Probe(), batch)
    assert seen["ids"].tolist() == [[5, 6, 0, 7, 1]]
    assert seen["docs"].tolist() == [[0, 0, 0, 1, pad]]
    assert seen["labels"].tolist() == [[6, 0, 7, -100, -100]]
    assert count == 3  # targets 6, 0, 7; the two padding targets are ignored
    assert float(loss.detach()) == pytest.approx(3 * math.log(10))


def test_masked_lm_objective_corrupts_like_bert():
    obj = Objective(
        "encoder", {"eod": 0, "pad": 1, "bos": 2, "mask": 3}, mlm_probability=0.15, vocab_size=300
    )
    tokens = torch.randint(10, 300, (64, 256))
    real = torch.ones_like(tokens, dtype=torch.bool)
    real[:, 200:] = False
    inputs, labels = obj._mask(tokens, real, torch.Generator().manual_seed(0))
    picked = labels != IGNORE
    assert not picked[:, 200:].any()
    rate = float(picked[:, :200].float().mean())
    assert 0.13 < rate < 0.17
    as_mask = float((inputs[picked] == 3).float().mean())
    kept = float((inputs[picked] == tokens[picked]).float().mean())
    assert 0.76 < as_mask < 0.84 and 0.07 < kept < 0.14
    assert torch.equal(inputs[~picked], tokens[~picked])


def test_seq2seq_objective_feeds_source_and_shifted_target():
    from pipeline.data.shards import PAD_DOC

    seen = {}

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, src, tgt, src_padding_mask=None, tgt_padding_mask=None, labels=None):
            seen.update(src=src, tgt=tgt, smask=src_padding_mask, labels=labels)
            return summed_loss(torch.zeros(*tgt.shape, 10) + self.w, labels)

    pad = int(PAD_DOC)
    # source (3): 5, EOD, PAD; target region (4): BOS, 8, EOD, PAD
    batch = batch_of([[5, 0, 1, 2, 8, 0, 1]], [[4, 4, pad, 4, 4, 4, pad]])
    obj = Objective("encoder_decoder", {"eod": 0, "pad": 1, "bos": 2}, max_source_len=3)
    _, count = obj.loss(Probe(), batch)
    assert seen["src"].tolist() == [[5, 0, 1]] and seen["smask"].tolist() == [[True, True, False]]
    assert seen["tgt"].tolist() == [[2, 8, 0]]
    assert seen["labels"].tolist() == [[8, 0, -100]]
    assert count == 2  # predicts 8 and EOD


@pytest.mark.parametrize("family", ["decoder", "encoder_decoder"])
def test_activation_checkpointing_gives_the_same_gradients(family):
    from models.config import ModelConfig
    from models.transformer import build_model, set_activation_checkpointing

    cfg = ModelConfig(family=family, vocab_size=64, d_model=32, n_layers=2, n_heads=4)
    ids = torch.randint(0, 64, (2, 12))
    grads = []
    for enabled in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg)
        set_activation_checkpointing(model, enabled)
        out = model(ids) if family == "decoder" else model(ids, ids)
        out.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


def test_mfu_against_a_measured_peak_never_exceeds_one(monkeypatch):
    from pipeline.train import flops

    cpu = torch.device("cpu")
    real = flops.DevicePeak(cpu, "fp32")
    assert real.measured and 1e8 < real.flops < 1e14
    # a reading taken while the machine was busy: the peak rises to what steps reach
    monkeypatch.setattr(flops, "measured_gemm_flops", lambda *a, **k: 1e9)
    low = flops.DevicePeak(cpu, "fp32")
    assert low.utilisation(5e8) == 0.5
    assert low.utilisation(3e9) == 1.0 and low.flops == 3e9
    assert low.utilisation(1.5e9) == 0.5
    given = flops.DevicePeak(cpu, "fp32", override=1e9)  # training.peak_flops is the user's
    assert not given.measured and given.utilisation(2e9) == 2.0


def test_an_incomplete_checkpoint_is_never_the_resume_target(tmp_path):
    def make(step: int, ranks_done: int) -> Path:
        folder = tmp_path / "run" / f"checkpoint-{step:08d}"
        folder.mkdir(parents=True)
        (folder / "meta.json").write_text(json.dumps({"step": step, "world_size": 2}))
        for r in range(ranks_done):
            (folder / f"rank-{r:05d}.done").write_text("ok\n")
        return folder

    good = make(4, 2)
    cut = make(8, 1)  # a save that crashed after rank 0's part
    assert is_complete(good) and not is_complete(cut)
    assert latest_complete(tmp_path / "run") == good
    assert resolve_resume(str(tmp_path / "run")) == good.resolve()
    with pytest.raises(UserError, match="incomplete checkpoint"):
        resolve_resume(str(cut))
    with pytest.raises(UserError, match="no such checkpoint"):
        resolve_resume(str(tmp_path / "missing"))


# --------------------------------------------------------------------------- Ray runs


@pytest.fixture(scope="module")
def ray_cluster():
    from pipeline.runtime import start_local_ray, stop_local_ray

    start_local_ray(2)
    yield
    stop_local_ray()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def data_overrides(glob: str) -> list[str]:
    return ["data.sources.0.kind=files", f"data.sources.0.path={glob}", "data.min_chars=5"]


@pytest.fixture(scope="module")
def data(ray_cluster, corpus, tmp_path_factory):
    """Decoder shards of the test corpus, preprocessed once for the module."""
    from pipeline.data.preprocess import preprocess

    spec = tiny_spec(tmp_path_factory.mktemp("w"), *data_overrides(corpus))
    out = tmp_path_factory.mktemp("shards")
    preprocess(spec.data, out, vocab_size=300, parallelism=2, progress=lambda m: None)
    return out


def train(work: Path, data_dir: Path, *overrides: str, job: str = "decoder-tiny", **kwargs):
    from pipeline.tracking import tracking_uri
    from pipeline.train.driver import run_train

    spec = tiny_spec(work, *overrides, job=job)
    uri = tracking_uri(spec.tracking.uri, spec.storage.work_dir)
    return run_train(spec, data_dir, uri, progress=lambda m: None, **kwargs)


def weights(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """The full fp32 model weights of a ZeRO-0/1/2 checkpoint."""
    state = torch.load(Path(checkpoint) / "ds" / "mp_rank_00_model_states.pt", weights_only=False)
    return state["module"]


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def reference_run(data, tmp_path_factory):
    """An uninterrupted 12-step ZeRO-2 run: the weights every resumed run must end with."""
    return train(tmp_path_factory.mktemp("ref"), data, "tracking.heatmap_tokens=40")


def history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    points = MlflowClient(uri).get_metric_history(run_id, key)
    return sorted((p.step, p.value) for p in points)


def test_zero2_run_learns_logs_every_metric_and_keeps_complete_checkpoints(reference_run):
    from pipeline.tracking import tracking_uri

    result = reference_run
    uri = tracking_uri(None, Path(result["run_dir"]).parent.parent)
    losses = history(uri, result["mlflow_run_id"], "train/loss")
    assert [s for s, _ in losses] == [2, 4, 6, 8, 10, 12]
    assert losses[-1][1] < losses[0][1] - 0.5  # it learns
    for key in ("train/lr", "train/grad_norm", "train/tokens_per_s", "train/mfu", "val/loss"):
        assert history(uri, result["mlflow_run_id"], key), key
    assert [s for s, _ in history(uri, result["mlflow_run_id"], "val/loss")] == [6, 12]
    run_dir = Path(result["run_dir"])
    kept = sorted(p.name for p in run_dir.glob("checkpoint-*"))
    assert kept == ["checkpoint-00000004", "checkpoint-00000008", "checkpoint-00000012"]
    assert all(is_complete(run_dir / k) for k in kept)
    assert Path(result["checkpoint"]).name == "checkpoint-00000012"
    from mlflow.tracking import MlflowClient

    logged = MlflowClient(uri).list_artifacts(result["mlflow_run_id"], "checkpoints")
    assert [a.path for a in logged] == ["checkpoints/checkpoint-00000012"]  # log_checkpoints: last
    images = [a.path for a in MlflowClient(uri).list_artifacts(result["mlflow_run_id"], "images")]
    for layer, head, step in [(0, 0, 6), (1, 1, 12)]:  # heatmaps at every evaluation
        key = f"attention~decoder-layer{layer}-head{head}+step+{step}+"
        assert any(key in p and p.endswith(".png") for p in images), (key, images[:4])
    tracking = [e for e in result["events"] if e["event"] == "tracking"]
    assert tracking and tracking[-1]["dropped"] == 0 and tracking[-1]["undelivered"] == 0


def test_the_final_model_is_exported_logged_and_registered(reference_run):
    import mlflow

    from models.pretrained import load_pretrained
    from pipeline.tracking import tracking_uri

    model = reference_run["model"]
    exported = load_pretrained(model["export_dir"])
    for key, value in weights(reference_run["checkpoint"]).items():
        assert torch.equal(exported.state_dict()[key], value.float()), key
    mlflow.set_tracking_uri(tracking_uri(None, Path(reference_run["run_dir"]).parent.parent))
    version = mlflow.tracking.MlflowClient().get_model_version(model["name"], model["version"])
    assert version.run_id == reference_run["mlflow_run_id"]
    assert version.tags["attnpipe.step"] == "12"
    served = mlflow.pyfunc.load_model(f"models:/{model['name']}/{model['version']}")
    out = served.predict(["Document 7."], params={"max_new_tokens": 5})
    # the served text is greedy decoding of the exported weights, as models.generate does it
    from tokenizers import Tokenizer

    from models.generate import generate

    tok = Tokenizer.from_file(str(Path(model["export_dir"]) / "tokenizer.json"))
    eod = tok.token_to_id("<|endoftext|>")
    prompt = torch.tensor([tok.encode("Document 7.").ids])
    new = generate(exported.eval(), prompt, 5, eos_id=eod)[0, prompt.shape[1] :].tolist()
    assert 1 <= len(new) <= 5
    assert out == [tok.decode([t for t in new if t != eod])]


def test_the_mlflow_ui_shows_the_run_in_a_real_browser(reference_run, tmp_path):
    """`mlflow server` on the run's store, the run page in headless Chromium: the metric
    charts, an attention heatmap and the registered model with its champion alias."""
    import os

    from browser import check_run_in_ui, chromium
    from mlflow.tracking import MlflowClient
    from mlflow_server import MlflowServer

    from pipeline.tracking import tracking_uri
    from pipeline.tracking.registry import promote

    work = Path(reference_run["run_dir"]).parent.parent
    model = reference_run["model"]
    local = MlflowClient(tracking_uri(None, work))
    promote(local, model["name"], model["version"], "val_loss", 1.0, None)
    run = local.get_run(reference_run["mlflow_run_id"])
    heatmap = sorted(
        a.path for a in local.list_artifacts(run.info.run_id, "images") if a.path.endswith(".png")
    )[-1]
    out = Path(os.environ.get("ATTNPIPE_SCREENSHOTS", tmp_path / "screenshots"))
    server = MlflowServer(
        tmp_path / "server", tracking_uri(None, work), artifacts=work / "mlartifacts"
    )
    server.start()
    try:
        with chromium(tmp_path / "profile") as driver:
            seen = check_run_in_ui(
                driver, server.uri, run.info.experiment_id, run.info.run_id, heatmap,
                model["name"], out,
            )  # fmt: skip
    finally:
        server.stop()
    assert seen.chart_sections["train"] >= 5 and seen.chart_sections["val"] == 2
    assert seen.charts >= 1
    assert seen.heatmap_width > 100  # the PNG decoded in the page, not a broken image
    # the heatmap's image card on the Model metrics tab shows the image (the maps drawn
    # before training give the step the card opens at one), not a wall of params
    assert seen.card.get("natural_width", 0) >= 200, seen.card
    assert seen.card["visible_height"] >= 96 and seen.card["on_top"], seen.card
    assert f"Version {model['version']}" in seen.model_text
    assert "attnpipe.decision" in seen.model_text
    for path in seen.screenshots:
        assert path.stat().st_size > 10_000, path
    print("screenshots:", *seen.screenshots)


def test_explicit_resume_ends_bitwise_equal_to_the_uninterrupted_run(reference_run, data, tmp_path):
    start = Path(reference_run["run_dir"]) / "checkpoint-00000004"
    resumed = train(tmp_path, data, resume_from=str(start))
    assert [e["step"] for e in resumed["events"] if e["event"] == "resume"] == [4]
    assert_bitwise_equal(weights(resumed["checkpoint"]), weights(reference_run["checkpoint"]))


def test_a_sequence_parallel_run_trains_like_the_data_parallel_one(reference_run, data, tmp_path):
    """The same job with both workers sharing each sequence (resources.sequence_parallel 2,
    data-parallel size 1, twice the accumulation): the same samples per step, the same
    losses within float rounding, evaluation and heatmaps, an exported model."""
    from models.pretrained import load_pretrained
    from pipeline.tracking import tracking_uri

    result = train(
        tmp_path,
        data,
        "resources.sequence_parallel=2",
        "tracking.heatmap_tokens=40",
        "training.loss_chunk_tokens=20",
    )
    uri = tracking_uri(None, tmp_path)
    ref_uri = tracking_uri(None, Path(reference_run["run_dir"]).parent.parent)
    for key in ("train/loss", "val/loss"):
        ours = history(uri, result["mlflow_run_id"], key)
        theirs = history(ref_uri, reference_run["mlflow_run_id"], key)
        assert [s for s, _ in ours] == [s for s, _ in theirs], key
        for (_, a), (_, b) in zip(ours, theirs, strict=True):
            assert abs(a - b) < 1e-4 * abs(b), (key, ours, theirs)
    assert (Path(result["run_dir"]) / "heatmaps" / "step-00000012").is_dir()
    meta = json.loads((Path(result["checkpoint"]) / "meta.json").read_text())
    assert meta["sequence_parallel"] == 2 and meta["world_size"] == 2
    exported = load_pretrained(result["model"]["export_dir"]).state_dict()
    reference = weights(reference_run["checkpoint"])
    assert exported.keys() == reference.keys()
    assert max(float((exported[k] - reference[k].float()).abs().max()) for k in reference) < 1e-3


def test_a_killed_worker_is_replaced_and_the_run_ends_with_the_same_weights(
    reference_run, data, tmp_path
):
    faults = {"kill": {"rank": 1, "step": 6}, "marker_dir": str(tmp_path / "faults")}
    result = train(tmp_path, data, "training.max_failures=1", faults=faults)
    assert (tmp_path / "faults" / "kill-6").exists()  # the worker was SIGKILLed at step 6
    assert [e["step"] for e in result["events"] if e["event"] == "resume"] == [4]
    assert result["metrics"]["step"] == 12
    assert_bitwise_equal(weights(result["checkpoint"]), weights(reference_run["checkpoint"]))


def test_a_crash_inside_a_checkpoint_save_resumes_from_the_previous_complete_one(
    reference_run, data, tmp_path
):
    faults = {"checkpoint": {"rank": 1, "step": 8}, "marker_dir": str(tmp_path / "faults")}
    result = train(tmp_path, data, "training.max_failures=1", faults=faults)
    assert (tmp_path / "faults" / "checkpoint-8").exists()
    assert [e["step"] for e in result["events"] if e["event"] == "resume"] == [4]
    assert_bitwise_equal(weights(result["checkpoint"]), weights(reference_run["checkpoint"]))


@pytest.mark.parametrize(  # dense attention under ZeRO 2: the reference run
    "zero, pattern, params",
    [(3, "sliding_window", "{window: 8}"), (2, "bigbird", "{block: 4, window: 3, random: 1}")],
)
def test_zero2_and_zero3_decoders_learn_dense_and_sparse(data, tmp_path, zero, pattern, params):
    backend = "sdpa" if pattern == "dense" else "blocksparse"
    result = train(
        tmp_path,
        data,
        f"deepspeed.zero_stage={zero}",
        f"attention.pattern={pattern}",
        f"attention.params={params}",
        f"attention.backend={backend}",
        "attention.block_size=16",
    )
    from pipeline.tracking import tracking_uri

    losses = history(tracking_uri(None, tmp_path), result["mlflow_run_id"], "train/loss")
    assert losses[-1][1] < losses[0][1] - 0.5
    assert result["metrics"]["val/loss"] < math.log(300)


def test_a_tracking_server_outage_mid_run_loses_no_metric_point(data, tmp_path):
    """A real `mlflow server` is stopped once the run has logged, and started again on the
    same port and store some seconds later: training never waits for it, and every
    point logged during the outage arrives afterwards."""
    import threading
    import time

    from mlflow.tracking import MlflowClient
    from mlflow_server import MlflowServer, wait_for

    (tmp_path / "mlflow").mkdir()
    server = MlflowServer(tmp_path / "mlflow")
    server.start()
    seen: dict[str, int] = {}

    def outage() -> None:
        client = MlflowClient(server.uri)

        def logged() -> bool:
            runs = client.search_runs(
                [e.experiment_id for e in client.search_experiments()], max_results=1
            )
            if not runs:
                return False
            points = client.get_metric_history(runs[0].info.run_id, "train/loss")
            seen["before"] = max((p.step for p in points), default=0)
            return seen["before"] > 0

        wait_for(logged, "the first logged step", timeout=300)
        server.stop()
        time.sleep(5)
        server.start()
        seen["restarted"] = 1

    thread = threading.Thread(target=outage, daemon=True)
    thread.start()
    try:
        result = train(
            tmp_path,
            data,
            f"tracking.uri={server.uri}",
            "training.steps=150",
            "training.log_interval=1",
            "training.eval_interval=50",
            "training.checkpoint_interval=150",
            "training.lr_schedule.warmup_steps=10",
            "tracking.log_checkpoints=none",
        )
        thread.join(timeout=120)
        assert seen.get("restarted") and seen["before"] < 150  # the outage was mid-run
        steps = [s for s, _ in history(server.uri, result["mlflow_run_id"], "train/loss")]
        assert steps == list(range(1, 151))  # every point, once
        val = history(server.uri, result["mlflow_run_id"], "val/loss")
        assert [s for s, _ in val] == [50, 100, 150]
        tracking = [e for e in result["events"] if e["event"] == "tracking"][-1]
        assert tracking["dropped"] == 0 and tracking["undelivered"] == 0
    finally:
        thread.join(timeout=120)
        server.stop()


def write_pairs(path: Path, n: int = 400) -> str:
    """(source, target) pairs with a learnable rule: the target is the source reversed."""
    rng = random.Random(1)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
    with path.open("w") as f:
        for _ in range(n):
            src = [rng.choice(words) for _ in range(rng.randrange(3, 9))]
            f.write(json.dumps({"text": " ".join(src), "target": " ".join(src[::-1])}) + "\n")
    return str(path)


@pytest.mark.parametrize("job", ["encoder-tiny", "encdec-tiny"])
def test_every_model_family_trains_with_its_objective(ray_cluster, corpus, job, tmp_path):
    from pipeline.data.preprocess import preprocess
    from pipeline.tracking import tracking_uri

    if job == "encdec-tiny":
        source = [
            "data.sources.0.kind=files",
            f"data.sources.0.path={write_pairs(tmp_path / 'pairs.jsonl')}",
            "data.sources.0.format=jsonl",
            "data.sources.0.target_column=target",
            "data.max_source_len=16",
            "data.max_target_len=16",
        ]
    else:
        source = data_overrides(corpus)
    overrides = [*source, "deepspeed.zero_stage=1", "training.steps=16"]
    spec = tiny_spec(tmp_path, *overrides, job=job)
    shards = tmp_path / "shards"
    paired = job == "encdec-tiny"
    preprocess(spec.data, shards, vocab_size=300, paired=paired, progress=lambda m: None)
    result = train(tmp_path, shards, *overrides, job=job)
    losses = history(tracking_uri(None, tmp_path), result["mlflow_run_id"], "train/loss")
    assert len(losses) == 8 and losses[-1][1] < losses[0][1] - 0.3
    assert result["metrics"]["val/perplexity"] < 300  # better than uniform over the vocabulary


def test_attnpipe_run_pipeline_job_then_export_by_run_id(corpus, tmp_path):
    """The CLI end to end: a pipeline job (a parent MLflow run with a preprocessing and a
    training run nested in it), then `attnpipe export` of that training run by its id."""
    import mlflow

    from models.pretrained import load_pretrained
    from pipeline.tracking import tracking_uri

    cmd = [ATTNPIPE, "run", "jobs/decoder-tiny.yaml", "job.kind=pipeline"]
    spec = [f"storage.work_dir={tmp_path}", "data.seq_len=32", "data.tokenizer.vocab_size=300"]
    steps = ["training.steps=4", "training.lr_schedule.warmup_steps=1"]
    steps += ["training.checkpoint_interval=2", "training.eval_interval=2"]
    run = subprocess.run(
        [*cmd, *spec, *steps, *data_overrides(corpus), "tracking.system_metrics=false"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout)
    assert summary["metrics"]["step"] == 4 and summary["resumed_at"] == []
    # progress from rank 0 reaches the terminal once per step that logs: the evaluation at
    # step 2 (eval_interval 2) and the last step
    steps = re.findall(r"^.*?RayTrainWorker pid=\d+\).*?(step \d+/\d+) ", run.stderr, re.M)
    assert steps == ["step 2/4", "step 4/4"], steps
    from pipeline.train.ops import CPU_WORKER_ENV

    events = Path(summary["run_dir"]) / "events.jsonl"
    placed = [
        e for e in map(json.loads, events.read_text().splitlines()) if e["event"] == "placement"
    ]
    assert [e["malloc"] for e in placed] == [CPU_WORKER_ENV] * 2  # CPU workers' allocator
    uri = tracking_uri(None, tmp_path)
    mlflow.set_tracking_uri(uri)
    train_run = mlflow.get_run(summary["mlflow_run_id"])
    parent_id = train_run.data.tags["mlflow.parentRunId"]
    children = mlflow.search_runs(
        experiment_ids=[train_run.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
    )
    assert sorted(children["tags.attnpipe.stage"]) == ["preprocess", "train"]
    assert train_run.data.params["training.steps"] == "4"
    assert train_run.data.tags["attnpipe.attention_pattern"] == "dense"
    assert (tmp_path / "mlartifacts").is_dir() and not (ROOT / "mlruns").exists()

    out = tmp_path / "exported"
    export = subprocess.run(
        [ATTNPIPE, "export", summary["mlflow_run_id"], "--out", str(out), "--tracking-uri", uri],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert export.returncode == 0, export.stderr[-2000:]
    assert json.loads(export.stdout)["step"] == 4
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    ours = load_pretrained(out)
    assert ours.cfg.family == "decoder"

    # the same run as a transformers folder: GPT-NeoX's architecture (GPT-2's with RoPE),
    # attnpipe's logits
    import transformers

    hf_out = tmp_path / "exported-hf"
    export = subprocess.run(
        [ATTNPIPE, "export", summary["mlflow_run_id"], "--out", str(hf_out), "--format", "hf",
         "--tracking-uri", uri],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert export.returncode == 0, export.stderr[-2000:]
    assert json.loads(export.stdout)["architecture"] == "GPTNeoXForCausalLM"
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(hf_out)
    ids = torch.tensor([tok("To be, or not to be")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(theirs(ids).logits, ours(ids), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "override, message",
    [
        ("training.global_batch_size=10", "training.global_batch_size: 10 is not a multiple"),
        ("deepspeed.zero_stage=4", "deepspeed.zero_stage"),
        ("training.optimizer.lr=0", "training.optimizer.lr"),
        ("resources.gpus_per_worker=1", "resources.gpus_per_worker: 2 workers x 1 GPU"),
    ],
)
def test_bad_training_input_is_one_line_before_any_worker(tmp_path, override, message):
    result = subprocess.run(
        [ATTNPIPE, "run", "jobs/decoder-tiny.yaml", f"storage.work_dir={tmp_path}", override],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("attnpipe: error:")]
    assert len(lines) == 1 and message in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists()  # nothing preprocessed, nothing half-written


def test_a_missing_resume_target_is_one_line(tmp_path):
    result = subprocess.run(
        [
            ATTNPIPE,
            "run",
            "jobs/decoder-tiny.yaml",
            f"storage.work_dir={tmp_path}",
            "--resume-from",
            str(tmp_path / "nope"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--resume-from" in result.stderr and "no such checkpoint" in result.stderr
