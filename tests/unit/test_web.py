"""The web demo (``dalle_flax.web``): FastAPI routes, SSE streaming, the queue, loopback HTTP, CLI.

Two kinds of pipeline: the real tiny fixture (PNG bytes, seeds, the generation-config defaults)
and ``FakePipe`` (no JAX: it walks the pipeline's step-callback protocol under the test's control,
so queue order, 429, cancellation and errors are tested without timing races).
"""

import base64
import io
import json
import logging
import re
import shutil
import socket
import threading
import time
import types
import urllib.error
import urllib.request
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

fastapi = pytest.importorskip("fastapi", reason="the [web] extra is not installed")
from fastapi.testclient import TestClient  # noqa: E402

import dalle_flax  # noqa: E402
from dalle_flax import cli, web  # noqa: E402
from dalle_flax.web.jobs import GenerationQueue  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "fixtures" / "tiny-dalle-mini"
# One request shape for every real generation below (new image counts or top_k values recompile).
REQUEST = {"prompt": "a red fox in the snow", "num_images": 2, "seed": 7, "guidance_scale": 3.0,
           "temperature": 0.9, "top_p": 0.95}


@pytest.fixture(scope="module")
def pipe(jax_cache):
  pipe = dalle_flax.pipeline("text-to-image", model=TINY)
  pipe.set_progress_bar_config(disable=True)
  return pipe


@pytest.fixture(scope="module")
def client(pipe):
  with TestClient(web.create_app(pipe, progress_every=16)) as client:
    yield client


def decode(images):
  return [Image.open(io.BytesIO(base64.b64decode(b64, validate=True))) for b64 in images]


def parse_sse(text):
  """[(event, data dict)] of a text/event-stream body."""
  events = []
  for block in text.replace("\r\n", "\n").strip().split("\n\n"):
    fields = dict(line.split(": ", 1) for line in block.split("\n"))
    events.append((fields["event"], json.loads(fields["data"])))
  return events


