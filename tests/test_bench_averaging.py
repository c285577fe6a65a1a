"""python -m bench.averaging end to end on loopback: real peer processes, real hivemind averaging rounds."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest

from bench.harness import child_env, module_command

KEYS = ("loopback_ratio_2", "loopback_ratio_2_8bit", "cogen_overhead_2", "cogen_overhead_2_8bit")


def _positive(value: object) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_averaging_bench_on_loopback(tmp_path: Path) -> None:
    out = tmp_path / "averaging.json"
    cmd = module_command("bench.averaging", "--size-mb", "4", "--peers", "2", "--rounds", "1", "--skip-netns",
                         "--json", str(out))  # fmt: skip
    proc = subprocess.run(
        cmd, capture_output=True, text=True, cwd=tmp_path, env=child_env(), timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    report = json.loads(out.read_text())
    for key in KEYS:
        assert _positive(report[key]), (key, report.get(key), proc.stdout[-2000:])
    assert _positive(report["floor_seconds"]["loopback"])
    assert report["bytes_per_peer"] == 4_000_000
    assert report["skipped"]["netns"] == "--skip-netns"
    assert "floor_ratio_2" not in report  # no namespaces, no 1 Gbit/s figures
    for config in report["configs"]:
        assert config["path"] == "loopback" and config["peers"] == 2 and config["error"] is None
        assert _positive(config["cogen_seconds"]) and _positive(config["bare_seconds"])

    # the table and the targets, with their verdicts
    assert "bare hivemind s" in proc.stdout and "cogen s" in proc.stdout
    rows = [line for line in proc.stdout.splitlines() if line.startswith("loopback  2")]
    assert len(rows) == 2, proc.stdout
    assert "floor_ratio_2" in proc.stdout and "not measured" in proc.stdout
