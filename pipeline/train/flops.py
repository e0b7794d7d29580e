"""Model FLOPs utilisation: the training FLOPs a step does (models.config.flops_per_token)
over what the devices could do at peak.

Peaks are the vendors' dense (no structured sparsity) figures per device, looked up by the
exact name `torch.cuda.get_device_name` reports; on a CPU, or a device missing from the
table, the peak is a matrix multiply measured in place. `training.peak_flops` overrides both.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import torch

from models.attention import make_pattern
from models.config import AttentionConfig, ModelConfig, flops_per_token
from models.transformer import stack_pattern


@dataclass(frozen=True)
class Peak:
    """One GPU's dense peaks in FLOP/s. Tensor-core rates accumulate in fp32 (what PyTorch's
    bf16 and fp16 GEMMs do); None where the GPU has no such unit."""

    bf16: float | None  # BF16 tensor cores
    fp16: float  # FP16 tensor cores, fp32 accumulate
    tf32: float | None  # TF32 tensor cores: fp32 matmuls when TF32 is allowed
    fp32: float  # FP32 on the CUDA cores: fp32 matmuls by default (TF32 off)


T = 1e12
# (names as torch.cuda.get_device_name reports them, a regular expression matched against the
# whole name, case-insensitively; the peaks). Whole-name matches, so that "NVIDIA L40" is not
# an "L4", "NVIDIA H100 NVL" not an H100 SXM, and an unlisted "NVIDIA A40", "NVIDIA H20" or
# "NVIDIA GeForce RTX 3090" falls back to a measured peak instead of a neighbour's figures.
# Datasheets give tensor rates "with sparsity"; the dense rate is half of that.
PEAKS: list[tuple[str, Peak]] = [
    # H100 SXM5 (p5, a3-highgpu): H100 whitepaper, SXM5 column: BF16 989.4, TF32 494.7,
    # FP32 66.9 (datasheet: 1,979* / 989* / 67).
    (r"NVIDIA H100 \d+GB HBM3", Peak(989.4 * T, 989.4 * T, 494.7 * T, 66.9 * T)),
    # H100 PCIe: whitepaper, PCIe column: BF16 756, TF32 378, FP32 51.2.
    (r"NVIDIA H100 PCIe", Peak(756 * T, 756 * T, 378 * T, 51.2 * T)),
    # H100 NVL (94 GB, per GPU), current datasheet: BF16 1,671*, TF32 835*, FP32 60.
    (r"NVIDIA H100 NVL", Peak(835.5 * T, 835.5 * T, 417.5 * T, 60 * T)),
    # H200 (SXM, 141 GB), datasheet: BF16 1,979*, TF32 989*, FP32 67: the H100 SXM5's
    # compute (the same GH100 at the same clocks), so the whitepaper's exact figures.
    (r"NVIDIA H200", Peak(989.4 * T, 989.4 * T, 494.7 * T, 66.9 * T)),
    # H200 NVL, datasheet: BF16 1,671*, TF32 835*, FP32 60.
    (r"NVIDIA H200 NVL", Peak(835.5 * T, 835.5 * T, 417.5 * T, 60 * T)),
    # A100 SXM4 and PCIe, 40 and 80 GB, datasheet: BF16 312 (624*), TF32 156 (312*),
    # FP32 19.5, the same for all four.
    (
        r"NVIDIA A100-SXM4-(40|80)GB|NVIDIA A100-PCIE-40GB|NVIDIA A100 80GB PCIe",
        Peak(312 * T, 312 * T, 156 * T, 19.5 * T),
    ),
    # L4, datasheet: BF16 242*, TF32 120*, FP32 30.3.
    (r"NVIDIA L4", Peak(121 * T, 121 * T, 60 * T, 30.3 * T)),
    # L40, datasheet: BF16 181.05 (362.1*), TF32 90.5 (181*), FP32 90.5.
    (r"NVIDIA L40", Peak(181.05 * T, 181.05 * T, 90.5 * T, 90.5 * T)),
    # L40S, datasheet: BF16 362.05 (733*), TF32 183 (366*), FP32 91.6.
    (r"NVIDIA L40S", Peak(362.05 * T, 362.05 * T, 183 * T, 91.6 * T)),
    # A10G (AWS g5): NVIDIA publishes no datasheet. 80 SMs at a 1.71 GHz boost give FP32
    # 35.0; tensor rates at half the A10's per SM (fp32 accumulate at half rate, as on
    # GeForce GA102) give BF16 70, TF32 35. Uncertain: set training.peak_flops if you know.
    (r"NVIDIA A10G", Peak(70 * T, 70 * T, 35 * T, 35 * T)),
    # A10, datasheet: BF16 125 (250*), TF32 62.5 (125*), FP32 31.2.
    (r"NVIDIA A10", Peak(125 * T, 125 * T, 62.5 * T, 31.2 * T)),
    # V100 SXM2, 16 and 32 GB, datasheet: tensor (FP16) 125, FP32 15.7; no BF16, no TF32.
    (r"Tesla V100-SXM2-(16|32)GB", Peak(None, 125 * T, None, 15.7 * T)),
    # V100 PCIe, datasheet: tensor (FP16) 112, FP32 14.
    (r"Tesla V100-PCIE-(16|32)GB", Peak(None, 112 * T, None, 14 * T)),
    # T4, datasheet: FP16 (mixed precision) 65, FP32 8.1; no BF16, no TF32.
    (r"Tesla T4", Peak(None, 65 * T, None, 8.1 * T)),
    # GeForce RTX 4090, Ada whitepaper: BF16 165.2 (330.4*), FP16 with fp32 accumulate 165.2,
    # TF32 82.6 (165.2*), FP32 82.6.
    (r"NVIDIA GeForce RTX 4090", Peak(165.2 * T, 165.2 * T, 82.6 * T, 82.6 * T)),
]


def find_peak(device_name: str) -> Peak | None:
    """The table's row for a device name, or None: the whole name must match one row."""
    name = " ".join(device_name.split())
    for pattern, peak in PEAKS:
        if re.fullmatch(pattern, name, flags=re.IGNORECASE):
            return peak
    return None