class FakePipe:
  """Stands in for the pipeline: same attributes the server reads, the same step-callback calls.

  ``gate``: when given, every step waits for it (the test opens it); ``fail``: raised at step 1.
  Records each call's kwargs, how many calls overlapped, and whether a call was cancelled.
  """

  def __init__(self, name="fake", length=16, side=8, vocab=64, gate=None, fail=None, step_delay=0.0):
    text_config = types.SimpleNamespace(image_length=length, image_vocab_size=vocab)
    generation = types.SimpleNamespace(guidance_scale=3.0, temperature=1.0, top_k=32, top_p=None)
    self.model = types.SimpleNamespace(
        config=types.SimpleNamespace(text_config=text_config), name_or_path=name, generation_config=generation,
        vqgan=types.SimpleNamespace(config=types.SimpleNamespace(downsample_factor=side // int(length ** 0.5))))
    self.length, self.side, self.gate, self.fail, self.step_delay = length, side, gate, fail, step_delay
    self.calls, self.cancelled, self.active, self.most_active = [], [], 0, 0
    self.started = threading.Event()
    self._lock = threading.Lock()

  def __call__(self, prompt, *, return_dict, callback_on_step_end, callback_steps,
               callback_on_step_end_tensor_inputs, num_images_per_prompt=1, seed=None, **kwargs):
    assert return_dict and tuple(callback_on_step_end_tensor_inputs) == ("preview",)
    with self._lock:
      self.calls.append({"prompt": prompt, "num_images_per_prompt": num_images_per_prompt, "seed": seed,
                         "callback_steps": callback_steps, **kwargs})
      self.active += 1
      self.most_active = max(self.most_active, self.active)
    self.started.set()
    try:
      n = num_images_per_prompt
      for step in range(callback_steps, self.length + 1, callback_steps):
        if self.gate is not None:
          assert self.gate.wait(30), "the test never opened the gate"
        time.sleep(self.step_delay)
        if self.fail is not None:
          raise self.fail
        shade = 255 * step // self.length
        previews = [Image.new("RGB", (self.side, self.side), (shade, i, 0)) for i in range(n)]
        try:
          callback_on_step_end(self, step, {"image_indices": list(range(n)), "preview": previews})
        except web.Cancelled:
          self.cancelled.append(prompt)
          raise
      base = 0 if seed is None else seed
      images = [Image.new("RGB", (self.side, self.side), (255, i, base % 256)) for i in range(n)]
      return types.SimpleNamespace(images=images, seeds=[base + i for i in range(n)])
    finally:
      with self._lock:
        self.active -= 1


# --- the page -----------------------------------------------------------------------------------------
def test_page_and_its_assets_are_local_with_every_control(client):
  page = client.get("/")
  assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
  html = page.text
  for control in ("prompt", "num_images", "seed", "random_seed", "guidance_scale", "temperature", "top_k",
                  "top_p", "model", "progress", "preview", "gallery", "download-grid"):
    assert f'id="{control}"' in html, control
  script, style = client.get("/static/app.js"), client.get("/static/style.css")
  assert script.status_code == 200 and "javascript" in script.headers["content-type"]
  assert style.status_code == 200 and style.headers["content-type"].startswith("text/css")
  assert "/api/generate/stream" in script.text and "/api/models" in script.text
  for text in (html, script.text, style.text):  # no CDN, no external asset, no build step
    assert not re.search(r"""(src|href|url)\s*[=(]\s*["']?(https?:)?//""", text)
    assert "@import" not in text and "http://" not in text and "https://" not in text


def test_page_ships_as_package_data():
  static = resources.files("dalle_flax.web") / "static"
  assert 'src="/static/app.js"' in (static / "index.html").read_text("utf-8")
  assert (static / "app.js").read_text("utf-8") and (static / "style.css").read_text("utf-8")


def test_openapi_docs_show_the_request_model(client):
  assert client.get("/docs").status_code == 200
  spec = client.get("/openapi.json").json()
  for path in ("/health", "/version", "/api/models", "/api/generate", "/api/generate/stream", "/generate"):
    assert path in spec["paths"], path
  fields = spec["components"]["schemas"]["GenerateRequest"]["properties"]
  assert set(fields) == {"prompt", "num_images", "seed", "guidance_scale", "temperature", "top_k", "top_p",
                         "model", "progress_every"}


# --- information routes -----------------------------------------------------------------------------
def test_health_version_and_models(client, pipe):
  health = client.get("/health").json()
  assert health == {"status": "ok", "model": str(TINY), "models": [str(TINY)], "image_size": [64, 64],
                    "max_images": web.MAX_IMAGES, "busy": False, "waiting": 0, "max_queue": 8}
  assert client.get("/version").json() == {"version": str(TINY)}
  (info,) = client.get("/api/models").json()
  generation = pipe.model.generation_config
  assert info == {"name": str(TINY), "image_size": [64, 64], "image_vocab_size": 64,
                  "defaults": {"guidance_scale": generation.guidance_scale, "temperature": generation.temperature,
                               "top_k": generation.top_k, "top_p": generation.top_p}}


def test_several_models_are_listed_in_order_and_selected_by_name():
  first, second = FakePipe("first", vocab=64), FakePipe("second", vocab=128)
  with TestClient(web.create_app({"first": first, "second": second})) as client:
    assert [m["name"] for m in client.get("/api/models").json()] == ["first", "second"]
    assert client.get("/health").json()["model"] == "first"
    assert client.post("/api/generate", json={"prompt": "a", "model": "second", "seed": 3}).json()["model"] == "second"
    assert client.post("/api/generate", json={"prompt": "b", "seed": 3}).json()["model"] == "first"
    assert [c["prompt"] for c in second.calls] == ["a"] and [c["prompt"] for c in first.calls] == ["b"]
    # top_k is bounded by the chosen model's vocabulary: 100 is fine for "second", not for "first"
    assert client.post("/api/generate", json={"prompt": "c", "model": "second", "top_k": 100}).status_code == 200
    bad = client.post("/api/generate", json={"prompt": "c", "model": "first", "top_k": 100})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "top_k"]
    unknown = client.post("/api/generate", json={"prompt": "c", "model": "third"})
    assert unknown.status_code == 422 and unknown.json()["detail"][0]["loc"] == ["body", "model"]
    assert "expected one of ['first', 'second'], got 'third'" in unknown.json()["detail"][0]["msg"]


# --- generation ---------------------------------------------------------------------------------------
def test_api_generate_returns_pngs_and_seeds_reproducibly(client):
  out = client.post("/api/generate", json=REQUEST)
  assert out.status_code == 200, out.text
  out = out.json()
  assert set(out) == {"images", "seeds", "elapsed_s", "model"} and out["model"] == str(TINY)
  assert len(out["images"]) == 2 and out["seeds"][0] == 7 and len(set(out["seeds"])) == 2
  assert isinstance(out["elapsed_s"], float) and out["elapsed_s"] > 0
  images = decode(out["images"])
  assert all(im.format == "PNG" and im.size == (64, 64) and im.mode == "RGB" for im in images)
  assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))
  again = client.post("/api/generate", json=REQUEST).json()
  assert again["images"] == out["images"] and again["seeds"] == out["seeds"]  # same PNG bytes
  other = client.post("/api/generate", json={**REQUEST, "seed": 8}).json()
  assert other["seeds"][0] == 8 and other["images"] != out["images"]
  # image 1 alone from its reported seed (what clicking a seed on the page does)
  alone = client.post("/api/generate", json={**REQUEST, "num_images": 1, "seed": out["seeds"][1]}).json()
  np.testing.assert_array_equal(np.asarray(decode(alone["images"])[0]), np.asarray(images[1]))


