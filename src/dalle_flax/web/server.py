"""The local web demo: one HTML page and a JSON API over a text-to-image pipeline, stdlib only.

Example: ``serve(pipeline("text-to-image", model="dalle-mini/dalle-mini"), "127.0.0.1", 8000)``.

Routes::

  GET  /              the demo page (``static/index.html``, no external assets)
  GET  /health        {"status", "model", "image_size": [w, h], "max_images", "busy"}
  POST /api/generate  {"prompt", "num_images" (1..16, default 1), "seed", "guidance_scale",
                      "temperature", "top_k", "top_p"} -> {"images": [base64 PNG], "seeds",
                      "elapsed_s"}; a field left out or null takes the model's default
  POST /generate      dalle-mini's backend contract: {"prompt"} -> {"images": [base64 PNG],
                      "version"} (9 images unless "num_images" says otherwise)
  GET  /version       {"version"}: what dalle-mini's Streamlit front-end asks for after /generate

One generation runs at a time (a lock; later requests wait their turn). A body that is not a JSON
object, a field of the wrong type or out of range, or an unknown field gets 400 with
``{"error": "..."}`` naming what was expected and what was got; bodies over 64 KB get 413,
unknown routes 404, a known route with the wrong method 405.
"""

from __future__ import annotations

import base64
import io
import ipaddress
import json
import logging
import math
import socket
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import TYPE_CHECKING, Any

from ..generation.seeds import SEED_LIMIT

if TYPE_CHECKING:
  from ..pipelines import TextToImagePipeline

logger = logging.getLogger(__name__)

__all__ = ["LEGACY_NUM_IMAGES", "MAX_BODY_BYTES", "MAX_IMAGES", "DemoServer", "RequestError",
           "make_server", "parse_generate_request", "serve"]

MAX_BODY_BYTES = 64 * 1024
"""Largest request body accepted (bytes); larger ones get 413."""
MAX_IMAGES = 16
"""Most images one request may ask for."""
LEGACY_NUM_IMAGES = 9
"""Images per ``POST /generate`` call: the dalle-mini front-ends show a 3-column grid of 9."""
_DRAIN_LIMIT = 1 << 20  # oversized bodies up to this size are read (and dropped) before the 413
_FIELDS = ("prompt", "num_images", "seed", "guidance_scale", "temperature", "top_k", "top_p")
_JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
               dict: "object", type(None): "null"}


class RequestError(ValueError):
  """A request the server refuses, with its HTTP status and extra response headers."""

  def __init__(self, message: str, status: int = HTTPStatus.BAD_REQUEST,
               headers: dict[str, str] | None = None):
    super().__init__(message)
    self.status = int(status)
    self.headers = headers or {}


def _got(value: Any) -> str:
  shown = json.dumps(value, allow_nan=True)
  shown = shown if len(shown) <= 40 else shown[:37] + "..."
  return f"{shown} ({_JSON_TYPES.get(type(value), type(value).__name__)})"


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_generate_request(body: bytes, *, default_num_images: int = 1,
                           max_top_k: int = 16384) -> dict[str, Any]:
  """Checks a generate request body; returns the pipeline's keyword arguments.

  Args:
    body: the raw request body, a JSON object with the fields of ``POST /api/generate``.
    default_num_images: images when ``num_images`` is absent or null.
    max_top_k: the largest ``top_k`` accepted (the image vocabulary size).

  Returns:
    ``{"prompt", "num_images_per_prompt", "seed", "guidance_scale", "temperature", "top_k",
    "top_p"}``; None where the model's default applies.

  Raises:
    RequestError: status 400, naming the field, what it expected and what it got.
  """
  try:
    data = json.loads(body.decode("utf-8"))
  except (UnicodeDecodeError, ValueError, RecursionError) as error:
    raise RequestError(f"expected a JSON object, got invalid JSON ({error})") from None
  if not isinstance(data, dict):
    raise RequestError(f"expected a JSON object, got {_got(data)}")
  unknown = sorted(set(data) - set(_FIELDS))
  if unknown:
    raise RequestError(f"unknown field(s) {unknown}: expected only {list(_FIELDS)}")
  prompt = data.get("prompt")
  if not isinstance(prompt, str) or not prompt.strip():
    got = _got(prompt) if "prompt" in data else "no prompt field"
    raise RequestError(f"prompt: expected a non-empty string, got {got}")
  rules: dict[str, tuple[Callable[[Any], bool], str]] = {
      "num_images": (lambda v: _is_int(v) and 1 <= v <= MAX_IMAGES,
                     f"an integer in [1, {MAX_IMAGES}] or null"),
      "seed": (lambda v: _is_int(v) and 0 <= v < SEED_LIMIT, "an integer in [0, 2**32) or null"),
      "guidance_scale": (_is_number, "a finite number or null"),
      "temperature": (lambda v: _is_number(v) and v > 0, "a finite number > 0 or null"),
      "top_k": (lambda v: _is_int(v) and 0 <= v <= max_top_k,
                f"an integer in [0, {max_top_k}] or null (0 disables)"),
      "top_p": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1] or null"),
  }
  for name, (valid, expected) in rules.items():
    value = data.get(name)
    if value is not None and not valid(value):
      raise RequestError(f"{name}: expected {expected}, got {_got(value)}")
  num_images = data.get("num_images")
  return {"prompt": prompt,
          "num_images_per_prompt": default_num_images if num_images is None else num_images,
          **{name: data.get(name) for name in _FIELDS[2:]}}


