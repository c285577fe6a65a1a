"""``cogen demo --model tiny`` runs the whole path: coordinator, nodes in a group and alone, two
generations merged, published and followed, evaluation, table, JSON."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.mark.timeout(600)
def test_tiny_demo_trains_experts_that_beat_the_base(tmp_path: Path) -> None:
    result_path = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, "-m", "cogen.app.cli", "demo", "--model", "tiny", "--out-dir", str(tmp_path / "run"),
         "--json", str(result_path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(result_path.read_text())
    assert result["model"] == "tiny"
    assert set(result["domains"]) == {"medical", "legal", "code"}
    for domain, row in result["domains"].items():
        assert set(row) >= {"base_loss", "expert_loss", "tokens_trained"}
        assert row["tokens_trained"] > 0
        assert math.isfinite(row["expert_loss"]), (domain, row)
        assert set(row["merged_loss"]) == {"1", "2"}  # both generations were merged and evaluated
        # a group is collected once it applied an outer step (one may miss g1); what was collected learned
        assert row["expert_g0_loss"] is None or row["expert_g0_loss"] < row["base_loss"], (domain, row)
        assert row["merged_loss"]["2"] < row["base_loss"], (domain, row)  # g2 beats the pretrained base
    assert result["merge_methods"] == ["linear", "linear"]
    assert any(row["expert_g0_loss"] is not None for row in result["domains"].values())
    table = proc.stdout
    assert "merged g2" in table and all(d in table for d in ("medical", "legal", "code"))


@pytest.mark.timeout(600)
def test_tiny_demo_with_fuse_fuses_a_foreign_expert_into_each_generation(tmp_path: Path) -> None:
    result_path = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, "-m", "cogen.app.cli", "demo", "--model", "tiny", "--fuse", "--generations", "1",
         "--seconds", "150", "--domains", "medical", "legal", "--out-dir", str(tmp_path / "run"),
         "--json", str(result_path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(result_path.read_text())
    assert result["merge_methods"] == ["fuse"] and set(result["domains"]) == {"medical", "legal"}
    sources = {s["name"]: s for s in result["fusion_sources"]["1"]}
    foreign = sources["legal@tiny-smol"]  # the foreign node's expert, on the other vocabulary
    assert foreign["kind"] == "source" and not foreign["same_tokenizer"] and foreign["domain"] == "legal"
    assert any(s["kind"] == "expert" and s["same_tokenizer"] for s in sources.values())  # the swarm's own too
    assert "generation 1 fused from" in proc.stdout and "legal@tiny-smol (foreign" in proc.stdout
    assert "a foreign node legal-foreign trains legal on tiny-smol" in proc.stdout


def test_the_demo_children_take_their_settings_from_their_config_files(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cogen.app.demo import child_environ

    monkeypatch.setenv("COGEN_LR", "0.5")  # would override the demo's own learning rate in every child
    monkeypatch.setenv("COGEN_CACHE_DIR", "/tmp/cogen-cache")
    monkeypatch.setenv("COGEN_LOG_LEVEL", "DEBUG")
    environ = child_environ()
    assert "COGEN_LR" not in environ and environ["COGEN_CACHE_DIR"] == "/tmp/cogen-cache"
    assert environ["COGEN_LOG_LEVEL"] == "DEBUG" and environ["PATH"]