def test_every_knob_reaches_the_pipeline():
  fake = FakePipe()
  with TestClient(web.create_app(fake, progress_every=4)) as client:
    body = {"prompt": "p", "num_images": 3, "seed": 11, "guidance_scale": 2.5, "temperature": 0.7, "top_k": 5,
            "top_p": 0.9}
    assert client.post("/api/generate", json=body).status_code == 200
    assert client.post("/api/generate", json={"prompt": "q"}).status_code == 200
    assert client.post("/api/generate/stream", json={"prompt": "r", "progress_every": 8}).status_code == 200
  assert fake.calls[0] == {"prompt": "p", "num_images_per_prompt": 3, "seed": 11, "guidance_scale": 2.5,
                           "temperature": 0.7, "top_k": 5, "top_p": 0.9, "callback_steps": 4}
  assert fake.calls[1] == {"prompt": "q", "num_images_per_prompt": 1, "seed": None, "guidance_scale": None,
                           "temperature": None, "top_k": None, "top_p": None, "callback_steps": 4}
  assert fake.calls[2]["callback_steps"] == 8  # the request's progress_every


def test_defaults_come_from_the_model_generation_config(tmp_path, pipe):
  folder = tmp_path / "guided"
  shutil.copytree(TINY, folder)
  config_path = folder / "generation_config.json"
  config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "guidance_scale": 3.0}))
  guided = dalle_flax.pipeline("text-to-image", model=folder)
  guided.set_progress_bar_config(disable=True)
  body = {k: v for k, v in REQUEST.items() if k != "guidance_scale"}
  with TestClient(web.create_app(guided)) as client:
    reply = client.post("/api/generate", json=body)
    assert reply.status_code == 200, reply.text
    assert client.get("/api/models").json()[0]["defaults"]["guidance_scale"] == 3.0
  got = [np.asarray(image) for image in decode(reply.json()["images"])]
  kwargs = dict(num_images_per_prompt=2, seed=7, temperature=0.9, top_p=0.95)
  expected = pipe(REQUEST["prompt"], guidance_scale=3.0, **kwargs)
  np.testing.assert_array_equal(got, [np.asarray(image) for image in expected])
  unguided = pipe(REQUEST["prompt"], **kwargs)
  assert any((g != np.asarray(u)).any() for g, u in zip(got, unguided))


def test_dalle_mini_backend_contract(client):
  """The original front-ends POST {"prompt"} to /generate and GET /version."""
  out = client.post("/generate", json={"prompt": "sunset over a lake"})
  assert out.status_code == 200, out.text
  out = out.json()
  assert set(out) == {"images", "version"} and out["version"] == str(TINY)
  assert len(out["images"]) == web.LEGACY_NUM_IMAGES == 9
  assert all(im.size == (64, 64) and im.format == "PNG" for im in decode(out["images"]))


