"""The overlapped (one-round-late) outer step in bench.communication, and bench.swarm.wan's figures."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from bench.communication.arms import InFlight, land, landed_model
from bench.communication.model import Settings, Worker
from bench.communication.outer import OuterState
from bench.harness import BenchError, child_env, module_command
from bench.swarm import wan
from cogen.core.config import GroupConfig


def _train(worker: object, scale: float, seed: int) -> None:
    """Move a worker's weights as inner steps would (a seeded random walk)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in worker.params:  # type: ignore[attr-defined]
            p.add_(torch.randn(p.shape, generator=g) * scale)


def test_land_is_begin_round_keep_progress_then_finish_round() -> None:
    """Weights become the new anchor plus the progress made while the round ran, on every member,
    and the next pseudo-gradient (anchor - weights) carries exactly that progress."""
    s = Settings(hidden=16, intermediate=32, vocab=64, layers=1)
    workers = [Worker(s), Worker(s)]
    state = OuterState(workers[0].params, GroupConfig())
    for i, w in enumerate(workers):
        _train(w, 0.01, seed=i)
    deltas = [state.pseudo_gradient(w.params) for w in workers]
    averaged = [(a + b) / 2 for a, b in zip(*deltas, strict=True)]
    snapshots = [[p.detach().clone() for p in w.params] for w in workers]
    flight = InFlight(averaged, snapshots, 0)
    for i, w in enumerate(workers):  # training goes on while the round runs
        _train(w, 0.01, seed=10 + i)
    progress = [
        [p.detach() - s for p, s in zip(w.params, sn, strict=True)]
        for w, sn in zip(workers, snapshots, strict=True)
    ]
    anchor0 = [a.clone() for a in state.anchor]
    landed = landed_model(state, workers[0].model, flight, 0.7, 0.9)
    assert all(torch.equal(a, a0) for a, a0 in zip(state.anchor, anchor0, strict=True))  # a copy only

    land(state, workers, flight, 0.7, 0.9)
    for a0, a, d in zip(anchor0, state.anchor, averaged, strict=True):
        assert torch.allclose(a, a0 - 0.7 * (d + 0.9 * d), atol=1e-6)  # Nesterov from zero momentum
    for w, prog in zip(workers, progress, strict=True):
        for p, a, dp in zip(w.params, state.anchor, prog, strict=True):
            assert torch.allclose(p.detach(), a + dp, atol=1e-6)
        for g, dp in zip(state.pseudo_gradient(w.params), prog, strict=True):
            assert torch.allclose(g, -dp, atol=1e-6)
    for p, a in zip(landed.parameters(), state.anchor, strict=True):
        assert torch.allclose(p.detach(), a)  # the evaluated model is the landed anchor


def test_wan_window_and_rounds() -> None:
    """Utilisation = Σ inner-step seconds / wall time between the first step and the last one."""
    rows = [
        {"t": 100.0},  # metrics up, no step yet
        {"t": 101.0, "steps": 1, "sum": 0.5},
        {"t": 105.0, "steps": 5, "sum": 2.5},
        {"t": 111.0, "steps": 5, "sum": 2.5},  # an outer round: no inner step
        {"t": 113.0, "steps": 9, "sum": 4.5},
        {"t": 114.0, "steps": 10, "sum": 5.0},
        {"t": 120.0, "steps": 10, "sum": 5.0},  # the final round, after the last step
    ]
    log = (
        "12:00:00 INFO cogen.node.service: medical | outer step 1 applied | group of 2 | 6.0 s | 9 MiB sent\n"
        "12:00:09 INFO cogen.node.service: medical | outer step 2 skipped (no group formed) | group of 0 "
        "| 15.1 s | 0 B sent\n"
    )
    f = wan.node_figures(rows, 10, log)
    assert f.wall_s == pytest.approx(13.0) and f.compute_s == pytest.approx(4.5)
    assert f.utilisation == pytest.approx(4.5 / 13.0) and f.steps == 9
    assert (f.rounds_ok, f.rounds_failed, f.round_seconds) == (1, 1, [6.0])
    with pytest.raises(BenchError, match="do not cover"):
        wan.node_figures(rows[:4], 10, log)


@pytest.mark.slow
@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("tc") is None, reason="network namespaces need root and tc"
)
@pytest.mark.skipif(
    os.environ.get("COGEN_BENCH_SMOKE") != "1",
    reason="minutes of real training across namespaces; set COGEN_BENCH_SMOKE=1 to run it",
)
def test_wan_tiny(tmp_path: Path) -> None:
    out = tmp_path / "w.json"
    cmd = [*module_command("bench.swarm.wan"), "--model", "tiny", "--lora-rank", "4", "--inner-steps", "3",
           "--rounds", "2", "--log-dir", str(tmp_path / "logs"), "--json", str(out)]  # fmt: skip
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=child_env()
    )
    try:
        stdout, stderr = proc.communicate(timeout=480)
    finally:
        if proc.poll() is None:
            proc.terminate()  # SIGTERM: it removes its namespaces on the way out
            proc.communicate(timeout=60)
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    report = json.loads(out.read_text())
    for key in ("utilisation", "utilisation_overlap", "utilisation_no_overlap"):
        assert 0 < report[key] <= 1.0, (key, report[key])
    assert sum(report["arms"]["no_overlap"]["rounds_ok"]) >= 2  # both nodes averaged at least once
    assert "utilisation_ratio" in stdout
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert f"cogennet-{proc.pid}-" not in listed  # the benchmark removed its namespaces
