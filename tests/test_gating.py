"""The publishing gate on real merges: a harmful expert is left out, a harmful generation is not published,
and a real coordinator shows the decision and its evidence (API, alert, the dashboard in Chromium)."""

from __future__ import annotations

from pathlib import Path

import pytest
from browser_helpers import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, require_chromium
from conftest import Peers
from merging_helpers import make_expert, merge_config, trained_expert
from playwright.sync_api import sync_playwright

from cogen.coordinator.generation_files import record_refusal
from cogen.coordinator.merging import verify_manifest
from cogen.coordinator.merging.gating import GateRefused
from cogen.coordinator.merging.merge import merge_experts
from cogen.coordinator.merging.publish import generation_dir
from cogen.coordinator.merging.recompute import recompute
from cogen.coordinator.schemas import AlertList, GateStatus
from cogen.core.procs import wait_for

TARGETS = ("q_proj", "v_proj", "down_proj")


@pytest.fixture(scope="module")
def experts(tiny_path: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("gate-experts")
    good = trained_expert(tiny_path, root / "medical", "medical")
    harmful = make_expert(tiny_path, root / "legal", 7, expert="legal", targets=TARGETS, std=0.5)
    return good, harmful


def cfg(tmp_path: Path, experts: list[Path], **kw: object):
    settings = {"experts": experts, "out": tmp_path / "out", "identity": tmp_path / "id.pem", "device": "cpu",
                "eval_domains": ("medical", "legal"), "eval_blocks": 8, "eval_block_size": 64,
                "mixture": False, "weights": (1.0, 1.0)}  # fmt: skip
    return merge_config(**{**settings, **kw})


def test_a_harmful_expert_is_left_out_and_the_gate_is_in_the_signed_manifest(
    tmp_path: Path, experts: tuple[Path, Path]
) -> None:
    final = merge_experts(cfg(tmp_path, list(experts)))
    manifest = verify_manifest(final)
    gate = manifest.gate
    assert gate is not None and gate.passed and manifest.manifest_version == 4
    first, last = gate.attempts[0], gate.attempts[-1]
    assert not first.passed and any(d.worse for d in first.domains)
    assert last.passed and last.weights == {"medical": 1.0, "legal": 0.0}, gate.attempts
    assert {e.name: e.weight for e in manifest.experts} == {"medical": 1.0, "legal": 0.0}
    general = [d for d in last.domains if d.general]  # judged on text no expert trains on, too
    assert general and {d.domain for d in general} <= {"code", "literature"}
    assert all(not d.worse for d in last.domains)
    # anyone holding both experts recomputes exactly the candidate the gate published
    found = recompute(final, list(experts))
    assert found.problems == [] and found.exact and found.tensors > 10


def test_a_generation_worse_than_its_parent_is_not_published(
    tmp_path: Path, experts: tuple[Path, Path]
) -> None:
    _, harmful = experts
    with pytest.raises(GateRefused, match="the gate kept the parent") as refused:
        merge_experts(cfg(tmp_path, [harmful], weights=(1.0,)))
    report = refused.value.report
    assert not report.passed and report.attempts and all(not a.passed for a in report.attempts)
    assert [a.scale for a in report.attempts] == [1.0, 0.5]  # one expert: nothing to drop, halved once
    assert not generation_dir(tmp_path / "out", 1).exists() and not (tmp_path / "out/latest").exists()
    # without the gate the same merge would have been published
    assert verify_manifest(merge_experts(cfg(tmp_path, [harmful], weights=(1.0,), gate=False))).gate is None


#: the gate panel as the page shows it: the verdict, and per candidate its verdict and where it was worse
READ_GATE = """() => {
  const verdict = document.getElementById("gate-verdict");
  if (!verdict) return null;
  return {
    generation: Number(verdict.dataset.generation), passed: verdict.dataset.passed === "true",
    text: verdict.textContent,
    attempts: [...document.querySelectorAll("#gate tr[data-attempt]")].map((r) => ({
      passed: r.dataset.passed === "true",
      worse: [...r.querySelectorAll("td[data-worse=true]")].map((td) => td.dataset.domain),
    })),
  };
}"""


@pytest.mark.slow
def test_a_refusal_and_its_evidence_are_served_alerted_and_shown_after_a_restart(
    peers: Peers, tmp_path: Path, experts: tuple[Path, Path]
) -> None:
    require_chromium()
    _, harmful = experts
    first = verify_manifest(merge_experts(cfg(tmp_path, list(experts))))  # published, legal left out
    with pytest.raises(GateRefused) as refused:  # the next generation, from the harmful expert alone
        merge_experts(
            cfg(tmp_path, [harmful], weights=(1.0,), model=str(generation_dir(tmp_path / "out", 1)))
        )
    report = refused.value.report
    assert report.generation == 2
    record_refusal(tmp_path / "out", report)  # as the generation loop keeps it
    # a coordinator started on the out dir reads both back: the published gate and the refusal since
    info = peers.start_coordinator("--model", "tiny", "--out-dir", str(tmp_path / "out"), "--identity",
                                   str(tmp_path / "id.pem"), "--generation-s", "3600")  # fmt: skip
    gate = GateStatus.model_validate(peers.api("/api/gate"))
    assert gate.published == first.gate and gate.refused == report
    alerts = AlertList.model_validate(peers.api("/api/alerts")).alerts
    refusal = [a for a in alerts if a.kind == "generation_refused"]
    assert len(refusal) == 1 and "generation 2 not published" in refusal[0].message, alerts
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            page.goto(info["api_url"] + "/")
            shown = wait_for(lambda: page.evaluate(READ_GATE), 60, "the gate panel on the page", 0.5,
                             [peers.procs["coordinator"]])  # fmt: skip
            page.screenshot(path=str(ARTIFACTS / "dashboard-gate.png"), full_page=True)
        finally:
            browser.close()
    assert shown["generation"] == 2 and not shown["passed"] and "the parent stays the base" in shown["text"]
    assert [a["passed"] for a in shown["attempts"]] == [False] * len(report.attempts)
    for row, attempt in zip(shown["attempts"], report.attempts, strict=True):
        assert row["worse"] == [d.domain for d in attempt.domains if d.worse] and row["worse"]
