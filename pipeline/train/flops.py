"""Model FLOPs utilisation: the training FLOPs a step does (models.config.flops_per_token)
over what the devices could do at peak.

Peaks are the vendors' dense (no structured sparsity) tensor-core figures per device; on a
CPU, or a device missing from the table, the peak is a matrix multiply measured in place.
`training.peak_flops` overrides both.
"""

from __future__ import annotations

import time

import torch

from models.attention import make_pattern
from models.config import AttentionConfig, ModelConfig, flops_per_token
from models.transformer import stack_pattern

# (name fragment as torch.cuda.get_device_name reports it, 16-bit peak, fp32/TF32 peak)
PEAK_FLOPS: list[tuple[str, float, float]] = [
    ("H200", 989e12, 494e12),
    ("H100 PCIe", 756e12, 378e12),
    ("H100", 989e12, 494e12),
    ("A100", 312e12, 156e12),
    ("L40S", 362e12, 183e12),
    ("L4", 121e12, 60e12),
    ("A10G", 70e12, 35e12),
    ("A10", 125e12, 62e12),
    ("V100", 125e12, 15.7e12),
    ("RTX 4090", 165e12, 82.6e12),
]


def table_peak(device_name: str, precision: str) -> float | None:
    for fragment, half, single in PEAK_FLOPS:
        if fragment.lower() in device_name.lower():
            return half if precision in ("bf16", "fp16") else single
    return None


def measured_gemm_flops(
    device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 5
) -> float:
    """The best FLOP/s of an n x n x n matrix multiply over `repeats` timed runs."""
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
    return 2 * n**3 / best


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
            peak = table_peak(torch.cuda.get_device_name(device), precision)
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
