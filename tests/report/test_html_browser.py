"""The report opens in a real browser: headless Chromium loads it, every figure decodes with a non-zero size, and a
screenshot is kept in the test's temporary directory (a CI artifact).

Needs Chromium (Debian's ``chromium``; ``/usr/bin/chromium``); skipped with the reason when it is absent.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from dynprobe.cli import main

from ..synthetic_runs import uniform_steps, write_synthetic_run

pytestmark = pytest.mark.browser

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage"]

# Appended to a copy of the report only (the report itself has no script): writes what the browser decoded.
CHECKER = """<script>
window.addEventListener("load", function () {
  var results = Array.prototype.map.call(document.images, function (img) {
    return {complete: img.complete, width: img.naturalWidth, height: img.naturalHeight, alt: img.alt};
  });
  var out = document.createElement("pre");
  out.id = "dynprobe-image-check";
  out.textContent = JSON.stringify({images: results, title: document.title,
                                    sections: document.querySelectorAll("section").length});
  document.body.appendChild(out);
});
</script>"""


def chromium() -> str | None:
    if os.path.exists("/usr/bin/chromium"):
        return "/usr/bin/chromium"
    return next((path for name in CANDIDATES if (path := shutil.which(name))), None)


def run_chromium(binary: str, profile: Path, *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([binary, *FLAGS, f"--user-data-dir={profile}", *arguments], capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def browser() -> str:
    binary = chromium()
    if binary is None:
        pytest.skip("no Chromium found (looked for /usr/bin/chromium and " + ", ".join(CANDIDATES) + "); install "
                    "Debian's chromium package to run the browser test")
    return binary


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("browser") / "run"
    write_synthetic_run(root, steps=uniform_steps(1000, 31), transition=200, ghosts=(0, 100, 400))
    assert main(["report", str(root)]) == 0
    return root / "report.html"


def test_every_figure_decodes_in_headless_chromium(browser, report, tmp_path):
    page = tmp_path / "checked.html"
    page.write_text(report.read_text(encoding="utf-8").replace("</body>", CHECKER + "</body>"), encoding="utf-8")
    result = run_chromium(browser, tmp_path / "profile", "--virtual-time-budget=10000", "--dump-dom", page.as_uri())
    assert result.returncode == 0, result.stderr[-2000:]
    found = re.search(r'<pre id="dynprobe-image-check">(.*?)</pre>', result.stdout, re.S)
    assert found, "the page's load handler did not run: " + result.stdout[:500]
    check = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert check["sections"] == 11 and check["title"].startswith("dynprobe report")
    expected = report.read_text(encoding="utf-8").count("<img")
    assert len(check["images"]) == expected >= 10
    for image in check["images"]:
        assert image["complete"] and image["width"] > 0 and image["height"] > 0, image


def test_screenshot_of_the_report_is_kept(browser, report, tmp_path):
    screenshot = tmp_path / "report-screenshot.png"
    result = run_chromium(browser, tmp_path / "profile", "--window-size=1300,6000", "--hide-scrollbars",
                          f"--screenshot={screenshot}", report.as_uri())
    assert result.returncode == 0, result.stderr[-2000:]
    data = screenshot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 50_000
    print(f"screenshot kept at {screenshot}")
