"""A long-range retrieval probe: can information reach a query from far away under a given
attention pattern?

Each sequence opens with a key of `key_tokens` symbols (where Longformer and BigBird place
their global tokens, like a question or a [CLS] token), then random filler, then at
distance d a marker after which the model must write the key out again. A model of the
probe's size, with the variant's attention (pattern, parameters, backend), is trained on the
task at every distance at once, then scored per distance on fresh sequences: accuracy of the
key's symbols (chance: 1 / symbols).

A probe model may train on shorter sequences than it is scored on (`train_task`): a
query's window and global tokens hold as many keys at 768 tokens as at 8K, so the task is
as hard to learn, at a tenth of the cost; with no position encoding (`positional: none`)
nothing in the model depends on the length, and it retrieves at 8K what it learned to
retrieve at 768. The trained distances must lie beyond the window's reach too, or the
window alone would learn them.

A causal sliding window of w keys carries information at most layers x (w - 1) tokens back,
so beyond that a pure window is at chance by construction; global tokens reach every query
in one hop, and random blocks reach some queries. The probe therefore also trains each
sparse variant's window alone (its globals and random blocks removed), to show what they buy.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from models.config import AttentionConfig, ModelConfig

IGNORE = -100
MARKER = 1  # token ids: 0 unused, 1 the marker, then key symbols, then filler
FIRST_SYMBOL = 2


@dataclass(frozen=True)
class ProbeTask:
    seq_len: int = 256
    key_tokens: int = 4
    symbols: int = 16
    filler: int = 64
    distances: tuple[int, ...] = (24, 200)

    @property
    def vocab_size(self) -> int:
        return FIRST_SYMBOL + self.symbols + self.filler

    def batch(
        self, generator: torch.Generator, size: int, distances: tuple[int, ...] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(input ids, targets): targets are the key's symbols where the model writes them
        (from the marker on), IGNORE elsewhere. Distances cycle over the batch."""
        k, first_filler = self.key_tokens, FIRST_SYMBOL + self.symbols
        ids = torch.randint(
            first_filler, self.vocab_size, (size, self.seq_len), generator=generator
        )
        keys = torch.randint(FIRST_SYMBOL, first_filler, (size, k), generator=generator)
        targets = torch.full((size, self.seq_len), IGNORE)
        ids[:, :k] = keys
        chosen = distances or self.distances
        for row in range(size):
            marker = k + chosen[row % len(chosen)] - 1  # the key's last symbol is d back
            ids[row, marker] = MARKER
            ids[row, marker + 1 : marker + 1 + k] = keys[row]
            targets[row, marker : marker + k] = keys[row]
        return ids, targets

    def validate(self) -> None:
        longest = self.key_tokens + max(self.distances) + self.key_tokens
        if longest > self.seq_len:
            raise ValueError(
                f"distance {max(self.distances)} does not fit: key and answer need "
                f"{longest} tokens, seq_len is {self.seq_len}"
            )


def window_only(attention: AttentionConfig) -> AttentionConfig | None:
    """The pattern's local part alone (no global tokens, no random blocks), for patterns
    that have one; None for the others."""
    params = dict(attention.params)
    if attention.pattern == "longformer":
        window = params.get("window", 256)
        dilation = params.get("dilation", 1)
        pattern, params = (
            ("sliding_window", {"window": window})
            if dilation == 1
            else ("dilated", {"window": window, "dilation": dilation})
        )
    elif attention.pattern == "bigbird":
        params.update(global_blocks=[], random=0)
        pattern = "bigbird"
    else:
        return None
    return attention.model_copy(update={"pattern": pattern, "params": params})


