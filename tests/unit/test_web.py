"""The web demo (``dalle_flax.web``): page, health, JSON API, dalle-mini contract, errors, CLI."""

import base64
import io
import json
import re
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dalle_flax
from dalle_flax import cli, web

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "fixtures" / "tiny-dalle-mini"
# One request shape for every generation below (new image counts or top_k values recompile).
REQUEST = {"prompt": "a red fox in the snow", "num_images": 2, "seed": 7, "guidance_scale": 3.0,
           "temperature": 0.9, "top_p": 0.95}


@pytest.fixture(scope="module")
def pipe(jax_cache):
  pipe = dalle_flax.pipeline("text-to-image", model=TINY)
  pipe.set_progress_bar_config(disable=True)
  return pipe


def _start(pipe_like):
  server = web.make_server(pipe_like, "127.0.0.1", 0)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  return server, thread


def _stop(server, thread):
  server.shutdown()
  server.server_close()
  thread.join(10)


@pytest.fixture(scope="module")
def url(pipe):
  server, thread = _start(pipe)
  yield server.url
  _stop(server, thread)


def request(url, path, body=None, method=None):
  """(status, headers, body bytes) of one request; a dict body is sent as JSON."""
  data = json.dumps(body).encode() if isinstance(body, dict) else body
  req = urllib.request.Request(url + path.lstrip("/"), data=data, method=method,
                               headers={"Content-Type": "application/json"} if data else {})
  try:
    with urllib.request.urlopen(req, timeout=120) as response:
      return response.status, response.headers, response.read()
  except urllib.error.HTTPError as error:
    return error.code, error.headers, error.read()


def post_json(url, path, body):
  status, _, raw = request(url, path, body)
  return status, json.loads(raw)


def decode(images):
  return [Image.open(io.BytesIO(base64.b64decode(b64, validate=True))) for b64 in images]


def test_page_is_the_self_contained_form(url):
  status, headers, raw = request(url, "/")
  page = raw.decode("utf-8")
  assert status == 200 and headers["Content-Type"].startswith("text/html")
  assert "<form" in page and 'type="submit"' in page and "/api/generate" in page
  for field in ("prompt", "num_images", "seed", "guidance_scale", "temperature", "top_k"):
    assert f'name="{field}"' in page, field
  assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # no CDN, no external asset
  assert "@import" not in page and "fetch(\"http" not in page


def test_page_ships_as_package_data():
  from importlib import resources

  page = (resources.files("dalle_flax.web") / "static" / "index.html").read_text("utf-8")
  assert 'id="generate-form"' in page


def test_health(url):
  status, headers, raw = request(url, "/health")
  assert status == 200 and headers["Content-Type"] == "application/json"
  assert json.loads(raw) == {"status": "ok", "model": str(TINY), "image_size": [64, 64],
                             "max_images": 16, "busy": False}


def test_api_generate_returns_pngs_and_seeds_reproducibly(url):
  status, out = post_json(url, "/api/generate", REQUEST)
  assert status == 200, out
  assert set(out) == {"images", "seeds", "elapsed_s"}
  assert len(out["images"]) == 2 and out["seeds"][0] == 7 and len(set(out["seeds"])) == 2
  assert isinstance(out["elapsed_s"], float) and out["elapsed_s"] > 0
  images = decode(out["images"])
  assert all(im.format == "PNG" and im.size == (64, 64) and im.mode == "RGB" for im in images)
  assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))
  again = post_json(url, "/api/generate", REQUEST)[1]
  assert again["images"] == out["images"] and again["seeds"] == out["seeds"]  # same PNG bytes
  other = post_json(url, "/api/generate", {**REQUEST, "seed": 8})[1]
  assert other["seeds"][0] == 8 and other["images"] != out["images"]


def test_dalle_mini_backend_contract(url):
  """The original front-ends POST {"prompt"} to /generate and GET /version."""
  status, out = post_json(url, "/generate", {"prompt": "sunset over a lake"})
  assert status == 200, out
  assert set(out) == {"images", "version"} and out["version"] == str(TINY)
  assert len(out["images"]) == web.LEGACY_NUM_IMAGES
  assert all(im.size == (64, 64) for im in decode(out["images"]))
  assert json.loads(request(url, "/version")[2]) == {"version": str(TINY)}


