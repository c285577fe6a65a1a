"""Save a screenshot of a running coordinator's dashboard (for the README).

Usage: .venv/bin/python scripts/screenshot.py http://127.0.0.1:PORT/ docs/dashboard.png
Drives Debian's headless Chromium through Playwright, waits until the page shows peers and a chart.
"""

from __future__ import annotations

import sys

from playwright.sync_api import sync_playwright

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]  # fmt: skip


def main(url: str, out: str) -> None:
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(url)
            page.wait_for_selector(".js-plotly-plot", timeout=60_000)
            page.wait_for_timeout(2500)  # one more refresh, so the charts hold the latest points
            page.screenshot(path=out, full_page=True)
        finally:
            browser.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
