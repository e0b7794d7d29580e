"""Named presets shipped with the package.

`deepspeed/*.json` are DeepSpeed config fragments (their `zero_optimization` section), one
per name: `deepspeed.preset: zero3-offload` in a job spec picks `zero3-offload.json`. They
are package data, so an installed attnpipe (a wheel, the training image) finds them without
a checkout; `infra/deepspeed/` holds the same files for people who read or copy them, and a
test keeps the two identical.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any


@cache
def deepspeed_presets() -> dict[str, dict[str, Any]]:
    """{preset name: the DeepSpeedNode fields it sets}, read from the shipped JSON files."""
    folder = resources.files(__name__).joinpath("deepspeed")
    presets: dict[str, dict[str, Any]] = {}
    files = {e.name.removesuffix(".json"): e for e in folder.iterdir() if e.name.endswith(".json")}
    for name in sorted(files):
        presets[name] = node_fields(json.loads(files[name].read_text(encoding="utf-8")))
    return presets


def node_fields(config: dict[str, Any]) -> dict[str, Any]:
    """The DeepSpeedNode fields a DeepSpeed config's `zero_optimization` section describes:
    its stage, and whether optimizer states and parameters are offloaded (any device but
    `none`)."""
    zero = config.get("zero_optimization", {})

    def offloaded(key: str) -> bool:
        return (zero.get(key) or {}).get("device", "none") != "none"

    return {
        "zero_stage": int(zero.get("stage", 0)),
        "offload_optimizer": offloaded("offload_optimizer"),
        "offload_params": offloaded("offload_param"),
    }