# --- streaming ----------------------------------------------------------------------------------------
def test_stream_events_order_and_payloads(client):
  reply = client.post("/api/generate/stream", json={**REQUEST, "progress_every": 4})
  assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
  events = parse_sse(reply.text)
  names = [name for name, _ in events]
  assert names[0] == "queued" and names[-1] == "done" and set(names[1:-1]) == {"progress"}
  assert events[0][1] == {"position": 1, "eta_s": events[0][1]["eta_s"]}
  progress = [data for name, data in events if name == "progress"]
  total = 2 * 16  # two images of a 4x4 code grid
  # every 4 tokens of each image; both images sample together, so the tokens done grow by 2 * 4
  assert [p["step"] for p in progress] == list(range(0, total + 1, 2 * 4)) and {p["total"] for p in progress} == {total}
  previews = [decode([p["preview"]])[0] for p in progress]
  assert all(im.size == (128, 64) for im in previews)  # a 1x2 grid of 64x64 previews
  assert np.all(np.asarray(previews[0]) == 128)  # step 0: gray, nothing sampled yet
  assert not np.array_equal(np.asarray(previews[1]), np.asarray(previews[-1]))  # sharpening
  done = events[-1][1]
  assert set(done) == {"images", "grid", "seeds", "elapsed_s", "model"}
  plain = client.post("/api/generate", json=REQUEST).json()
  assert done["images"] == plain["images"] and done["seeds"] == plain["seeds"] == [7, plain["seeds"][1]]
  np.testing.assert_array_equal(np.asarray(previews[-1]), np.asarray(decode([done["grid"]])[0]))


def test_failed_generation_streams_an_error_answers_500_and_the_server_lives_on():
  fake = FakePipe(fail=RuntimeError("out of memory"))
  with TestClient(web.create_app(fake, progress_every=4)) as client:
    events = parse_sse(client.post("/api/generate/stream", json={"prompt": "x"}).text)
    assert [name for name, _ in events] == ["queued", "progress", "error"]
    assert events[-1][1] == {"error": "RuntimeError: out of memory"}
    reply = client.post("/api/generate", json={"prompt": "x"})
    assert (reply.status_code, reply.json()) == (500, {"detail": "RuntimeError: out of memory"})
    fake.fail = None
    assert client.post("/api/generate", json={"prompt": "x"}).status_code == 200
    assert client.get("/health").json()["busy"] is False


# --- validation -------------------------------------------------------------------------------------
@pytest.mark.parametrize("body, field", [
    ({}, "prompt"), ({"prompt": 3}, "prompt"), ({"prompt": ""}, "prompt"), ({"prompt": "   "}, "prompt"),
    ({"prompt": "x" * 1001}, "prompt"),
    ({"prompt": "x", "num_images": 17}, "num_images"), ({"prompt": "x", "num_images": 0}, "num_images"),
    ({"prompt": "x", "num_images": True}, "num_images"), ({"prompt": "x", "num_images": "2"}, "num_images"),
    ({"prompt": "x", "num_images": 2.0}, "num_images"),
    ({"prompt": "x", "seed": -1}, "seed"), ({"prompt": "x", "seed": 2**32}, "seed"),
    ({"prompt": "x", "seed": 1.5}, "seed"),
    ({"prompt": "x", "guidance_scale": "high"}, "guidance_scale"), ({"prompt": "x", "guidance_scale": -1}, "guidance_scale"),
    ({"prompt": "x", "guidance_scale": 101}, "guidance_scale"),
    ({"prompt": "x", "temperature": 0}, "temperature"), ({"prompt": "x", "temperature": 1000}, "temperature"),
    ({"prompt": "x", "top_k": -1}, "top_k"), ({"prompt": "x", "top_k": 65}, "top_k"),
    ({"prompt": "x", "top_p": 0}, "top_p"), ({"prompt": "x", "top_p": 1.5}, "top_p"),
    ({"prompt": "x", "progress_every": 0}, "progress_every"), ({"prompt": "x", "model": "nope"}, "model"),
    ({"prompt": "x", "steps": 3}, "steps"),
])
@pytest.mark.parametrize("path", ["/api/generate", "/api/generate/stream", "/generate"])
def test_bad_fields_get_422_naming_the_field(client, path, body, field):
  reply = client.post(path, json=body)
  assert reply.status_code == 422, reply.text
  assert [error["loc"][-1] for error in reply.json()["detail"]] == [field]


@pytest.mark.parametrize("raw", [b'{"prompt": "x", "guidance_scale": NaN}', b'{"prompt": "x", "top_p": Infinity}'])
def test_non_finite_numbers_get_422(client, raw):
  reply = client.post("/api/generate", content=raw, headers={"content-type": "application/json"})
  assert reply.status_code == 422, reply.text


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", b'"prompt"'])
def test_bodies_that_are_not_a_json_object_get_422(client, raw):
  reply = client.post("/api/generate", content=raw, headers={"content-type": "application/json"})
  assert reply.status_code == 422 and reply.json()["detail"][0]["loc"][0] == "body"


