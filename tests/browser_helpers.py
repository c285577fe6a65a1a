"""Headless Chromium for the dashboard's browser tests: Debian's ``chromium`` (``scripts/test.sh``
installs it), driven by Playwright, and where the tests leave their screenshots."""

from __future__ import annotations

from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-quic",
]  # fmt: skip
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"


def require_chromium() -> None:
    assert CHROMIUM.exists(), "the browser tests need Debian's chromium, /usr/bin/chromium (scripts/test.sh)"
