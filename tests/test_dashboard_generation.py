"""A published generation's evaluation as the API and the dashboard show it: the base the experts
started from, each expert, the merged base and the routed mixture, with each one's change against
the base — read from the page in headless Chromium, served by a real coordinator that found the
generation (a real merge of two tiny experts, evaluated and signed) in its out dir."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from browser_helpers import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, require_chromium
from conftest import Peers
from merging_helpers import make_expert, merge_config
from playwright.sync_api import sync_playwright

from cogen.coordinator.generation_files import summarize
from cogen.coordinator.merging import verify_manifest
from cogen.coordinator.merging.merge import merge_experts
from cogen.core.procs import wait_for
from cogen.protocols.hashing import sha256_file
from cogen.protocols.manifest import MANIFEST_FILE, Manifest

DOMAINS = ("medical", "code")

#: the evaluation table's rows as the page shows them: row name, and per domain the loss and its change
READ_TABLE = """() => {
  const rows = [...document.querySelectorAll("#generations tr[data-row]")];
  if (!rows.length) return null;
  const table = rows[0].closest("table");
  return {
    domains: [...table.querySelectorAll("thead th.num")].map((th) => th.textContent),
    rows: rows.map((r) => ({ name: r.dataset.row, cells: [...r.querySelectorAll("td.num")].map((td) => {
      const delta = td.querySelector(".delta");
      return { loss: td.firstChild.textContent.trim(), delta: delta ? delta.textContent : null,
               better: delta ? delta.classList.contains("better") : null };
    }) })),
  };
}"""


@pytest.fixture(scope="module")
def published(tiny_path: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One generation merged from a medical and a code expert, evaluated on both domains, with its
    routed mixture; returns its directory and the key that signed it."""
    root = tmp_path_factory.mktemp("evaluated")
    experts = tuple(make_expert(tiny_path, root / d, i, expert=d) for i, d in enumerate(DOMAINS, 1))
    final = merge_experts(merge_config(
        experts=experts, method="ties", out=root / "out", identity=root / "id.pem", device="cpu",
        eval_domains=DOMAINS, eval_blocks=2, eval_block_size=32, router_blocks=4, weights=(1.0, 1.0),
        gate=False,
    ))  # fmt: skip
    return final, root / "id.pem"


def expected(manifest: Manifest) -> dict[str, dict[str, float | None]]:
    """name -> domain -> loss, straight from the signed manifest."""
    evaluation, best = manifest.evaluation, manifest.best
    assert evaluation is not None and evaluation.merged is not None and best is not None
    return {
        "base": evaluation.base,
        **evaluation.experts,
        "merged": evaluation.merged,
        "mixture": best.losses,
    }


def test_the_summary_lists_base_experts_merged_and_mixture_whichever_model_won(
    published: tuple[Path, Path],
) -> None:
    manifest = verify_manifest(published[0])
    assert manifest.best is not None
    sha = sha256_file(published[0] / MANIFEST_FILE)
    want = expected(manifest)
    for kind in ("moe", "dense"):  # the mixture is shown whether it or the dense merge came out better
        shown = manifest.model_copy(update={"best": manifest.best.model_copy(update={"kind": kind})})
        scores = {(s.domain, s.expert): s.loss for s in summarize(shown, sha).scores}
        assert scores == {(d, name): losses[d] for name, losses in want.items() for d in DOMAINS}, kind


@pytest.mark.slow
def test_the_dashboard_shows_each_model_against_the_base_it_started_from(
    peers: Peers, published: tuple[Path, Path]
) -> None:
    require_chromium()
    final, key = published
    manifest = verify_manifest(final)
    want = expected(manifest)
    # a generation that does not end during the test: the coordinator serves the one it reads back
    info = peers.start_coordinator(
        "--model", "tiny", "--out-dir", str(final.parents[1]), "--identity", str(key),
        "--generation-s", "3600",
    )  # fmt: skip
    ranking = summarize(manifest, sha256_file(final / MANIFEST_FILE)).ranking
    assert sorted(ranking) == sorted(DOMAINS)
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 960})
            page.goto(info["api_url"] + "/")
            table: dict[str, Any] = wait_for(
                lambda: page.evaluate(READ_TABLE), 60, "the evaluation table on the page", 0.5,
                [peers.procs["coordinator"]],
            )  # fmt: skip
            page.screenshot(path=str(ARTIFACTS / "dashboard-generation.png"))
        finally:
            browser.close()

    # the base first, the experts in their ranking, then the merged base and the routed mixture
    assert [r["name"] for r in table["rows"]] == ["base", *ranking, "merged", "mixture"]
    assert table["domains"] == list(manifest.evaluation.domains)  # type: ignore[union-attr]
    base = want["base"]
    for row in table["rows"]:
        for domain, cell in zip(table["domains"], row["cells"], strict=True):
            loss = want[row["name"]][domain]
            assert loss is not None and base[domain] is not None
            assert cell["loss"] == f"{loss:.3f}", (row["name"], domain, cell)
            if row["name"] == "base":
                assert cell["delta"] is None  # nothing to compare the base with
                continue
            pct = 100 * (loss - base[domain]) / base[domain]  # type: ignore[operator]
            assert cell["delta"] == f"{'+' if pct > 0 else ''}{pct:.1f} %", (row["name"], domain, cell)
            assert cell["better"] is (pct <= 0), (row["name"], domain, cell)
