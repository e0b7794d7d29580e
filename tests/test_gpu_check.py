"""benchmarks/gpu_check.py --device cpu: the GPU check's every step at tiny sizes, so that
the script a lent GPU will run works end to end (flex forward only on a CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_runs_every_step_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    run = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
    )
    record = json.loads(out.read_text())
    steps = record["steps"]
    failed = {k: v.get("error") for k, v in steps.items() if not v["ok"]}
    assert run.returncode == 0 and failed == {}, (failed, run.stderr[-3000:])
    assert list(steps) == ["env", "flex", "blocksparse", "train", "resume_export", "speed"]
    assert steps["env"]["torch"] == __import__("torch").__version__
    flex = steps["flex"]["cases"]
    assert sorted(flex) == ["bigbird/d16", "longformer/d16", "sliding_window/d16"]
    assert all(c["recompiles_after_first"] == 0 for c in flex.values())
    assert all(c["max_error"] <= steps["flex"]["tolerance"] for c in flex.values())
    assert all(c["profiled_events"] > 0 for c in steps["blocksparse"]["cases"].values())
    (name, trained), *_ = steps["train"]["runs"].items()
    assert name == "blocksparse/zero0" and trained["step"] == 4
    assert trained["val_loss"] > 0 and trained["memory_gib"] > 0
    resumed = steps["resume_export"]
    assert resumed["resumed_step"] == 6 and resumed["resumed_at"] == [4]
    assert resumed["exported_files"] == ["config.json", "model.safetensors", "tokenizer.json"]
    assert resumed["peak_measured"] and resumed["plan"]["gpu_total_bytes"] > 0
    assert [r["pattern"] for r in steps["speed"]["records"]] == ["sliding_window", "bigbird"]
