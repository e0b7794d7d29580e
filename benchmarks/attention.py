"""Sparse attention against dense SDPA causal, side by side, in one run.

For each sequence length: dense SDPA causal (the baseline), then every pattern on every
available backend, forward and forward+backward; min and median over repeats, peak memory
(CUDA: the allocator's peak; CPU: peak resident set size sampled during the pass), the
pattern's density (the fraction of the S x S pairs inside its layout's tiles: what a
block-sparse kernel computes), its speedup over dense, and its ideal speedup (dense causal
pairs over the pairs the block layout computes). Also the time to build each layout.

    python benchmarks/attention.py --seq-lens 1024 16384 --patterns sliding_window bigbird

With --bidirectional, the encoder case: every pattern that has a bidirectional form against
dense SDPA without a causal mask (ideal speedups then count all S x S pairs).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from models.attention import (
    BatchGeometry,
    make_backend,
    make_pattern,
    native,
)
from models.attention.patterns import _bigbird_random_table

PATTERNS: dict[str, dict[str, Any]] = {
    "sliding_window": {"window": 512},
    "dilated": {"window": 256, "dilation": 2},
    "strided": {"stride": 256},
    "fixed": {"stride": 256, "summary": 16},
    "longformer": {"window": 512, "global_tokens": [[0, 64]]},
    "bigbird": {"block": 64, "window": 3, "global_blocks": [0], "random": 3},
    "variable": {"block": 64, "local_windows": [8], "global_blocks": [0]},
}
CAUSAL_ONLY = {"strided", "fixed"}  # Child et al. define them for causal attention only
CPU_FLEX_MAX_LEN = 4096  # eager FlexAttention on CPU materialises S x S scores


class PeakMemory:
    """Peak bytes above the starting level during a `with` block."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak = device, 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            _release_free_memory()  # so that RSS is live memory, not the allocator's cache
            self.base = self.high = _rss()
            self.running = True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.high = max(self.high, _rss())
            time.sleep(0.0005)

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.running = False
            self.thread.join()
            self.peak = max(0, max(self.high, _rss()) - self.base)


def _release_free_memory() -> None:
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def timed(fn: Callable[[], None], repeats: int, device: torch.device) -> tuple[list[float], int]:
    """Times of `repeats` runs after a warm-up, and the peak memory of one more run: on the
    CPU the memory sampler is a thread, so it must not run while the clock does."""
    fn()  # warm-up: compilation, caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    with PeakMemory(device) as mem:
        fn()
    return times, mem.peak


def computed_pairs(pattern: Any, seq_len: int, block: int) -> int:
    """Query/key pairs a block-sparse kernel computes: whole tiles of the layout."""
    return int(pattern.block_layout(seq_len, block).sum(dim=(1, 2)).float().mean()) * block * block


def passes(
    attend: Callable[[], torch.Tensor], inputs: tuple[torch.Tensor, ...]
) -> dict[str, Callable[[], None]]:
    def fwd() -> None:
        with torch.no_grad():
            attend()

    def fwd_bwd() -> None:
        attend().sum().backward()
        for t in inputs:
            t.grad = None

    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def layout_timing(pname: str, seq_len: int, block_size: int) -> dict[str, Any]:
    """Time to build a pattern's block layout, cold (BigBird's random draws not cached)."""
    pattern = make_pattern(pname, causal=True, **PATTERNS[pname])
    pattern.block_layout(1024, block_size)  # warm-up of the code paths, at another length
    _bigbird_random_table.cache_clear()
    start = time.perf_counter()
    layout = pattern.block_layout(seq_len, block_size)
    return {
        "pattern": pname,
        "seq_len": seq_len,
        "block_size": block_size,
        "layout_build_ms": (time.perf_counter() - start) * 1e3,
        "blocks": int(layout.shape[-1]) ** 2,
    }


