"""report.html in a real browser (Debian's Chromium, headless): it renders, every plot loads, nothing goes to
the console. scripts/install.sh installs Chromium with the test extra; without it this test fails, naming how."""

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.integration.harness.test_sweep import SMALL, kvbench

# Appended to a copy of the page: records script errors, console.error and failed resources, then, once the
# page has loaded, writes what it found into the DOM that --dump-dom prints.
PROBE = """<script>
window.__errs = [];
window.addEventListener("error", e => window.__errs.push(String(e.message || (e.target && e.target.src))), true);
const ce = console.error; console.error = (...a) => { window.__errs.push(a.join(" ")); ce(...a); };
window.addEventListener("load", () => {
  const imgs = [...document.images];
  document.body.setAttribute("data-check", JSON.stringify({
    imgs: imgs.length, loaded: imgs.filter(i => i.complete && i.naturalWidth > 0).length,
    errs: window.__errs, h1: document.querySelectorAll("h1").length, h2: document.querySelectorAll("h2").length,
    tables: document.querySelectorAll("table").length, text: document.body.innerText.length}));
});
</script>"""


def browser_check(page: Path, tmp: Path) -> dict:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "the report's browser test needs Chromium: bash scripts/install.sh test (as root) or apt-get install chromium"
    probe = tmp / f"probe-{page.name}"
    probe.write_text(page.read_text().replace("<body>", "<body>" + PROBE, 1))
    r = subprocess.run([chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                        "--v=0", "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
                       capture_output=True, text=True, timeout=120)
    m = re.search(r'data-check="([^"]*)"', r.stdout)
    assert m, f"the page did not finish loading in Chromium: {r.stderr[-500:]}"
    out = json.loads(html.unescape(m.group(1)))
    out["console"] = [ln for ln in r.stderr.splitlines() if ":CONSOLE" in ln]  # what the page logged
    return out


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("browser")
    d = tmp / "sweep"
    r = kvbench(tmp, "run", "-m", "allocator=naive,pooled", f"hydra.sweep.dir={d}", *SMALL)
    assert r.returncode == 0, r.stderr
    return d


def test_the_report_renders_with_every_plot_and_no_console_errors(sweep, tmp_path):
    c = browser_check(sweep / "report.html", tmp_path)
    assert c["h1"] == 1 and c["h2"] >= 4 and c["tables"] >= 1 and c["text"] > 500
    assert c["imgs"] >= 2 and c["loaded"] == c["imgs"], c
    assert c["errs"] == [] and c["console"] == [], c


def test_the_check_sees_a_broken_image_and_a_console_error(tmp_path):
    """The probe can fail: a page with an image that does not decode and a script that logs an error."""
    page = tmp_path / "bad.html"
    page.write_text("<!doctype html><html><head><meta charset='utf-8'></head><body><h1>x</h1>"
                    "<img src='data:image/png;base64,AAAA'><script>console.error('boom')</script></body></html>")
    c = browser_check(page, tmp_path)
    assert c["imgs"] == 1 and c["loaded"] == 0 and "boom" in " ".join(c["errs"])
