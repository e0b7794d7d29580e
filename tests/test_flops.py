"""The MFU peak table against the device names torch.cuda.get_device_name reports: every
listed GPU gets its own dense figures, and near names (L40 and L4, H100 NVL and H100 SXM,
A40 and A10) never borrow a neighbour's."""

from __future__ import annotations

import pytest
import torch

from pipeline.train import flops

T = 1e12

# name as torch reports it -> (bf16, fp16, TF32, fp32) dense peaks, written out by hand from
# the vendors' figures (datasheet tensor rates "with sparsity" halved); None: no such unit
EXPECTED: dict[str, tuple[float | None, float, float | None, float]] = {
    "NVIDIA H100 80GB HBM3": (989.4 * T, 989.4 * T, 494.7 * T, 66.9 * T),  # SXM5
    "NVIDIA H100 PCIe": (756 * T, 756 * T, 378 * T, 51.2 * T),
    "NVIDIA H100 NVL": (835.5 * T, 835.5 * T, 417.5 * T, 60 * T),
    "NVIDIA H200": (989.4 * T, 989.4 * T, 494.7 * T, 66.9 * T),
    "NVIDIA H200 NVL": (835.5 * T, 835.5 * T, 417.5 * T, 60 * T),
    "NVIDIA A100-SXM4-80GB": (312 * T, 312 * T, 156 * T, 19.5 * T),
    "NVIDIA A100-SXM4-40GB": (312 * T, 312 * T, 156 * T, 19.5 * T),
    "NVIDIA A100-PCIE-40GB": (312 * T, 312 * T, 156 * T, 19.5 * T),
    "NVIDIA A100 80GB PCIe": (312 * T, 312 * T, 156 * T, 19.5 * T),
    "NVIDIA L4": (121 * T, 121 * T, 60 * T, 30.3 * T),
    "NVIDIA L40": (181.05 * T, 181.05 * T, 90.5 * T, 90.5 * T),
    "NVIDIA L40S": (362.05 * T, 362.05 * T, 183 * T, 91.6 * T),
    "NVIDIA A10G": (70 * T, 70 * T, 35 * T, 35 * T),
    "NVIDIA A10": (125 * T, 125 * T, 62.5 * T, 31.2 * T),
    "Tesla V100-SXM2-16GB": (None, 125 * T, None, 15.7 * T),
    "Tesla V100-SXM2-32GB": (None, 125 * T, None, 15.7 * T),
    "Tesla V100-PCIE-32GB": (None, 112 * T, None, 14 * T),
    "Tesla T4": (None, 65 * T, None, 8.1 * T),
    "NVIDIA GeForce RTX 4090": (165.2 * T, 165.2 * T, 82.6 * T, 82.6 * T),
}

# GPUs the table does not list: their MFU comes from a measured matrix multiply, never from
# the row of a GPU whose name contains or resembles theirs
UNLISTED = [
    "NVIDIA A100X",  # A100 with a BlueField DPU: its own clocks
    "NVIDIA A40",
    "NVIDIA H20",
    "NVIDIA H800",
    "NVIDIA GH200 480GB",
    "NVIDIA GeForce RTX 3090",
    "NVIDIA GeForce RTX 4090 D",
    "NVIDIA RTX A6000",
    "NVIDIA L40G",
    "Tesla V100S-PCIE-32GB",
    "NVIDIA A10M",
    "",
]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_listed_gpu_has_its_own_dense_peaks(name):
    bf16, fp16, tf32, fp32 = EXPECTED[name]
    assert flops.find_peak(name) == flops.Peak(bf16=bf16, fp16=fp16, tf32=tf32, fp32=fp32)
    assert flops.table_peak(name, "bf16") == bf16
    assert flops.table_peak(name, "fp16") == fp16
    # fp32 matmuls: CUDA cores by default, TF32 tensor cores where TF32 is allowed
    assert flops.table_peak(name, "fp32") == fp32
    assert flops.table_peak(name, "fp32", tf32=True) == (tf32 if tf32 is not None else fp32)


@pytest.mark.parametrize("name", UNLISTED)
def test_unlisted_gpus_match_nothing(name):
    assert flops.find_peak(name) is None
    assert flops.table_peak(name, "bf16") is None


def test_names_match_whatever_the_case_and_spacing():
    assert flops.find_peak("nvidia h100 nvl") == flops.find_peak("NVIDIA H100 NVL")
    assert flops.find_peak("  NVIDIA  L40S ") == flops.find_peak("NVIDIA L40S")


def test_the_near_names_of_the_issue_are_apart():
    assert flops.table_peak("NVIDIA H100 NVL", "bf16") == 835.5 * T  # not the SXM's 989.4
    assert flops.table_peak("NVIDIA L40", "bf16") == 181.05 * T  # not the L4's 121
    assert flops.table_peak("NVIDIA A10", "bf16") == 125 * T  # not the A10G's 70


def test_every_row_of_the_table_is_reached_by_a_tested_name():
    reached = {id(flops.find_peak(name)) for name in EXPECTED}
    assert {id(peak) for _, peak in flops.PEAKS} == reached


def test_a_cuda_device_takes_its_peak_from_the_table(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA L40")
    assert torch.backends.cuda.matmul.allow_tf32 is False  # PyTorch's default
    cuda = torch.device("cuda", 0)
    assert flops.DevicePeak(cuda, "bf16").flops == 181.05 * T
    assert flops.DevicePeak(cuda, "fp32").flops == 90.5 * T
    peak = flops.DevicePeak(cuda, "bf16")
    assert not peak.measured and peak.utilisation(90.525 * T) == 0.5


def test_a_cuda_device_without_a_row_measures_its_peak(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A40")
    monkeypatch.setattr(flops, "measured_gemm_flops", lambda device, dtype: 1e12)
    peak = flops.DevicePeak(torch.device("cuda", 0), "bf16")
    assert peak.measured and peak.flops == 1e12