def bench_length(
    seq_len: int,
    args: argparse.Namespace,
    device: torch.device,
    dtype: torch.dtype,
    record: Callable[..., None],
    layouts: list[dict[str, Any]],
) -> None:
    """Dense SDPA (causal unless --bidirectional), then every pattern on every backend, at
    one sequence length."""
    causal = not args.bidirectional
    shape = (args.batch, args.heads, seq_len, args.head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    dense_pairs = seq_len * (seq_len + 1) // 2 if causal else seq_len**2
    common = {"dtype": args.dtype, "seq_len": seq_len}

    baseline: dict[str, float] = {}
    dense = passes(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal), (q, k, v))
    for name, fn in dense.items():
        times, peak = timed(fn, args.repeats, device)
        baseline[name] = min(times)
        record(
            pattern="dense",
            params={"causal": causal},
            backend="sdpa",
            **common,
            **{"pass": name},
            ms_min=min(times),
            ms_median=statistics.median(times),
            peak_bytes=peak,
            density=dense_pairs / seq_len**2,
            speedup_vs_dense=1.0,
            ideal_speedup=1.0,
        )

    for pname in args.patterns:
        if not causal and pname in CAUSAL_ONLY:
            continue
        pattern = make_pattern(pname, causal=causal, **PATTERNS[pname])
        layouts.append(layout_timing(pname, seq_len, args.block_size))
        pairs = computed_pairs(pattern, seq_len, args.block_size)
        for bname in args.backends:
            if bname == "flex" and device.type == "cpu" and seq_len > CPU_FLEX_MAX_LEN:
                continue
            backend = make_backend(bname, pattern, args.block_size)
            geo = BatchGeometry(q_len=seq_len, kv_len=seq_len, device=device)
            start = time.perf_counter()
            prepared = backend.prepare(geo, dtype)
            prepare_ms = (time.perf_counter() - start) * 1e3

            def attend(b: Any = backend, p: Any = prepared) -> torch.Tensor:
                return b.attend(q, k, v, p, 0.0)

            for name, fn in passes(attend, (q, k, v)).items():
                if name == "fwd+bwd" and bname == "flex" and device.type == "cpu":
                    continue  # FlexAttention has no backward on CPU
                times, peak = timed(fn, args.repeats, device)
                record(
                    pattern=pname,
                    params={**PATTERNS[pname], "causal": causal},
                    backend=bname,
                    **common,
                    **{"pass": name},
                    ms_min=min(times),
                    ms_median=statistics.median(times),
                    peak_bytes=peak,
                    density=pairs / seq_len**2,
                    speedup_vs_dense=baseline[name] / min(times),
                    ideal_speedup=dense_pairs / pairs,
                    prepare_ms=prepare_ms,
                )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--seq-lens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768]
    )
    ap.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=list(PATTERNS))
    ap.add_argument("--backends", nargs="+", default=["blocksparse", "flex"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--bidirectional",
        action="store_true",
        help="encoder attention: bidirectional patterns against dense SDPA without a mask",
    )
    ap.add_argument(
        "--layout-lens",
        type=int,
        nargs="*",
        default=[65536],
        help="extra lengths at which only the layout build is timed",
    )
    ap.add_argument("--out", default="benchmarks/results/attention.json")
    args = ap.parse_args()

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    records: list[dict[str, Any]] = []
    layouts: list[dict[str, Any]] = []

    def record(**fields: Any) -> None:
        records.append(fields)
        print(json.dumps(fields), flush=True)

    for seq_len in args.seq_lens:
        bench_length(seq_len, args, device, dtype, record, layouts)
    for seq_len in args.layout_lens:
        layouts += [layout_timing(p, seq_len, args.block_size) for p in args.patterns]

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "heads": args.heads,
        "head_dim": args.head_dim,
        "batch": args.batch,
        "block_size": args.block_size,
        "repeats": args.repeats,
        "causal": not args.bidirectional,
        # the block-sparse backend's loop: the compiled one (CPU), or Python's
        "native_kernel": native.kernel(device) is not None,
    }
    out.write_text(json.dumps({"meta": meta, "records": records, "layouts": layouts}, indent=1))
    plot(records, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


def plot(records: list[dict[str, Any]], path: Path) -> None:
    """Time against length, log-log, forward and forward+backward side by side; one colour
    per pattern/backend in both panels, one legend for both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({f"{r['pattern']} / {r['backend']}" for r in records})
    colors = {label: plt.cm.tab20(i % 20) for i, label in enumerate(labels)}
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5), sharey=True)
    for ax, pass_name in zip(axes, ("fwd", "fwd+bwd"), strict=True):
        series: dict[str, list[tuple[int, float]]] = {}
        for r in records:
            if r["pass"] == pass_name:
                label = f"{r['pattern']} / {r['backend']}"
                series.setdefault(label, []).append((r["seq_len"], r["ms_min"]))
        for label, points in sorted(series.items()):
            xs, ys = zip(*sorted(points), strict=True)
            ax.plot(
                xs,
                ys,
                marker="o",
                label=label,
                color=colors[label],
                linewidth=2.5 if label.startswith("dense") else 1.2,
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (tokens)")
        mode = (
            "causal" if all(r["params"].get("causal", True) for r in records) else "bidirectional"
        )
        ax.set_title(f"{mode} attention {pass_name} (flex: CPU forward only, up to 4K)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("time (ms, min of repeats)")
    handles = [plt.Line2D([], [], color=colors[label], marker="o") for label in labels]
    fig.legend(handles, labels, loc="center right", fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.84, 1))
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
