"""The report in a real browser: headless Chromium loads it offline, every embedded figure decodes, tables render.

Needs Debian's chromium (`make setup` installs it when apt is available); skipped, saying so, where it is missing.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import matplotlib.image
import pytest

from depthlab.study.report import write_report

CHROMIUM = shutil.which("chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]


def chromium(args: list[str], profile) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                          timeout=120, check=False)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (make setup installs it with apt)")
def test_report_renders_in_headless_chromium(study, tmp_path):
    html_path, _ = write_report(study, tmp_path / "report")
    url = html_path.resolve().as_uri()
    dom = chromium(["--virtual-time-budget=5000", "--dump-dom", url], tmp_path / "profile-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = dom.stdout
    body = re.search(r"<body[^>]*>", page).group(0)  # the report's script marks it once the images decoded
    assert 'data-figures-expected="6"' in body
    assert 'data-figures-loaded="6"' in body and "data-figures-failed" not in body, body
    assert '<table id="results">' in page and '<table id="runs">' in page
    assert "<td>0.625 ± 1.588</td>" in page and "&lt;img src=x" in page  # the escaped run name stays text

    shot = tmp_path / "shot.png"
    result = chromium([f"--screenshot={shot}", "--window-size=1100,2400", "--virtual-time-budget=5000", url],
                      tmp_path / "profile-shot")
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (2400, 1100) and pixels.std() > 0.05  # not a blank page