def _png_base64(image: Any) -> str:
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  return base64.b64encode(buffer.getvalue()).decode("ascii")


class DemoServer(ThreadingHTTPServer):
  """The demo's HTTP server: the pipeline, its generation lock and the page (see make_server).

  Args:
    address: ``(host, port)`` to bind; an IPv6 host binds an IPv6 socket.
    pipe: a loaded :class:`~dalle_flax.pipelines.TextToImagePipeline`.
  """

  daemon_threads = True

  def __init__(self, address: tuple[str, int], pipe: TextToImagePipeline):
    self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    self.pipe = pipe
    self.lock = threading.Lock()
    self.page = (resources.files(__package__) / "static" / "index.html").read_bytes()
    text_config = pipe.model.config.text_config
    side = math.isqrt(text_config.image_length) * pipe.model.vqgan.config.downsample_factor
    self.image_size = (side, side)
    self.max_top_k = int(text_config.image_vocab_size)
    self.model_name = pipe.model.name_or_path or type(pipe.model.text_model).__name__
    super().__init__(address, _Handler)

  @property
  def url(self) -> str:
    """``http://host:port/`` of the bound socket."""
    host, port = self.server_address[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"

  def info(self) -> dict[str, Any]:
    """What ``GET /health`` returns."""
    return {"status": "ok", "model": self.model_name, "image_size": list(self.image_size),
            "max_images": MAX_IMAGES, "busy": self.lock.locked()}

  def generate(self, request: dict[str, Any]) -> tuple[list[str], list[int], float]:
    """Runs the pipeline (one call at a time) on a :func:`parse_generate_request` result.

    Returns:
      The images as base64 PNG strings, their seeds, and the seconds the generation took.
    """
    prompt, kwargs = request["prompt"], {k: v for k, v in request.items() if k != "prompt"}
    with self.lock:
      start = time.perf_counter()
      out = self.pipe(prompt, return_dict=True, **kwargs)
      elapsed = time.perf_counter() - start
    seeds = [int(seed) for seed in out.seeds]
    logger.info("%d image(s) in %.2f s for %r (seeds %s)", len(seeds), elapsed, prompt, seeds)
    return [_png_base64(image) for image in out.images], seeds, elapsed


class _Handler(BaseHTTPRequestHandler):
  """Routes requests to the :class:`DemoServer` (HTTP/1.0: one request per connection)."""

  server: DemoServer
  server_version = "dalle-flax-demo"
  timeout = 60  # seconds a client may stall while sending; generation time is not limited
  _GET = {"/": "_page", "/index.html": "_page", "/health": "_health", "/version": "_version"}
  _POST = {"/api/generate": "_api_generate", "/generate": "_legacy_generate"}

  def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
    self._dispatch(self._GET)

  def do_POST(self) -> None:  # noqa: N802
    self._dispatch(self._POST)

  def _dispatch(self, routes: dict[str, str]) -> None:
    path = self.path.split("?", 1)[0]
    try:
      if path not in routes:
        allowed = [m for m, table in (("GET", self._GET), ("POST", self._POST)) if path in table]
        if allowed:
          raise RequestError(f"{path}: expected {' or '.join(allowed)}, got {self.command}",
                             HTTPStatus.METHOD_NOT_ALLOWED, {"Allow": ", ".join(allowed)})
        routes_list = [f"GET {p}" for p in self._GET] + [f"POST {p}" for p in self._POST]
        raise RequestError(f"no route {self.command} {path}: expected one of {routes_list}",
                           HTTPStatus.NOT_FOUND)
      getattr(self, routes[path])()
    except RequestError as error:
      self._send_json({"error": str(error)}, error.status, error.headers)
    except Exception as error:  # noqa: BLE001 (a failed generation: 500, the server lives on)
      logger.exception("%s %s failed", self.command, path)
      self._send_json({"error": f"{type(error).__name__}: {error}"},
                      HTTPStatus.INTERNAL_SERVER_ERROR)

  def _read_body(self) -> bytes:
    header = self.headers.get("Content-Length")
    if header is None:
      raise RequestError("expected a Content-Length header, got none", HTTPStatus.LENGTH_REQUIRED)
    length = int(header) if header.strip().isdigit() else -1
    if length < 0:
      raise RequestError(f"expected a Content-Length >= 0, got {header!r}")
    if length > MAX_BODY_BYTES:
      if length <= _DRAIN_LIMIT:  # read it, so the client gets the 413 rather than a reset
        self.rfile.read(length)
      raise RequestError(f"request body too large: expected at most {MAX_BODY_BYTES} bytes, "
                         f"got {length}", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
    return self.rfile.read(length)

  def _page(self) -> None:
    self._send(HTTPStatus.OK, self.server.page, "text/html; charset=utf-8")

  def _health(self) -> None:
    self._send_json(self.server.info())

  def _version(self) -> None:  # what dalle-mini's Streamlit front-end shows under the images
    self._send_json({"version": self.server.model_name})

  def _api_generate(self) -> None:
    request = parse_generate_request(self._read_body(), max_top_k=self.server.max_top_k)
    images, seeds, elapsed = self.server.generate(request)
    self._send_json({"images": images, "seeds": seeds, "elapsed_s": round(elapsed, 3)})

  def _legacy_generate(self) -> None:
    request = parse_generate_request(self._read_body(), default_num_images=LEGACY_NUM_IMAGES,
                                     max_top_k=self.server.max_top_k)
    images, _, _ = self.server.generate(request)
    self._send_json({"images": images, "version": self.server.model_name})

  def _send_json(self, payload: dict[str, Any], status: int = HTTPStatus.OK,
                 headers: dict[str, str] | None = None) -> None:
    self._send(status, json.dumps(payload).encode("utf-8"), "application/json", headers)

  def _send(self, status: int, body: bytes, content_type: str,
            headers: dict[str, str] | None = None) -> None:
    try:
      self.send_response(status)
      for name, value in {"Content-Type": content_type, "Content-Length": str(len(body)),
                          "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
                          **(headers or {})}.items():
        self.send_header(name, value)
      self.end_headers()
      self.wfile.write(body)
    except (BrokenPipeError, ConnectionResetError):
      logger.warning("%s left before the response to %s %s", self.address_string(), self.command,
                     self.path)

  def log_message(self, format: str, *args: Any, level: int = logging.INFO) -> None:  # noqa: A002
    logger.log(level, "%s %s", self.address_string(), format % args)

  def log_error(self, format: str, *args: Any) -> None:  # noqa: A002
    self.log_message(format, *args, level=logging.WARNING)


def _is_loopback(host: str) -> bool:
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return host == "localhost"


def make_server(pipe: TextToImagePipeline, host: str = "127.0.0.1", port: int = 0) -> DemoServer:
  """Binds the demo server (not serving yet: call ``serve_forever``, then ``server_close``).

  Args:
    pipe: a loaded text-to-image pipeline; its progress bar settings are left as they are.
    host: address to bind; 127.0.0.1 (the default) keeps the demo on this machine.
    port: port to bind; 0 picks a free one (``server.url`` tells which).

  Returns:
    A :class:`DemoServer` (a ``ThreadingHTTPServer``).
  """
  server = DemoServer((host, port), pipe)
  if not _is_loopback(host):
    logger.warning("serving on %s, not a loopback address: whoever reaches it can run "
                   "generations on this machine", host)
  return server


def serve(pipe: TextToImagePipeline, host: str = "127.0.0.1", port: int = 8000, *,
          on_ready: Callable[[str], Any] | None = None) -> None:
  """Serves the demo until interrupted (Ctrl-C), then closes the socket and returns.

  Args:
    pipe: a loaded text-to-image pipeline.
    host: address to bind (default: this machine only).
    port: port to bind (0 picks a free one).
    on_ready: called with the URL once the socket is bound (default: log it).
  """
  with make_server(pipe, host, port) as server:
    (on_ready or (lambda url: logger.info("serving the demo on %s", url)))(server.url)
    try:
      server.serve_forever()
    except KeyboardInterrupt:
      logger.info("interrupted: stopping the demo server")
