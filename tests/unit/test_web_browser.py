"""The demo page in a real browser: Debian's Chromium driven by Playwright for Python.

``dalle-flax serve --port 0`` runs in a subprocess with the default (bundled) model, as a user
starts it; the test types a prompt, sees previews before the final images, reads the seeds,
downloads an image, reuses a seed and saves a screenshot (``$DALLE_FLAX_ARTIFACTS`` or
``test-artifacts/`` in the checkout). Skipped when Playwright or Chromium is missing, except
under CI=true (``.ci/run`` installs both), where that is a failure.
"""

import base64
import io
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("DALLE_FLAX_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("DALLE_FLAX_ARTIFACTS", REPO / "test-artifacts"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _require(what, ok, fix):
  if ok:
    return
  if os.environ.get("CI") == "true":
    pytest.fail(f"CI is set but {what} is missing: {fix}")
  pytest.skip(f"{what} is missing: {fix}")


@pytest.fixture(scope="module")
def server_url():
  """``dalle-flax serve --port 0`` in a subprocess; its URL once /health answers."""
  pytest.importorskip("fastapi", reason="the [web] extra is not installed")
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
  process = subprocess.Popen(
      [sys.executable, "-c", "import sys; from dalle_flax.cli import main; sys.exit(main())",
       "serve", "--port", "0", "--progress-every", "2", "--max-queue", "2"],
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
  try:
    url, lines, deadline = None, [], time.monotonic() + 240
    while url is None and time.monotonic() < deadline:
      line = process.stdout.readline()
      if not line:
        break
      lines.append(line)
      if re.fullmatch(r"http://127\.0\.0\.1:\d+/\n", line):
        url = line.strip()
    assert url, "dalle-flax serve printed no URL:\n" + "".join(lines)
    with urllib.request.urlopen(url + "health", timeout=30) as reply:
      assert reply.status == 200
    yield url
  finally:
    process.terminate()
    try:
      process.wait(30)
    except subprocess.TimeoutExpired:
      process.kill()


@pytest.fixture(scope="module")
def browser():
  _require("Playwright for Python", _importable("playwright.sync_api"), "pip install playwright")
  _require("Chromium", Path(CHROMIUM).exists(), "apt-get install -y chromium (or set DALLE_FLAX_CHROMIUM)")
  from playwright.sync_api import sync_playwright

  with sync_playwright() as playwright:
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    yield browser
    browser.close()


def _importable(name):
  try:
    __import__(name)
  except ImportError:
    return False
  return True


# Records, in the page, the order in which the preview and the final images appear.
TIMELINE = """
window.__timeline = [];
document.addEventListener("DOMContentLoaded", () => {
  new MutationObserver(() => window.__timeline.push("preview")).observe(
      document.getElementById("preview"), {attributes: true, attributeFilter: ["src"]});
  new MutationObserver(() => window.__timeline.push("images")).observe(
      document.getElementById("gallery"), {childList: true});
});
"""


def _png(data_url):
  assert data_url.startswith("data:image/png;base64,")
  return Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1])))


def test_the_page_generates_streams_previews_downloads_and_reuses_a_seed(server_url, browser, tmp_path):
  context = browser.new_context(accept_downloads=True, viewport={"width": 1100, "height": 900})
  page = context.new_page()
  page.add_init_script(TIMELINE)
  errors = []
  page.on("pageerror", lambda error: errors.append(str(error)))
  page.goto(server_url)
  page.wait_for_selector("body[data-ready=true]", timeout=30_000)
  options = page.locator("#model option")
  assert options.count() >= 1 and page.input_value("#model")  # the served model is selected

  prompt = "a green triangle on a white background"
  page.fill("#prompt", prompt)
  page.fill("#num_images", "4")
  page.click("#generate")
  page.wait_for_function("document.querySelectorAll('#gallery figure').length === 4", timeout=180_000)
  timeline = page.evaluate("window.__timeline")
  assert "preview" in timeline and timeline.index("preview") < timeline.index("images"), timeline
  assert re.fullmatch(r"Done: 4 image\(s\) in \d+\.\d s", page.inner_text("#status"))
  assert page.get_attribute("#progress", "value") == page.get_attribute("#progress", "max")

  figures = page.locator("#gallery figure")
  seeds = [int(figures.nth(i).get_attribute("data-seed")) for i in range(4)]
  assert len(set(seeds)) == 4
  assert [figures.nth(i).locator(".seed-button").inner_text() for i in range(4)] == [f"seed {s}" for s in seeds]
  sources = [figures.nth(i).locator("img").get_attribute("src") for i in range(4)]
  assert all(_png(src).mode == "RGB" for src in sources)

  ARTIFACTS.mkdir(parents=True, exist_ok=True)
  page.screenshot(path=str(ARTIFACTS / "web-demo.png"), full_page=True)

  with page.expect_download() as download_info:  # one image
    figures.nth(1).locator("a.download").click()
  download = download_info.value
  assert download.suggested_filename == f"a-green-triangle-on-a-white-background_{seeds[1]}.png"
  saved = tmp_path / download.suggested_filename
  download.save_as(saved)
  assert saved.read_bytes() == base64.b64decode(sources[1].split(",", 1)[1])
  with page.expect_download() as download_info:  # the grid
    page.click("#download-grid")
  grid = tmp_path / "grid.png"
  download_info.value.save_as(grid)
  one = _png(sources[0]).size
  assert Image.open(grid).size == (2 * one[0], 2 * one[1])  # 4 images: a 2x2 grid

  # clicking a seed sets it (fixed, one image); generating again makes that image again
  figures.nth(2).locator(".seed-button").click()
  assert page.input_value("#seed") == str(seeds[2]) and page.input_value("#num_images") == "1"
  assert not page.is_checked("#random_seed")
  page.click("#generate")
  page.wait_for_function("document.querySelectorAll('#gallery figure').length === 1", timeout=120_000)
  again = page.locator("#gallery figure").first
  assert again.get_attribute("data-seed") == str(seeds[2])
  assert again.locator("img").get_attribute("src") == sources[2]

  # a value the server refuses is shown with the field named (the browser's own range check,
  # which would stop it first, is lifted here to reach the server's)
  page.evaluate("document.getElementById('temperature').removeAttribute('max')")
  page.fill("#temperature", "1000")
  page.click("#generate")
  page.wait_for_selector("#status.error", timeout=30_000)
  assert "temperature" in page.inner_text("#status")
  assert not errors, errors
  context.close()
