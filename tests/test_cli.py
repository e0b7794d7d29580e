"""The attnpipe command as a user runs it: a real process, its exit code and its output."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from models import PRESETS, count_params, preset_config

ROOT = Path(__file__).resolve().parent.parent
ATTNPIPE = Path(sys.executable).parent / "attnpipe"  # the installed console script


def attnpipe(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ATTNPIPE), *args], capture_output=True, text=True, cwd=ROOT, timeout=120
    )


def test_help_lists_the_commands():
    result = attnpipe("--help")
    assert result.returncode == 0
    assert "validate" in result.stdout and "models" in result.stdout


def test_validate_prints_the_resolved_spec():
    result = attnpipe("validate", "jobs/decoder-tiny.yaml", "training.steps=70", "model.n_layers=3")
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert resolved["training"]["steps"] == 70
    assert resolved["model"]["n_layers"] == 3
    assert resolved["model"]["vocab_size"] == 512  # from the preset
    assert resolved["model"]["positional"] == "rope"  # from the file
    assert resolved["deepspeed"]["zero_stage"] == 0  # a default


def test_validate_json_output():
    result = attnpipe("validate", "jobs/encoder-tiny.yaml", "--format", "json")
    assert result.returncode == 0, result.stderr
    assert '"family": "encoder"' in result.stdout


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["jobs/missing.yaml"], "jobs/missing.yaml: no such file"),
        (["jobs/decoder-tiny.yaml", "training.lrr=1"], "did you mean 'training.optimizer.lr'"),
        (["jobs/decoder-tiny.yaml", "model.n_heads=5"], "n_heads=5 does not divide d_model=64"),
        (["jobs/decoder-tiny.yaml", "deepspeed.zero_stage=9"], "deepspeed.zero_stage"),
        (
            ["jobs/decoder-tiny.yaml", "resources.sequence_parallel=3"],
            "resources.sequence_parallel: 3 does not divide resources.num_workers (2)",
        ),
        (["tests/data/malformed.yaml"], "malformed YAML"),
        (["jobs/decoder-tiny.yaml", "--format", "xml"], "--format: expected yaml or json"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_no_traceback(args, fragment):
    result = attnpipe("validate", *args)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("attnpipe: error: ")
    assert fragment in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["/nonexistent", "hi"], "MODEL /nonexistent: no such checkpoint, folder or MLflow run"),
        (["models:/x", "hi"], "MODEL: 'models:/x' is not models:/NAME@ALIAS or models:/NAME/"),
        (["models:/absent@champion", "hi"], "MODEL: models:/absent@champion: not in the registry"),
    ],
)
def test_generate_names_a_model_it_cannot_find_in_one_line(args, fragment, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = attnpipe("generate", *args, "--tracking-uri", uri)
    assert result.returncode == 2 and result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.startswith("attnpipe: error: ")]
    assert len(lines) == 1, result.stderr[-2000:]
    assert fragment in lines[0] and "Traceback" not in result.stderr


def test_models_lists_presets_with_exact_parameter_counts():
    result = attnpipe("models")
    assert result.returncode == 0, result.stderr
    for name in PRESETS:
        assert name in result.stdout
        assert f"{count_params(preset_config(name)):,}" in result.stdout


def test_the_readme_spec_reference_is_the_one_the_schema_generates(tmp_path):
    """Every key of the schema, with a description, in the README: `attnpipe schema` writes
    the block; a key added to the schema without it fails here."""
    import json

    from pipeline.config import JobSpec
    from pipeline.config.reference import BEGIN, END, readme_block

    result = attnpipe("schema")
    assert result.returncode == 0, result.stderr
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index(BEGIN) : readme.index(END) + len(END)]
    assert block == readme_block(result.stdout.removesuffix("\n")), (
        "README.md's job-spec reference is stale: `.venv/bin/attnpipe schema --update README.md`"
    )
    rows = [line for line in result.stdout.splitlines() if line.startswith("| `")]
    documented = {line.split("`")[1] for line in rows}
    for key in ("training.optimizer.lr", "data.sources.N.path", "attention.adaptive_span.ramp",
                "deepspeed.zero_stage", "schedule.cron", "retrain.margin"):  # fmt: skip
        assert key in documented, key
    assert all(line.rstrip(" |").split(" | ")[-1].strip() for line in rows), "undescribed key"
    schema = json.loads(attnpipe("schema", "--format", "json").stdout)
    assert set(schema["properties"]) == set(JobSpec.model_fields)
    # --update rewrites only the block
    copy = tmp_path / "README.md"
    copy.write_text(readme.replace(block, readme_block("stale")))
    assert attnpipe("schema", "--update", str(copy)).returncode == 0
    assert copy.read_text() == readme


def test_status_and_submit_say_their_exit_codes():
    """Scripts and CI rely on them: 0 SUCCEEDED, 1 FAILED, 3 STOPPED, 2 bad input."""
    for command in ("status", "submit"):
        result = attnpipe(command, "--help")
        assert result.returncode == 0, result.stderr
        text = " ".join(result.stdout.replace("│", " ").split())
        for said in ("0 when", "1 when", "FAILED", "3 when it was STOPPED", "2 for bad input"):
            assert said in text, (command, said, text)