@pytest.mark.parametrize("body, message", [
    (b"{not json", "expected a JSON object, got invalid JSON"),
    (b"", "expected a JSON object, got invalid JSON"),
    (b"[1, 2]", "expected a JSON object, got [1, 2] (array)"),
    ({}, "prompt: expected a non-empty string, got no prompt field"),
    ({"prompt": 3}, "prompt: expected a non-empty string, got 3 (integer)"),
    ({"prompt": "  "}, "prompt: expected a non-empty string"),
    ({"prompt": "x", "num_images": 17},
     "num_images: expected an integer in [1, 16] or null, got 17"),
    ({"prompt": "x", "num_images": 0}, "num_images: expected an integer in [1, 16]"),
    ({"prompt": "x", "num_images": True}, "got true (boolean)"),
    ({"prompt": "x", "num_images": "2"},
     'num_images: expected an integer in [1, 16] or null, got "2" (string)'),
    ({"prompt": "x", "seed": -1}, "seed: expected an integer in [0, 2**32)"),
    ({"prompt": "x", "seed": 2**32}, "seed: expected an integer in [0, 2**32)"),
    ({"prompt": "x", "seed": 1.5}, "got 1.5 (number)"),
    ({"prompt": "x", "guidance_scale": "high"}, "guidance_scale: expected a finite number"),
    (b'{"prompt": "x", "guidance_scale": NaN}',
     "guidance_scale: expected a finite number or null, got NaN"),
    ({"prompt": "x", "temperature": 0}, "temperature: expected a finite number > 0"),
    ({"prompt": "x", "top_k": -1}, "top_k: expected an integer in [0, 64]"),
    ({"prompt": "x", "top_k": 65}, "top_k: expected an integer in [0, 64]"),
    ({"prompt": "x", "top_p": 1.5}, "top_p: expected a number in (0, 1]"),
    ({"prompt": "x", "steps": 3}, "unknown field(s) ['steps']: expected only ['prompt'"),
])
@pytest.mark.parametrize("path", ["/api/generate", "/generate"])
def test_bad_requests_get_400_naming_expected_and_got(url, path, body, message):
  status, headers, raw = request(url, path, body, method="POST")
  assert status == 400 and headers["Content-Type"] == "application/json"
  assert message in json.loads(raw)["error"]


def test_unknown_routes_404_and_wrong_methods_405(url):
  for method, path in (("GET", "/nope"), ("POST", "/nope"), ("GET", "/api/generate/x")):
    status, _, raw = request(url, path, b"{}" if method == "POST" else None, method=method)
    assert status == 404 and "no route" in json.loads(raw)["error"]
  status, headers, raw = request(url, "/api/generate")
  assert (status, headers["Allow"]) == (405, "POST")
  assert json.loads(raw)["error"] == "/api/generate: expected POST, got GET"


def test_body_size_limit(url):
  status, _, raw = request(url, "/api/generate", b" " * (web.MAX_BODY_BYTES + 1), method="POST")
  assert status == 413
  limit = web.MAX_BODY_BYTES
  assert f"at most {limit} bytes, got {limit + 1}" in json.loads(raw)["error"]
  status, _, _ = request(url, "/api/generate", b" " * web.MAX_BODY_BYTES, method="POST")
  assert status == 400  # exactly the limit is read (and is not JSON)


class SlowRecordingPipe:
  """Wraps the pipeline: records each call's arguments and how many calls overlap."""

  def __init__(self, pipe):
    self.pipe, self.calls, self.active, self.most_active = pipe, [], 0, 0
    self._count = threading.Lock()

  def __getattr__(self, name):
    return getattr(self.pipe, name)

  def __call__(self, prompt, **kwargs):
    with self._count:
      self.calls.append((prompt, kwargs))
      self.active += 1
      self.most_active = max(self.most_active, self.active)
    try:
      time.sleep(0.3)
      return self.pipe(prompt, **kwargs)
    finally:
      with self._count:
        self.active -= 1


def test_one_generation_at_a_time_with_the_requested_settings(pipe):
  recorder = SlowRecordingPipe(pipe)
  server, thread = _start(recorder)
  try:
    results = []
    post = lambda: results.append(post_json(server.url, "/api/generate", REQUEST))  # noqa: E731
    workers = [threading.Thread(target=post) for _ in range(2)]
    for worker in workers:
      worker.start()
    for worker in workers:
      worker.join(120)
    assert [status for status, _ in results] == [200, 200]
    assert results[0][1]["images"] == results[1][1]["images"]
    assert recorder.most_active == 1 and len(recorder.calls) == 2
    expected = {"num_images_per_prompt": 2, "seed": 7, "guidance_scale": 3.0, "temperature": 0.9,
                "top_k": None, "top_p": 0.95, "return_dict": True}
    assert recorder.calls[0] == (REQUEST["prompt"], expected)
  finally:
    _stop(server, thread)


