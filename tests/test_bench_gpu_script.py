"""benchmarks/gpu/run.sh in its CPU mode: the same script, Tritons and gateway as on the GPU machine,
with every model on the CPU (a small NumPy MLP through the same model file) and short steps."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_script_runs_in_cpu_mode(tmp_path):
    out = tmp_path / "gpu"
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu" / "run.sh"), "--cpu", "--short", "--out", str(out)],
                          capture_output=True, text=True, timeout=480)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    steps = json.loads((out / "compare.json").read_text())["steps"]
    targets = list(dict.fromkeys(step["target"] for step in steps))
    assert len(targets) == 3  # GPU Triton with its batcher, without, and the gateway
    assert [step["level"] for step in steps] == [1, 1, 1, 8, 8, 8]
    assert all(step["requests"] > 0 and not step["errors"] for step in steps), steps
    counts = json.loads((out / "counts.json").read_text())
    assert counts["harness_gpu_batched"] == counts["triton"]["gpu-batched"] > 0
    assert (out / "compare.png").read_bytes().startswith(b"\x89PNG")
    summary = (out / "summary.md").read_text()
    assert "| gateway (batching) -> GPU Triton, no batcher | 8 |" in summary
    # The spill step runs through SLO-aware placement and reports what each pool served and whether
    # the SLO held. Whether the CPU pool takes the excess is the GPU machine's measurement: here both
    # "pools" share the same 2 cores, so spilling adds no capacity and is not asserted.
    spill = json.loads((out / "spill.json").read_text())
    assert "skipped" not in spill, spill
    assert spill["step"]["requests"] > 0 and not spill["step"]["errors"], spill
    assert spill["served"]["gpu"] + spill["served"]["cpu"] >= spill["step"]["requests"], spill
    assert isinstance(spill["slo_held"], bool) and "## Spill" in summary