def table_peak(device_name: str, precision: str, tf32: bool = False) -> float | None:
    """The table's dense peak for `precision` ("bf16", "fp16" or "fp32") on a device, or None.
    fp32 matmuls run on TF32 tensor cores only where TF32 is allowed (`tf32`, from
    torch.backends.cuda.matmul.allow_tf32; PyTorch's default is off), else on the CUDA cores."""
    peak = find_peak(device_name)
    if peak is None:
        return None
    if precision == "bf16":
        return peak.bf16
    if precision == "fp16":
        return peak.fp16
    return peak.tf32 if tf32 and peak.tf32 is not None else peak.fp32


def measured_gemm_flops(
    device: torch.device, dtype: torch.dtype, n: int | None = None, repeats: int = 5
) -> float:
    """The best FLOP/s of an n x n x n matrix multiply over `repeats` timed runs. n defaults
    to 2,048, or less where one multiply of that size takes long: a CPU without native bf16
    (AVX2 only) multiplies bf16 matrices at about 1 GFLOP/s, 13 s for one of 2,048, so the
    size doubles from 256 only while a multiply takes under 20 ms."""
    if n is None:
        n = 256
        while n < 2048 and _best_mm_seconds(device, dtype, n, 1) < 0.02:
            n *= 2
    return 2 * n**3 / _best_mm_seconds(device, dtype, n, repeats)


def _best_mm_seconds(device: torch.device, dtype: torch.dtype, n: int, repeats: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


class DevicePeak:
    """A device's peak FLOP/s for MFU: `training.peak_flops`, else the vendor table, else a
    matrix multiply measured in place. A measured peak is a lower bound (a machine busy
    while it was measured reads low), so it rises to any rate a step is seen to reach:
    MFU from a measured peak never exceeds 1."""

    def __init__(self, device: torch.device, precision: str, override: float | None = None):
        self.measured = False
        if override:
            self.flops = float(override)
            return
        if device.type == "cuda":
            name = torch.cuda.get_device_name(device)
            peak = table_peak(name, precision, torch.backends.cuda.matmul.allow_tf32)
            if peak:
                self.flops = peak
                return
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
        self.flops = measured_gemm_flops(device, dtype)
        self.measured = True

    def utilisation(self, achieved: float) -> float:
        """achieved / peak, for one device's achieved FLOP/s."""
        if self.measured and achieved > self.flops:
            self.flops = achieved
        return achieved / self.flops


def attention_density(attention: AttentionConfig, model: ModelConfig, seq_len: int) -> float:
    """The fraction of a dense layout's tiles the pattern computes (what a block-sparse
    kernel does), from the analytic layouts: O(blocks), never S x S."""
    causal = model.family != "encoder"
    if attention.pattern == "dense":
        return 1.0
    pattern = stack_pattern(attention, causal, model.n_heads)
    dense = make_pattern("dense", causal=causal)
    size = min(attention.block_size, seq_len)
    tiles = pattern.block_layout(seq_len, size).float().mean()
    return float(tiles / dense.block_layout(seq_len, size).float().mean())


def train_flops_per_token(attention: AttentionConfig, model: ModelConfig, seq_len: int) -> float:
    return flops_per_token(model, seq_len, attention_density(attention, model, seq_len))
