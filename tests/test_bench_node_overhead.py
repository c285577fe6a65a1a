"""python -m bench.node.overhead end to end on the tiny model: real children, real 8-bit training steps.

The children build the tiny model in the session cache that ``conftest.py`` puts in ``COGEN_CACHE_DIR``.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest

from bench.harness import child_env, module_command

RATIOS = ("throughput_ratio", "state_memory_ratio", "peak_memory_ratio")


@pytest.mark.slow
def test_node_overhead_tiny(tmp_path: Path) -> None:
    out = tmp_path / "x.json"
    cmd = [
        *module_command("bench.node.overhead"),
        "--model",
        "tiny",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--batch-size",
        "2",
        "--block-size",
        "32",
        "--no-fp32-lora",  # three fresh processes instead of four keep the test fast
        "--json",
        str(out),
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, cwd=tmp_path, env=child_env(), timeout=240, check=False
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    report = json.loads(out.read_text())
    for key in RATIOS:
        value = report[key]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (key, value)
    configs = report["configs"]
    assert set(configs) == {"cogen", "bare_int8_lora", "fp32_full"}
    assert configs["cogen"]["state_bytes"]["total"] < configs["fp32_full"]["state_bytes"]["total"]
    for result in configs.values():
        assert len(result["step_seconds"]) == 2
        assert result["peak_rss_bytes"] >= result["baseline_rss_bytes"] > 0
    # the node and the floor trained on the same batches from the same start
    assert configs["cogen"]["losses"] == pytest.approx(configs["bare_int8_lora"]["losses"], rel=1e-3)
    assert report["settings"]["threads"] == 1 and report["settings"]["batch_size"] == 2

    # the readable table and the three ratios with their targets
    assert "samples/s" in proc.stdout and "peak RSS" in proc.stdout
    for name in configs:
        assert any(line.startswith(name) for line in proc.stdout.splitlines()), name
    for key in RATIOS:
        assert key in proc.stdout