class FailingPipe(SlowRecordingPipe):
  def __call__(self, prompt, **kwargs):
    raise RuntimeError("out of memory")


def test_failed_generation_answers_500_and_the_server_lives_on(pipe):
  server, thread = _start(FailingPipe(pipe))
  try:
    status, out = post_json(server.url, "/api/generate", {"prompt": "a fox"})
    assert (status, out) == (500, {"error": "RuntimeError: out of memory"})
    status, _, raw = request(server.url, "/health")
    assert status == 200 and json.loads(raw)["busy"] is False  # the lock was released
  finally:
    _stop(server, thread)


def test_serve_returns_on_ctrl_c_and_closes_the_socket(pipe, monkeypatch):
  def interrupted(self, poll_interval=0.5):
    raise KeyboardInterrupt

  monkeypatch.setattr(web.DemoServer, "serve_forever", interrupted)
  urls = []
  web.serve(pipe, "127.0.0.1", 0, on_ready=urls.append)
  assert len(urls) == 1 and re.fullmatch(r"http://127\.0\.0\.1:\d+/", urls[0])
  with pytest.raises(urllib.error.URLError):
    urllib.request.urlopen(urls[0] + "health", timeout=5)


def test_cli_serve_help_lists_the_flags(capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["serve", "--help"])
  assert exit_info.value.code == 0
  text = capsys.readouterr().out
  for flag in ("--model", "--vqgan", "--revision", "--dtype", "--host", "--port"):
    assert flag in text, flag
  assert "127.0.0.1" in text and "8000" in text


def test_cli_serve_loads_the_model_and_prints_the_url(monkeypatch, capsys):
  served = []

  def fake_serve(pipe, host, port, *, on_ready):  # the real server, answering one request
    server, thread = _start(pipe)
    try:
      on_ready(server.url)
      served.append((host, port, json.loads(request(server.url, "/health")[2])))
    finally:
      _stop(server, thread)

  monkeypatch.setattr(web, "serve", fake_serve)
  assert cli.main(["serve", "--model", str(TINY), "--port", "0"]) == 0
  out = capsys.readouterr().out.splitlines()
  assert len(out) == 1 and re.fullmatch(r"http://127\.0\.0\.1:\d+/", out[0])
  assert served[0][:2] == ("127.0.0.1", 0) and served[0][2]["model"] == str(TINY)


def test_cli_serve_errors_exit_1_or_2(tmp_path, capsys):
  assert cli.main(["serve", "--model", str(tmp_path / "nope")]) == 1
  err = capsys.readouterr().err
  assert err.startswith("dalle-flax: error:") and "nope" in err
  assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["serve", "--port", "70000"])
  assert exit_info.value.code == 2
  assert "--port: expected an integer in [0, 65535], got '70000'" in capsys.readouterr().err


def test_defaults_come_from_the_model_generation_config(tmp_path, pipe):
  import shutil

  folder = tmp_path / "guided"
  shutil.copytree(TINY, folder)
  config_path = folder / "generation_config.json"
  config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "guidance_scale": 3.0}))
  guided = dalle_flax.pipeline("text-to-image", model=folder)
  guided.set_progress_bar_config(disable=True)
  server, thread = _start(guided)
  try:
    body = {k: v for k, v in REQUEST.items() if k != "guidance_scale"}
    status, reply = post_json(server.url, "/api/generate", body)
  finally:
    _stop(server, thread)
  assert status == 200, reply
  got = [np.asarray(image) for image in decode(reply["images"])]
  kwargs = dict(num_images_per_prompt=2, seed=7, temperature=0.9, top_p=0.95)
  expected = pipe(REQUEST["prompt"], guidance_scale=3.0, **kwargs)
  np.testing.assert_array_equal(got, [np.asarray(image) for image in expected])
  unguided = pipe(REQUEST["prompt"], **kwargs)
  assert any((g != np.asarray(u)).any() for g, u in zip(got, unguided))