def test_body_size_limit_by_header_and_by_stream(client):
  limit = web.MAX_BODY_BYTES
  reply = client.post("/api/generate", content=b" " * (limit + 1), headers={"content-type": "application/json"})
  assert reply.status_code == 413
  assert f"expected at most {limit} bytes, got {limit + 1}" in reply.json()["detail"]
  chunks = (b" " * 4096 for _ in range(limit // 4096 + 2))  # no Content-Length: counted while read
  reply = client.post("/api/generate", content=chunks, headers={"content-type": "application/json"})
  assert reply.status_code == 413 and "more than" in reply.json()["detail"]
  exactly = client.post("/api/generate", content=b" " * limit, headers={"content-type": "application/json"})
  assert exactly.status_code == 422  # the limit itself is read (and is not JSON)


def test_unknown_routes_404_and_wrong_methods_405(client):
  assert client.get("/nope").status_code == 404
  reply = client.get("/api/generate")
  assert reply.status_code == 405 and reply.headers["allow"] == "POST"


# --- the queue ----------------------------------------------------------------------------------------
def _events(job_events):
  def sink(name, payload):
    job_events.append((name, payload))
  return sink


def test_queue_runs_one_at_a_time_in_order_and_reports_positions():
  gate = threading.Event()
  fake = FakePipe(gate=gate)
  queue = GenerationQueue({"fake": fake}, max_queue=8, progress_every=8)
  try:
    logs = [[] for _ in range(3)]
    jobs = [queue.submit("fake", {"prompt": "p0", "num_images_per_prompt": 1}, _events(logs[0]))]
    assert fake.started.wait(10)
    jobs += [queue.submit("fake", {"prompt": f"p{i}", "num_images_per_prompt": 1}, _events(logs[i]))
             for i in (1, 2)]
    assert queue.status() == {"running": True, "waiting": 2, "max_queue": 8}
    gate.set()
    assert all(job.wait(30) for job in jobs)
  finally:
    queue.close()
  assert [call["prompt"] for call in fake.calls] == ["p0", "p1", "p2"] and fake.most_active == 1
  assert [job.state for job in jobs] == ["done"] * 3
  positions = [[p["position"] for name, p in log if name == "queued"] for log in logs]
  assert positions == [[1], [1], [2, 1]]  # p2 moved up when p1 started
  for log in logs:
    names = [name for name, _ in log]
    assert names[-1] == "done" and names.index("progress") > max(i for i, n in enumerate(names) if n == "queued")


def test_queue_eta_comes_from_the_timed_generations():
  fake = FakePipe(step_delay=0.02)
  queue = GenerationQueue({"fake": fake}, progress_every=4)
  try:
    first = []
    queue.submit("fake", {"prompt": "a", "num_images_per_prompt": 2}, _events(first)).wait(30)
    assert first[0] == ("queued", {"position": 1, "eta_s": None})  # nothing timed yet
    elapsed = first[-1][1]["elapsed_s"]
    second = []
    queue.submit("fake", {"prompt": "b", "num_images_per_prompt": 4}, _events(second)).wait(30)
  finally:
    queue.close()
  eta = second[0][1]["eta_s"]
  assert eta == pytest.approx(elapsed * 2, rel=0.2, abs=0.05)  # per image, times 4 images


def test_full_queue_answers_429_with_retry_after():
  gate = threading.Event()
  fake = FakePipe(gate=gate)
  app = web.create_app(fake, max_queue=1)
  with TestClient(app) as client:
    queue = app.state.queue
    running = queue.submit("fake", {"prompt": "running"}, lambda *a: None)
    assert fake.started.wait(10)
    waiting = queue.submit("fake", {"prompt": "waiting"}, lambda *a: None)
    for path in ("/api/generate", "/api/generate/stream", "/generate"):
      reply = client.post(path, json={"prompt": "one too many"})
      assert reply.status_code == 429, path
      assert int(reply.headers["retry-after"]) >= 1 and "--max-queue 1" in reply.json()["detail"]
    assert client.get("/health").json()["waiting"] == 1
    gate.set()
    assert running.wait(30) and waiting.wait(30)
    assert client.post("/api/generate", json={"prompt": "room now"}).status_code == 200
  assert "one too many" not in [call["prompt"] for call in fake.calls]


def test_cancelled_jobs_leave_the_line_or_stop_at_the_next_chunk():
  gate = threading.Event()
  fake = FakePipe(gate=gate)
  queue = GenerationQueue({"fake": fake}, progress_every=4)
  try:
    running_log, waiting_log = [], []
    running = queue.submit("fake", {"prompt": "running"}, _events(running_log))
    assert fake.started.wait(10)
    waiting = queue.submit("fake", {"prompt": "waiting"}, _events(waiting_log))
    waiting.cancel()
    assert waiting.wait(5) and waiting.state == "cancelled" and queue.status()["waiting"] == 0
    running.cancel()
    gate.set()
    assert running.wait(10) and running.state == "cancelled"
    after = queue.submit("fake", {"prompt": "after"}, lambda *a: None)
    assert after.wait(10) and after.state == "done"
  finally:
    queue.close()
  assert fake.cancelled == ["running"] and [c["prompt"] for c in fake.calls] == ["running", "after"]
  assert [name for name, _ in running_log] == ["queued", "progress"]  # nothing after the cancel
  assert "done" not in [name for name, _ in waiting_log]


# --- real HTTP on loopback ------------------------------------------------------------------------------
def http(url, path, body=None, timeout=60):
  data = json.dumps(body).encode() if body is not None else None
  req = urllib.request.Request(url + path.lstrip("/"), data=data,
                               headers={"Content-Type": "application/json"} if data else {})
  try:
    with urllib.request.urlopen(req, timeout=timeout) as response:
      return response.status, response.headers, response.read()
  except urllib.error.HTTPError as error:
    return error.code, error.headers, error.read()


def test_loopback_server_serves_every_route(pipe):
  with web.make_server(pipe, "127.0.0.1", 0, progress_every=8).start() as server:
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", server.url)
    status, headers, raw = http(server.url, "/")
    assert status == 200 and b'id="generate-form"' in raw
    assert json.loads(http(server.url, "/health")[2])["status"] == "ok"
    assert json.loads(http(server.url, "/version")[2]) == {"version": str(TINY)}
    assert http(server.url, "/api/models")[0] == 200
    status, _, raw = http(server.url, "/api/generate", REQUEST)
    assert status == 200 and json.loads(raw)["seeds"][0] == 7
    status, headers, raw = http(server.url, "/api/generate/stream", REQUEST)
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = parse_sse(raw.decode())
    assert events[0][0] == "queued" and events[-1][0] == "done" and events[-1][1]["images"] == json.loads(
        http(server.url, "/api/generate", REQUEST)[2])["images"]
    assert len(json.loads(http(server.url, "/generate", {"prompt": "a lake"})[2])["images"]) == 9
    status, _, raw = http(server.url, "/api/generate", {"prompt": "x", "num_images": 99})
    assert status == 422 and json.loads(raw)["detail"][0]["loc"] == ["body", "num_images"]
    url = server.url
  with pytest.raises(urllib.error.URLError):  # stopped: the socket is closed
    urllib.request.urlopen(url + "health", timeout=5)


def _open_stream(url, body):
  """A raw HTTP/1.1 POST to /api/generate/stream; returns the socket after the response headers."""
  host, port = url.split("//")[1].rstrip("/").split(":")
  sock = socket.create_connection((host, int(port)), timeout=30)
  payload = json.dumps(body).encode()
  sock.sendall(b"POST /api/generate/stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
  received = b""
  while b"event: queued" not in received:
    chunk = sock.recv(65536)
    assert chunk, received
    received += chunk
  assert received.startswith(b"HTTP/1.1 200")
  return sock


def test_a_client_that_disconnects_is_cancelled_running_or_waiting():
  gate = threading.Event()
  fake = FakePipe(gate=gate)
  with web.make_server(fake, "127.0.0.1", 0, progress_every=4).start() as server:
    queue = server.app.state.queue
    running = _open_stream(server.url, {"prompt": "running"})
    assert fake.started.wait(10)
    waiting = _open_stream(server.url, {"prompt": "waiting"})
    assert queue.status()["waiting"] == 1
    waiting.close()  # leaves the line without ever running
    deadline = time.monotonic() + 10
    while queue.status()["waiting"] and time.monotonic() < deadline:
      time.sleep(0.05)
    assert queue.status()["waiting"] == 0
    running.close()
    time.sleep(1.0)  # the server polls for disconnects every 0.25 s
    gate.set()  # the running job reaches its next chunk and stops there
    deadline = time.monotonic() + 10
    while not fake.cancelled and time.monotonic() < deadline:
      time.sleep(0.05)
    status, _, raw = http(server.url, "/api/generate", {"prompt": "next"})
    assert status == 200
  assert fake.cancelled == ["running"]
  assert [call["prompt"] for call in fake.calls] == ["running", "next"]


def test_a_disconnected_plain_request_is_cancelled_too():
  gate = threading.Event()
  fake = FakePipe(gate=gate)
  with web.make_server(fake, "127.0.0.1", 0, progress_every=4).start() as server:
    host, port = server.url.split("//")[1].rstrip("/").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    payload = b'{"prompt": "gone"}'
    sock.sendall(b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
    assert fake.started.wait(10)
    sock.close()
    time.sleep(1.0)
    gate.set()
    deadline = time.monotonic() + 10
    while not fake.cancelled and time.monotonic() < deadline:
      time.sleep(0.05)
  assert fake.cancelled == ["gone"]


def test_serve_returns_on_ctrl_c_and_closes_the_socket(monkeypatch):
  def interrupted(self):
    raise KeyboardInterrupt

  monkeypatch.setattr(web.DemoServer, "serve_forever", interrupted)
  urls = []
  web.serve(FakePipe(), "127.0.0.1", 0, on_ready=urls.append)
  assert len(urls) == 1 and re.fullmatch(r"http://127\.0\.0\.1:\d+/", urls[0])
  with pytest.raises(urllib.error.URLError):
    urllib.request.urlopen(urls[0] + "health", timeout=5)


def test_binding_beyond_loopback_warns(caplog):
  with caplog.at_level(logging.WARNING, logger="dalle_flax.web"):
    server = web.make_server(FakePipe(), "0.0.0.0", 0)
  server.socket.close()
  assert "not a loopback address" in caplog.text
  with caplog.at_level(logging.WARNING, logger="dalle_flax.web"):
    caplog.clear()
    web.make_server(FakePipe(), "127.0.0.1", 0).socket.close()
  assert "loopback" not in caplog.text


# --- the CLI --------------------------------------------------------------------------------------------
def test_cli_serve_help_lists_the_flags(capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["serve", "--help"])
  assert exit_info.value.code == 0
  text = capsys.readouterr().out
  for flag in ("--model", "--vqgan", "--revision", "--dtype", "--host", "--port", "--max-queue",
               "--progress-every"):
    assert flag in text, flag
  assert "127.0.0.1" in text and "8000" in text


def test_cli_serve_loads_every_model_and_passes_the_knobs(monkeypatch, capsys, tmp_path):
  second = tmp_path / "second"
  shutil.copytree(TINY, second)
  served = []

  def fake_serve(pipes, host, port, *, max_queue, progress_every, on_ready):
    with web.make_server(pipes, "127.0.0.1", 0, max_queue=max_queue).start() as server:
      on_ready(server.url)
      served.append((list(pipes), host, port, max_queue, progress_every,
                     json.loads(http(server.url, "/health")[2])))

  monkeypatch.setattr(web, "serve", fake_serve)
  assert cli.main(["serve", "--model", str(TINY), "--model", str(second), "--port", "0", "--max-queue", "3",
                   "--progress-every", "32", "--host", "127.0.0.2"]) == 0
  out = capsys.readouterr().out.splitlines()
  assert len(out) == 1 and re.fullmatch(r"http://127\.0\.0\.1:\d+/", out[0])
  names, host, port, max_queue, progress_every, health = served[0]
  assert names == [str(TINY), str(second)] and (host, port, max_queue, progress_every) == ("127.0.0.2", 0, 3, 32)
  assert health["models"] == [str(TINY), str(second)] and health["max_queue"] == 3


def test_cli_serve_errors_exit_1_or_2(tmp_path, capsys):
  assert cli.main(["serve", "--model", str(tmp_path / "nope")]) == 1
  err = capsys.readouterr().err
  assert err.startswith("dalle-flax: error:") and "nope" in err
  assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
  for flag, value, message in (("--port", "70000", "--port: expected an integer in [0, 65535], got '70000'"),
                               ("--max-queue", "-1", "expected an integer in [0, 1000], got '-1'"),
                               ("--progress-every", "0", "expected an integer in [1, 1024], got '0'")):
    with pytest.raises(SystemExit) as exit_info:
      cli.main(["serve", flag, value])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err, flag
