"""The job spec: precedence, one node per component, and one clear line for bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from models.config import AttentionConfig, ModelConfig
from pipeline.config import JobSpec, SpecError, load_spec, resolved_yaml, validate_spec
from pipeline.kinds import load_job

JOBS = sorted(Path(__file__).resolve().parent.parent.joinpath("jobs").glob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str, *overrides: str) -> str:
    with pytest.raises(SpecError) as info:
        load_job(write(tmp_path, text), overrides)  # the schema's checks and the kind's
    message = str(info.value)
    assert "\n" not in message, "an error is one line"
    return message


@pytest.mark.parametrize("path", JOBS, ids=[p.name for p in JOBS])
def test_every_shipped_spec_validates(path):
    spec = load_job(path)
    assert spec.job.name and spec.job.kind in (
        "train",
        "pipeline",
        "preprocess",
        "retrain",
        "evaluate",
        "compare",
    )
    # the resolved spec is itself a valid spec (it is what a worker receives)
    assert validate_spec(yaml.safe_load(resolved_yaml(spec))) == spec


def test_shipped_specs_cover_every_model_family():
    families = {load_spec(p).model.family for p in JOBS}
    assert families == {"decoder", "encoder", "encoder_decoder"}


def test_precedence_defaults_preset_file_overrides(tmp_path):
    path = write(tmp_path, "model:\n  preset: tiny\n  d_model: 128\n  n_layers: 3\n")
    spec = load_spec(path, ["model.n_layers=5"])
    assert spec.model.dropout == ModelConfig().dropout  # default
    assert spec.model.vocab_size == 512  # preset
    assert spec.model.d_model == 128  # file beats preset
    assert spec.model.n_layers == 5  # override beats file
    assert spec.model.preset == "tiny"


def test_overrides_parse_yaml_values_and_index_lists(tmp_path):
    path = write(tmp_path, "data:\n  sources:\n    - kind: demo\n    - kind: demo\n")
    spec = load_spec(
        path,
        [
            "training.optimizer.lr=3e-4",
            "training.optimizer.betas=[0.9, 0.99]",
            "data.sources.1.weight=2.5",
            "deepspeed.zero_stage=2",
            "tracking.system_metrics=false",
        ],
    )
    assert spec.training.optimizer.lr == pytest.approx(3e-4)
    assert spec.training.optimizer.betas == (0.9, 0.99)
    assert spec.data.sources[1].weight == 2.5
    assert spec.deepspeed.zero_stage == 2 and spec.tracking.system_metrics is False


def test_defaults_alone_are_a_valid_spec():
    spec = load_spec(None)
    assert isinstance(spec, JobSpec) and spec.job.kind == "train"
    assert spec.grad_accum_steps == 32 // (8 * 2)


def test_every_component_gets_only_its_own_node():
    spec = load_spec(None)
    assert isinstance(spec.model.architecture(), ModelConfig)
    assert type(spec.model.architecture()) is ModelConfig  # no `preset`, nothing else
    assert isinstance(spec.attention, AttentionConfig)
    assert set(JobSpec.model_fields) == {
        "job",
        "data",
        "model",
        "attention",
        "training",
        "deepspeed",
        "resources",
        "tracking",
        "storage",
        "schedule",
        "retrain",
        "compare",
        "evaluate",
    }


# ------------------------------------------------------------------ bad input, one line each

BAD = [
    # (spec text, overrides, expected fragments of the one line)
    (
        "training:\n  lrr: 0.1\n",
        (),
        ["spec.yaml:2", "training.lrr", "unknown key", "did you mean 'training.optimizer.lr'"],
    ),
    (
        "model:\n  d_modle: 64\n",
        (),
        ["spec.yaml:2", "model.d_modle", "did you mean 'model.d_model'"],
    ),
    ("modle:\n  d_model: 64\n", (), ["spec.yaml:1", "modle", "did you mean 'model'"]),
    (
        "training:\n  steps: many\n",
        (),
        ["spec.yaml:2", "training.steps", "valid integer", "'many'"],
    ),
    (
        "training:\n  optimizer:\n    lr: -0.1\n",
        (),
        ["spec.yaml:3", "training.optimizer.lr", "greater than 0"],
    ),
    (
        "deepspeed:\n  zero_stage: 4\n",
        (),
        ["spec.yaml:2", "deepspeed.zero_stage", "less than or equal to 3"],
    ),
    (
        "model:\n  preset: tiny\n  n_heads: 3\n",
        (),
        ["spec.yaml:3", "model.n_heads", "n_heads=3 does not divide d_model=64"],
    ),
    ("model:\n  n_heads: 12\n  n_kv_heads: 5\n", (), ["model.n_kv_heads", "does not divide"]),
    (
        "training:\n  global_batch_size: 30\n",
        (),
        ["training.global_batch_size", "not a multiple of training.micro_batch_size"],
    ),
    ("model:\n  positional: relative\n", (), ["model.positional", "'sinusoidal'"]),
    (
        "attention:\n  pattern: longformerr\n",
        (),
        ["attention.pattern", "known patterns: bigbird, deepspeed, dense"],
    ),
    ("attention:\n  backend: flash\n", (), ["attention.backend", "known backends"]),
    ("attention:\n  params: {window: 3}\n", (), ["attention.params", "window"]),
    ("schedule:\n  cron: '* * *'\n", (), ["schedule.cron", "invalid cron expression"]),
    ("deepspeed:\n  offload_params: true\n", (), ["deepspeed.offload_params", "zero_stage 3"]),
    ("data:\n  sources:\n    - kind: files\n", (), ["data.sources[0].path", "needs a path"]),
    (
        "data:\n  sources:\n    - {kind: files, path: a.txt, documents: plays}\n",
        (),
        ["data.sources[0].documents", "only the demo corpus has scenes and plays"],
    ),
    (
        "job:\n  kind: compare\ncompare:\n  variants: {a: {}, b: {}}\n  probe: {variants: [c]}\n",
        (),
        ["compare.probe.variants", "'c' is not a variant (have ['a', 'b'])"],
    ),
    (
        "job:\n  kind: compare\ncompare:\n  variants: {a: {data: {seq_len: 8}}, b: {}}\n",
        (),
        ["spec.yaml:4: compare.variants.a", "variants share the job's data and job nodes"],
    ),
    ("data:\n  seq_len: 4096\n", (), ["data.seq_len", "exceeds model.max_seq_len=1024"]),
    ("job:\n  kind: deploy\n", (), ["job.kind", "'preprocess'"]),
    (
        "attention:\n  pattern: longformer\n  params: {window: 8, global_tokens: [300]}\n",
        (),
        ["attention.params", "global_tokens 300 is out of range for a sequence of 256"],
    ),
    (
        "attention:\n  pattern: sliding_window\n  params: {window: 0}\n",
        (),
        ["attention.params", "window must be a positive integer, got 0"],
    ),
    (
        "attention:\n  pattern: bigbird\n",
        (),
        ["attention.backend", "'bigbird' is not supported by backend 'sdpa'"],
    ),
    (
        "model:\n  positional: alibi\nattention:\n  backend: blocksparse\n",
        (),
        ["model.positional", "alibi' is not supported by backend 'blocksparse'"],
    ),
    (
        "model:\n  family: encoder\nattention:\n  adaptive_span: {max_span: 64}\n",
        (),
        ["attention.adaptive_span", "adaptive_span is for a decoder"],
    ),
    ("{}\n", ["training.lr=1"], ["override 'training.lr=1'", "training.lr", "unknown key"]),
    ("{}\n", ["model.n_heads=7"], ["override 'model.n_heads=7'", "does not divide"]),
    ("{}\n", ["nonsense"], ["override 'nonsense'", "expected key.path=value"]),
    ("{}\n", ["model.preset=tinny"], ["model.preset", "did you mean 'tiny'"]),
    (
        "{}\n",
        ["resources.num_workers=3", "resources.sequence_parallel=2", "training.micro_batch_size=1"],
        ["resources.sequence_parallel", "2 does not divide resources.num_workers (3)"],
    ),
    (
        "model:\n  preset: tiny\n",
        ["resources.num_workers=8", "resources.sequence_parallel=8"],
        ["resources.sequence_parallel", "8 does not divide model.n_heads (4)"],
    ),
    (
        "data:\n  seq_len: 100\nmodel:\n  preset: tiny\n",
        ["resources.num_workers=8", "resources.sequence_parallel=8", "model.n_heads=8"],
        ["resources.sequence_parallel", "8 does not divide data.seq_len (100)"],
    ),
    (
        "model:\n  preset: tiny\n  n_heads: 8\n  n_kv_heads: 2\n",
        ["resources.num_workers=6", "resources.sequence_parallel=3", "data.seq_len=96",
         "training.micro_batch_size=4", "training.global_batch_size=8", "model.n_heads=6",
         "model.d_model=72"],
        ["resources.sequence_parallel", "3 and model.n_kv_heads (2) must divide one another"],
    ),
    (
        "model:\n  family: encoder_decoder\n  preset: tiny\n",
        ["resources.sequence_parallel=2"],
        ["resources.sequence_parallel", "the encoder-decoder trains with sequence_parallel 1"],
    ),
    (
        "{}\n",
        ["resources.num_workers=4", "resources.sequence_parallel=2", "training.micro_batch_size=4",
         "training.global_batch_size=12"],
        ["training.global_batch_size", "data-parallel workers (4 / sequence_parallel 2 = 2)"],
    ),
]  # fmt: skip


@pytest.mark.parametrize("text,overrides,fragments", BAD, ids=[b[2][1] for b in BAD])
def test_bad_input_gives_one_line_naming_the_yaml_path(tmp_path, text, overrides, fragments):
    message = error_of(tmp_path, text, *overrides)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_missing_file(tmp_path):
    with pytest.raises(SpecError, match=r"nope\.yaml: no such file"):
        load_spec(tmp_path / "nope.yaml")


def test_malformed_yaml_names_line_and_column(tmp_path):
    message = error_of(tmp_path, "job:\n  name: ok\n  kind: [train\n")
    assert "spec.yaml:4:1: malformed YAML" in message


def test_a_spec_must_be_a_mapping(tmp_path):
    assert "a job spec is a mapping" in error_of(tmp_path, "- train\n- eval\n")


def test_empty_file_is_the_defaults(tmp_path):
    assert load_spec(write(tmp_path, "")) == load_spec(None)


def test_tokenizer_vocabulary_defaults_to_the_models_and_may_not_exceed_it(tmp_path):
    assert load_spec(None).data.tokenizer.vocab_size is None
    message = error_of(
        tmp_path, "model:\n  preset: tiny\ndata:\n  tokenizer:\n    vocab_size: 1024\n"
    )
    assert "data.tokenizer.vocab_size: 1024 exceeds model.vocab_size=512" in message
