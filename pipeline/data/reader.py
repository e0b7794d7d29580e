"""The deterministic, resumable reader training uses (OSS Ray Data has no checkpointable
iterator; see DESIGN.md).

One global order over all samples of a split: epoch e is a permutation drawn from
(seed, e). Step after step, the next `global_batch` samples of that order are consumed,
and rank r of a world of W takes every W-th of them, starting at r. The state is a single
integer, the number of samples consumed, so a resumed run continues at the exact sample,
and a run resumed on a different world size continues the same global order.
"""

from __future__ import annotations

import bisect
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.shards import open_shard, read_manifest
from pipeline.errors import DataError


class ShardReader:
    """Samples of one split of a preprocessed output, memory-mapped, in a seeded order."""

    def __init__(
        self,
        out_dir: str | Path,
        split: str = "train",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        verify: bool = True,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of {world_size}")
        self.out_dir = Path(out_dir)
        self.manifest = read_manifest(self.out_dir)
        if split not in self.manifest["splits"]:
            raise DataError(
                f"{self.out_dir}: no split {split!r}; splits: {', '.join(self.manifest['splits'])}"
            )
        entries = self.manifest["splits"][split]["shards"]
        self.shards = [open_shard(self.out_dir, e, verify) for e in entries]
        self.starts = list(np.cumsum([0] + [len(s) for s in self.shards]))
        self.total = int(self.starts[-1])
        if self.total == 0:
            raise DataError(f"{self.out_dir}: split {split!r} has no samples")
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        self.consumed = 0
        self._epoch, self._order = -1, np.arange(0)

    def __len__(self) -> int:
        return self.total

    def sample(self, index: int) -> np.ndarray:
        """(2, L) tokens and document ids of global sample `index`."""
        shard = bisect.bisect_right(self.starts, index) - 1
        return np.asarray(self.shards[shard][index - self.starts[shard]])

    def _order_of(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._order = rng.permutation(self.total) if self.shuffle else np.arange(self.total)
            self._epoch = epoch
        return self._order

    def global_indices(self, start: int, count: int) -> np.ndarray:
        """Sample indices at positions [start, start + count) of the endless global order."""
        out = np.empty(count, dtype=np.int64)
        for i in range(count):
            epoch, pos = divmod(start + i, self.total)
            out[i] = self._order_of(epoch)[pos]
        return out

    def next_batch(self, per_rank: int) -> np.ndarray:
        """(per_rank, 2, L) this rank's share of the next global batch of
        per_rank * world_size samples; every rank must call it once per step."""
        global_batch = per_rank * self.world_size
        picks = self.global_indices(self.consumed, global_batch)[self.rank :: self.world_size]
        self.consumed += global_batch
        return np.stack([self.sample(int(i)) for i in picks])

    def state_dict(self) -> dict[str, Any]:
        return {"consumed": self.consumed, "seed": self.seed, "total": self.total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["seed"] != self.seed or state["total"] != self.total:
            raise DataError(
                f"{self.out_dir}: the saved reader state is for another data set "
                f"(seed {state['seed']}, {state['total']} samples)"
            )
        self.consumed = int(state["consumed"])
