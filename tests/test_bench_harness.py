"""bench.harness: presets and explicit flags, ratio lines with their verdicts, the report and a real child."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
from pathlib import Path

import pytest

from bench.harness import (
    BenchError,
    child_env,
    module_command,
    new_parser,
    parse,
    ratio_line,
    run_child,
    write_report,
)
from bench.swarm import chaos

TARGETS = {"floor_ratio": (">=", 0.8), "memory_ratio": ("<=", 0.25), "context": ("<=", math.inf)}


def _parser() -> argparse.ArgumentParser:
    parser = new_parser("A benchmark.\n\nMore.", {"quick": ("a short run", {"steps": 6, "blocks": 4})})
    parser.add_argument("--steps", type=int, default=45)
    parser.add_argument("--blocks", type=int, default=16)
    return parser


def test_a_preset_fills_defaults_and_explicit_flags_win(tmp_path: Path) -> None:
    parser = _parser()
    plain = parse(parser, [])
    assert (plain.steps, plain.blocks, plain.quick, plain.json) == (45, 16, False, None)
    assert not hasattr(plain, "_presets")
    quick = parse(_parser(), ["--quick", "--json", str(tmp_path / "r.json")])
    assert (quick.steps, quick.blocks, quick.quick, quick.json) == (6, 4, True, tmp_path / "r.json")
    mixed = parse(_parser(), ["--steps", "9", "--quick"])
    assert (mixed.steps, mixed.blocks) == (9, 4)


def test_chaos_quick_is_a_preset() -> None:
    quick = chaos.parse_args(["--quick"])
    assert (quick.seconds, quick.generation_s, quick.partition_s, quick.quick) == (300.0, 60.0, 30.0, True)
    full = chaos.parse_args([])
    assert (full.seconds, full.generation_s, full.partition_s, full.quick) == (600.0, 90.0, 60.0, False)
    assert chaos.parse_args(["--quick", "--partition-s", "45"]).partition_s == 45.0


def test_ratio_line_says_value_target_and_verdict() -> None:
    assert ratio_line("floor_ratio", 0.56, TARGETS, "floor s / cogen s") == (
        "floor_ratio            0.560   (floor s / cogen s; target >= 0.8: MISSES target)"
    )
    assert "0.900" in ratio_line("floor_ratio", 0.9, TARGETS) and "meets target" in ratio_line(
        "floor_ratio", 0.9, TARGETS
    )
    assert "MISSES target" in ratio_line("memory_ratio", 0.3, TARGETS)
    missing = ratio_line("floor_ratio", None, TARGETS)
    assert "not measured" in missing and "target >= 0.8" in missing and "meets" not in missing
    assert "not measured" in ratio_line("floor_ratio", math.nan, TARGETS)
    assert "target" not in ratio_line("context", 0.4, TARGETS)  # a figure to report, not a target


def test_report_is_written_with_its_environment(tmp_path: Path) -> None:
    path = tmp_path / "out" / "report.json"
    path.parent.mkdir()
    write_report(path, {"ratio": 1.5})
    report = json.loads(path.read_text())
    assert report["ratio"] == 1.5
    env = report["environment"]
    assert env["python"].count(".") == 2 and env["cpu_count"] >= 1 and "platform" in env
    write_report(None, {"ratio": 2.0})  # no path: nothing written, no error


def test_a_child_module_answers_from_any_directory(tmp_path: Path) -> None:
    """``python -m bench...`` children find the package from outside the checkout (PYTHONPATH)."""
    proc = subprocess.run(
        module_command("bench.swarm.chaos", "--help"),
        cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0 and "--quick" in proc.stdout and "--json PATH" in proc.stdout, proc.stderr
    with pytest.raises(BenchError, match="exit code 2"):  # a bad flag: the child fails, one clear error
        run_child("bench.swarm.chaos", ["--no-such-flag"], 1, "chaos with a bad flag")
