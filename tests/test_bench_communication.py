"""bench.communication and its scaling benchmark on tiny budgets: real training, real wire format."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest

from bench.communication.model import Settings, build_model
from bench.communication.outer import OuterState
from bench.harness import child_env, module_command
from cogen.core.config import GroupConfig

STEPS, H = 20, 5
SMALL = ["--eval-blocks", "4", "--batch-size", "2", "--block-size", "32"]


def _run(module: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    cmd = module_command(module, *args)
    proc = subprocess.run(
        cmd, capture_output=True, text=True, cwd=cwd, env=child_env(), timeout=240, check=False
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_communication_tiny(tmp_path: Path) -> None:
    out = tmp_path / "c.json"
    proc = _run(
        "bench.communication",
        ["--steps", str(STEPS), "--inner-steps", str(H), *SMALL, "--json", str(out)],
        tmp_path,
    )
    report = json.loads(out.read_text())
    keys = ("bytes_ratio", "baseline_loss", "cogen_loss", "baseline_loss_half", "cogen_loss_half")
    for key in (*keys, "loss_gap_pct", "loss_gap_half_pct"):
        assert isinstance(report[key], float) and math.isfinite(report[key]), (key, report[key])
    assert report["bytes_ratio"] > 1
    for key in ("cogen_overlap_loss", "cogen_overlap_loss_half", "overlap_vs_cogen_pct"):  # the overlap arm
        assert isinstance(report[key], float) and math.isfinite(report[key]), key
    assert report["cogen_overlap_rounds"] == report["cogen_rounds"]
    assert report["cogen_overlap_loss"] != report["cogen_loss"]  # a different algorithm, not a copy

    # the bytes are H-times-fewer rounds of the 8-bit size against every step's fp32 size
    from hivemind.compression import NoCompression

    from cogen.node.wire import estimate_bytes_sent, wire_compression

    settings = Settings(**{k: v for k, v in report["settings"].items() if k in Settings.__dataclass_fields__})
    params = list(build_model(settings).parameters())
    per_step = estimate_bytes_sent(params, NoCompression(), 2)
    per_round = estimate_bytes_sent(params, wire_compression("8bit", 4096), 2)
    assert report["baseline_rounds"] == STEPS and report["cogen_rounds"] == STEPS // H
    assert report["baseline_bytes"] == STEPS * per_step
    assert report["cogen_bytes"] == (STEPS // H) * per_round
    assert report["bytes_ratio"] == pytest.approx(H * per_step / per_round)
    assert report["cogen_bytes_measured"] > 0 and report["tokens"] == STEPS * 2 * 2 * 32
    assert "bytes_ratio" in proc.stdout and "loss_gap_pct" in proc.stdout and "baseline" in proc.stdout


def test_outer_step_is_cogens() -> None:
    """The benchmark's outer step moves the anchor exactly as GroupAverager._apply's Nesterov formula."""
    import torch

    settings = Settings(hidden=16, intermediate=32, vocab=64, layers=1)
    model = build_model(settings)
    params = list(model.parameters())
    state = OuterState(params, GroupConfig())
    anchor0 = [a.clone() for a in state.anchor]
    delta = [torch.randn_like(a) for a in anchor0]
    state.apply(delta, 0.7, 0.9)
    for a0, a, m, d, p in zip(anchor0, state.anchor, state.momentum, delta, params, strict=True):
        assert torch.allclose(m, d)
        assert torch.allclose(a, a0 - 0.7 * (d + 0.9 * d), atol=1e-6)
        assert torch.equal(p.detach(), a)


@pytest.mark.slow
def test_scaling_tiny(tmp_path: Path) -> None:
    out = tmp_path / "s.json"
    args = ["--total-steps", "40", "--inner-steps", str(H), *SMALL, "--json", str(out)]
    proc = _run("bench.communication.scaling", args, tmp_path)
    report = json.loads(out.read_text())
    for key in ("speedup_2", "speedup_4", "target_loss", "final_loss_1", "speedup_common_4"):
        assert isinstance(report[key], float) and math.isfinite(report[key]) and report[key] >= 0, key
    assert set(report["curves"]) == {"1", "2", "4"}
    assert len(report["curves"]["4"]) == 2  # 10 steps each, H = 5
    assert "SIMULATED" in proc.stdout and "speedup_4" in proc.stdout