def train_and_score(
    attention: AttentionConfig,
    task: ProbeTask,
    model: ModelConfig,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    train_task: ProbeTask | None = None,
) -> dict[int, float]:
    """Train a fresh model with this attention on `train_task` (default: the task itself);
    its accuracy per distance on `task`."""
    from models.transformer import build_model

    train_task = train_task or task
    task.validate()
    train_task.validate()
    longest = max(task.seq_len, train_task.seq_len)
    torch.manual_seed(seed)
    net = build_model(
        model.model_copy(update={"vocab_size": task.vocab_size, "max_seq_len": longest}),
        attention,
    )
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    data = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(steps):
        ids, targets = train_task.batch(data, batch_size)
        loss = F.cross_entropy(net(ids).flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    return score(net, task, seed)


@torch.no_grad()
def score(
    net: torch.nn.Module, task: ProbeTask, seed: int, samples: int = 128, at_once: int = 16
) -> dict[int, float]:
    """Accuracy of the key's symbols per distance, over `samples` fresh sequences forwarded
    `at_once` at a time (at 8K tokens, 128 sequences at once would be a million tokens)."""
    net.eval()
    fresh = torch.Generator().manual_seed(seed + 1_000_003)  # sequences never trained on
    out = {}
    for distance in task.distances:
        ids, targets = task.batch(fresh, samples, (distance,))
        right = total = 0
        for start in range(0, samples, at_once):
            rows = slice(start, start + at_once)
            where = targets[rows] != IGNORE
            predicted = net(ids[rows]).argmax(-1)
            right += int((predicted[where] == targets[rows][where]).sum())
            total += int(where.sum())
        out[distance] = right / total
    return out


def reach(attention: AttentionConfig, layers: int) -> int | None:
    """How far back a pure causal window carries information in `layers` layers; None
    where the pattern has no such bound (dense, globals, random blocks)."""
    p = attention.params
    if attention.pattern == "sliding_window":
        return layers * (p.get("window", 256) - 1)
    if attention.pattern == "dilated":
        return layers * (p.get("window", 256) - 1) * p.get("dilation", 1)
    if attention.pattern == "bigbird" and not p.get("global_blocks") and not p.get("random"):
        return layers * (p.get("window", 3) - 1) * p.get("block", 64) + p.get("block", 64) - 1
    return None


def run_probe(variants: dict[str, Any], probe: Any, show: Any) -> list[dict[str, Any]]:
    """Rows {variant, pattern, params, accuracy: {distance: acc}, reach} for every variant
    probed (`probe.variants`, default all) and, for sparse ones with globals or random
    blocks, their window alone (unless `probe.window_only` is false)."""
    task = ProbeTask(
        seq_len=probe.seq_len,
        key_tokens=probe.key_tokens,
        symbols=probe.symbols,
        distances=tuple(probe.distances),
    )
    train_task = ProbeTask(
        seq_len=probe.train_seq_len or probe.seq_len,
        key_tokens=probe.key_tokens,
        symbols=probe.symbols,
        distances=tuple(probe.train_distances or probe.distances),
    )
    model = ModelConfig(
        d_model=probe.d_model,
        n_layers=probe.n_layers,
        n_heads=probe.n_heads,
        positional=probe.positional,
    )  # train_and_score sizes its vocabulary and length to the task
    runs: list[tuple[str, str, AttentionConfig]] = []  # (row name, variant, attention)
    chosen = probe.variants or list(variants)
    for name, spec in variants.items():
        if name not in chosen:
            continue
        runs.append((name, name, spec.attention))
        local = window_only(spec.attention) if probe.window_only else None
        if local is not None:
            runs.append((f"{name} (window only)", name, local))
    rows = []
    for name, variant, attention in runs:
        show(
            f"probe {name!r}: {attention.pattern} {attention.params or ''}, {probe.steps} "
            f"steps at distances {list(train_task.distances)} of {train_task.seq_len} tokens, "
            f"scored at {list(task.distances)} of {task.seq_len}"
        )
        started = time.perf_counter()
        accuracy = train_and_score(
            attention, task, model, probe.steps, probe.batch_size, probe.lr, probe.seed,
            train_task,
        )  # fmt: skip
        rows.append(
            {
                "variant": name,
                "of_variant": variant,
                "pattern": attention.pattern,
                "params": dict(attention.params),
                "accuracy": accuracy,
                "reach": reach(attention, probe.n_layers),
                "chance": 1.0 / task.symbols,
                "trained_at": {"seq_len": train_task.seq_len, "distances": train_task.distances},
                "seconds": time.perf_counter() - started,  # training and scoring
            }
        )
    return rows


def table(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """`run_probe`'s rows as the columns of an MLflow table (`probe.json`)."""
    columns: dict[str, list[Any]] = {
        "variant": [r["variant"] for r in rows],
        "pattern": [r["pattern"] for r in rows],
        "params": [str(r["params"]) for r in rows],
        "window_reach_tokens": [r["reach"] for r in rows],
    }
    if "attention_gflops_per_token" in rows[0]:  # a compare job's rows
        columns["attention_gflops_per_token"] = [r["attention_gflops_per_token"] for r in rows]
    for d in rows[0]["accuracy"]:
        columns[f"accuracy_d{d}"] = [r["accuracy"][d] for r in rows]
    columns["chance"] = [r["chance"] for r in rows]
    columns["trained_seq_len"] = [r["trained_at"]["seq_len"] for r in rows]
    columns["seconds"] = [r["seconds"] for r in rows]
    return columns
