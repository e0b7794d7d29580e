"""The memory planner: ZeRO and activation formulas against hand-computed numbers, fit
verdicts for a 7B model, sparse attention, and `attnpipe plan` as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from models import count_params
from pipeline.config import load_spec
from pipeline.plan import (
    FRAMEWORK_OVERHEAD,
    GPUS,
    GiB,
    PlanError,
    Stack,
    Workload,
    activation_lines,
    estimate,
    find_gpu,
    gpu_total,
    human,
    model_state_lines,
    plan_job,
)

ROOT = Path(__file__).resolve().parent.parent
ATTNPIPE = Path(sys.executable).parent / "attnpipe"  # the installed console script
P = 1_000_000  # parameters of the hand-computed workloads


def workload(**changes) -> Workload:
    """A small decoder: 2 layers, s=1024, b=2, h=64, a=4, V=512."""
    base = Workload(
        params=P,
        largest_module=10_000,
        d_model=64,
        n_heads=4,
        vocab_size=512,
        stacks=(Stack("decoder", 2, 1024, 1024.0),),
        logits_len=1024,
        precision="bf16",
        zero_stage=0,
        offload_optimizer=False,
        offload_params=False,
        world_size=8,
        micro_batch=2,
        global_batch=16,
        checkpointing=False,
    )
    return replace(base, **changes)


def states(w: Workload) -> dict[str, tuple[int, int]]:
    return {line.component: (line.gpu, line.cpu) for line in model_state_lines(w)}


def gpu_bytes(w: Workload) -> int:
    return sum(gpu for gpu, _ in states(w).values())


# --------------------------------------------------------------------------- model states


def test_zero0_fp32_is_16_bytes_per_param():
    w = workload(precision="fp32", zero_stage=0)
    assert states(w) == {
        "parameters": (4 * P, 0),
        "gradients": (4 * P, 0),
        "optimizer states": (8 * P, 0),  # Adam m, v; the weights are the fp32 master
    }
    assert gpu_bytes(w) == 16 * P


def test_zero0_mixed_precision_is_16_bytes_per_param_split_2_2_12():
    assert [g for g, _ in states(workload(zero_stage=0)).values()] == [2 * P, 2 * P, 12 * P]


def test_zero1_partitions_the_optimizer_states():
    assert gpu_bytes(workload(zero_stage=1, world_size=4)) == 2 * P + 2 * P + 12 * P // 4


def test_zero2_bf16_over_8_is_2_plus_14_over_8_bytes_per_param():
    assert gpu_bytes(workload(zero_stage=2, world_size=8)) == 2 * P + (2 + 12) * P // 8


def test_zero3_partitions_everything_and_gathers_one_module():
    w = workload(zero_stage=3, world_size=8)
    s = states(w)
    assert [s[k][0] for k in ("parameters", "gradients", "optimizer states")] == [
        2 * P // 8,
        2 * P // 8,
        12 * P // 8,
    ]
    assert s["gathered (ZeRO-3)"] == ((2 + 2) * w.largest_module, 0)


def test_offload_moves_optimizer_and_gradient_partitions_to_the_cpu():
    s = states(workload(zero_stage=2, world_size=8, offload_optimizer=True))
    assert s["parameters"] == (2 * P, 0)
    assert s["gradients"] == (0, 4 * P // 8)  # fp32 partition for CPU Adam
    assert s["optimizer states"] == (0, 12 * P // 8)
    # ZeRO-1 keeps its full 16-bit gradients on the GPU
    assert states(workload(zero_stage=1, offload_optimizer=True))["gradients"] == (2 * P, 0)
    both = states(workload(zero_stage=3, offload_optimizer=True, offload_params=True))
    assert both["parameters"] == (0, 2 * P // 8)


# --------------------------------------------------------------------------- activations


def test_activations_follow_korthikanti_et_al():
    s, b, h, a, layers = 1024, 2, 64, 4, 2
    lines = {line.component: line.gpu for line in activation_lines(workload())}
    assert lines["activations"] == layers * s * b * h * 34
    assert lines["attention scores"] == layers * 5 * a * s * s * b
    assert lines["logits"] == s * b * 512 * 4
    assert lines["framework"] == FRAMEWORK_OVERHEAD == GiB

    fp32 = {line.component: line.gpu for line in activation_lines(workload(precision="fp32"))}
    assert fp32["activations"] == 2 * lines["activations"]
    assert fp32["attention scores"] == 2 * lines["attention scores"]
    assert fp32["logits"] == lines["logits"]  # the loss is fp32 either way


def test_checkpointing_keeps_layer_inputs_and_one_full_layer():
    s, b, h, a, layers = 1024, 2, 64, 4, 2
    lines = {line.component: line.gpu for line in activation_lines(workload(checkpointing=True))}
    assert lines["activations"] == layers * 2 * s * b * h + 34 * s * b * h
    assert lines["attention scores"] == 5 * a * s * s * b


def test_workers_sharing_a_gpu_add_up():
    one, two = workload(), workload(workers_per_gpu=2)
    assert gpu_total(two) == 2 * gpu_total(one)
    assert sum(line.gpu for line in estimate(one)) == gpu_total(one)


# --------------------------------------------------------------------------- from a spec


def llama(*overrides: str):
    return load_spec(
        None,
        [
            "model.preset=llama-7b",
            "training.precision=bf16",
            "data.seq_len=2048",
            "training.micro_batch_size=1",
            "training.global_batch_size=8",
            "resources.gpus_per_worker=1",
            "resources.gpu_type=H100-80GB",
            *overrides,
        ],
    )


def test_params_are_counted_on_the_built_model():
    spec = load_spec(ROOT / "jobs/decoder-tiny.yaml", ["attention.adaptive_span.max_span=64"])
    plan = plan_job(spec)
    # adaptive spans add one parameter per head and layer: counted because the model is built
    assert plan.workload.params == count_params(spec.model.architecture(), spec.attention)
    assert plan.workload.params > count_params(spec.model.architecture())


def test_llama_7b_fits_with_zero3_over_8_workers():
    plan = plan_job(llama("deepspeed.zero_stage=3", "resources.num_workers=8"))
    assert plan.workload.params == 6_738_415_616
    assert plan.fits is True
    assert plan.verdict().startswith("fits on H100-80GB: ")
    assert plan.gpu_total == sum(line.gpu for line in plan.lines)


def test_llama_7b_does_not_fit_with_zero0_on_one_worker_and_suggestions_fit():
    plan = plan_job(llama("deepspeed.zero_stage=0", "resources.num_workers=1"))
    assert plan.fits is False
    states = sum(line.gpu for line in plan.lines[:3])
    assert states == 16 * 6_738_415_616  # 2 + 2 + 12 bytes per parameter, nothing partitioned
    assert plan.verdict().startswith("does NOT fit on H100-80GB: needs ")
    assert plan.suggestions
    for s in plan.suggestions:  # each suggestion was checked by re-running the estimate
        assert s.gpu_total <= GPUS["H100-80GB"].memory
        fixed = plan_job(llama("deepspeed.zero_stage=0", "resources.num_workers=1", *s.overrides))
        assert fixed.fits and fixed.gpu_total == s.gpu_total
    # one worker: ZeRO partitions nothing, so raising the stage alone is never suggested
    assert ("deepspeed.zero_stage=3",) not in [s.overrides for s in plan.suggestions]


def test_sparse_attention_stores_fewer_scores_than_dense():
    common = ["model.preset=tiny", "model.positional=rope", "data.seq_len=8192"]
    dense = plan_job(load_spec(None, common))
    sparse = plan_job(
        load_spec(
            None,
            [
                *common,
                "attention.pattern=sliding_window",
                "attention.params={window: 256}",
                "attention.backend=blocksparse",
            ],
        )
    )

    def scores(plan):
        return next(line.gpu for line in plan.lines if line.component == "attention scores")

    assert dense.workload.stacks[0].keys_per_query == 8192
    assert 256 <= sparse.workload.stacks[0].keys_per_query <= 256 + 2 * 64  # window + tiles
    assert scores(sparse) < scores(dense) / 20
    assert sparse.gpu_total < dense.gpu_total


def test_encoder_decoder_has_both_stacks_and_cross_attention():
    plan = plan_job(load_spec(ROOT / "jobs/encdec-tiny.yaml"))
    encoder, decoder = plan.workload.stacks
    assert (encoder.name, decoder.name) == ("encoder", "decoder")
    assert decoder.cross_keys == encoder.seq_len and encoder.cross_keys == 0


def test_without_a_gpu_type_fit_is_not_judged():
    plan = plan_job(load_spec(ROOT / "jobs/decoder-tiny.yaml"))
    assert plan.gpu is None and plan.fits is None
    assert "no GPU type given" in plan.verdict()


@pytest.mark.parametrize("name", ["H100-80GB", "h100-80gb", "h100_80gb", "H100 80GB", "h100"])
def test_gpu_names_match_case_insensitively(name):
    assert find_gpu(name).name == "H100-80GB"


def test_unknown_gpu_names_the_field_and_suggests():
    with pytest.raises(PlanError) as exc:
        find_gpu("H100-80G", "jobs/x.yaml")
    message = str(exc.value)
    assert message.startswith("jobs/x.yaml: resources.gpu_type: unknown GPU type 'H100-80G'")
    assert "did you mean 'H100-80GB'" in message and "\n" not in message


def test_human_sizes():
    assert human(0) == "-"
    assert human(512 * 1024**2) == "512.0 MiB"
    assert human(1000 * 1024**2) == "1.0 GiB"
    assert human(int(23.4 * GiB)) == "23.4 GiB"


# --------------------------------------------------------------------------- the command


def attnpipe(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ATTNPIPE), *args], capture_output=True, text=True, cwd=ROOT, timeout=120
    )


def test_cli_plan_prints_the_table_and_the_fit_line():
    result = attnpipe("plan", "jobs/decoder-gpt2-small.yaml", "resources.gpu_type=H100-80GB")
    assert result.returncode == 0, result.stderr
    assert "optimizer states" in result.stdout and "activations" in result.stdout
    assert any(line.startswith("fits on H100-80GB: ") for line in result.stdout.splitlines())


def test_cli_plan_unknown_gpu_exits_2_with_one_line():
    result = attnpipe("plan", "jobs/decoder-gpt2-small.yaml", "resources.gpu_type=H100-80G")
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "resources.gpu_type" in lines[0] and "H100-80GB" in lines[0]
    assert "Traceback" not in result.stderr


def test_cli_plan_json_has_every_number():
    result = attnpipe("plan", "jobs/decoder-gpt2-small.yaml", "--format", "json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["params"] == 124_439_808 and plan["world_size"] == 8
    assert plan["gpu_total_bytes"] == sum(c["gpu_bytes"] for c in plan["components"])
    assert plan["gpu"]["name"] == "H100-80GB" and plan["fits"] is True
    assert 0 < plan["utilization"] < 1
