"""The demo's FastAPI application: the page, the JSON API, the streaming API, the legacy contract.

Example::

    app = create_app({"shapes": dalle_flax.pipeline("text-to-image")}, max_queue=8)
    # uvicorn.run(app, host="127.0.0.1", port=8000), or dalle_flax.web.serve(...)

Routes (request and response bodies are the pydantic models below; ``/docs`` shows them)::

  GET  /                      the page (static/index.html, app.js, style.css; nothing from a CDN)
  GET  /health                HealthResponse: models, image size, queue state
  GET  /api/models            the served models with their image size and generation defaults
  POST /api/generate          GenerateRequest -> GenerateResponse {"images", "seeds", "elapsed_s", "model"}
  POST /api/generate/stream   GenerateRequest -> text/event-stream: queued*, progress*, done | error
  POST /generate              dalle-mini's backend contract: {"prompt"} -> {"images", "version"} (9 images)
  GET  /version               {"version"}: what dalle-mini's Streamlit front-end asks for

One generation runs at a time (:class:`~dalle_flax.web.jobs.GenerationQueue`); at most
``max_queue`` wait, more get 429 with ``Retry-After``. A field of the wrong type or out of range,
or an unknown field, gets 422 naming the field; a body that is not JSON gets 422 (or 400 when the
JSON parser gives up, e.g. nesting too deep), a non-JSON ``Content-Type`` 415, and a body over
:data:`MAX_BODY_BYTES` 413. Every JSON answer is ASCII (a lone surrogate the client sent is echoed
escaped), and an echoed input is abridged (:func:`_abridge`). A client that disconnects leaves the
queue, and a running job of its stops at the next progress point.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.message
import io
import json
import math
from collections.abc import AsyncIterator, Mapping
from importlib import resources
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..generation.seeds import SEED_LIMIT
from ..image_utils import make_image_grid
from ..pipelines import grid_shape
from .jobs import GenerationQueue, Job, QueueFull

__all__ = ["LEGACY_NUM_IMAGES", "MAX_BODY_BYTES", "MAX_IMAGES", "MAX_PROMPT_CHARS", "GenerateRequest",
           "GenerateResponse", "HealthResponse", "LegacyGenerateResponse", "create_app"]

MAX_BODY_BYTES = 64 * 1024
"""Largest request body accepted (bytes); larger ones get 413."""
MAX_IMAGES = 16
"""Most images one request may ask for."""
MAX_PROMPT_CHARS = 1000
"""Longest prompt accepted (characters; the model reads at most its max_text_length tokens)."""
LEGACY_NUM_IMAGES = 9
"""Images per ``POST /generate`` call: the dalle-mini front-ends show a 3-column grid of 9."""
_DISCONNECT_POLL_S = 0.25
_ECHO_CHARS, _ECHO_ITEMS, _ECHO_DEPTH = 200, 20, 3  # how much of a bad input an error echoes


class GenerateRequest(BaseModel):
  """One generation: a field left out or null takes the model's default."""

  model_config = ConfigDict(extra="forbid", strict=True)

  prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, pattern=r"\S",
                      description="what to draw (a non-blank string)")
  num_images: int | None = Field(None, ge=1, le=MAX_IMAGES, description="images to make")
  seed: int | None = Field(None, ge=0, lt=SEED_LIMIT,
                           description="image i gets image_seeds(seed, n)[i] (image 0: the seed itself); "
                                       "null: random, reported in the response")
  guidance_scale: float | None = Field(None, ge=0, le=100, allow_inf_nan=False, description="1 turns guidance off")
  temperature: float | None = Field(None, gt=0, le=100, allow_inf_nan=False)
  top_k: int | None = Field(None, ge=0, le=65536, description="0 disables; at most the image vocabulary")
  top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
  model: str | None = Field(None, max_length=1000, description="one of GET /api/models (null: the first)")
  progress_every: int | None = Field(None, ge=1, le=1024,
                                     description="image tokens between progress events (stream only)")


class GenerateResponse(BaseModel):
  images: list[str] = Field(description="base64 PNG, one per image")
  seeds: list[int] = Field(description="the seed of each image: regenerate image i alone with it")
  elapsed_s: float
  model: str


class LegacyGenerateResponse(BaseModel):
  images: list[str]
  version: str


class ModelInfo(BaseModel):
  name: str
  image_size: list[int]
  image_vocab_size: int
  defaults: dict[str, Any] = Field(description="guidance_scale, temperature, top_k, top_p of its generation config")


class HealthResponse(BaseModel):
  status: str
  model: str
  models: list[str]
  image_size: list[int]
  max_images: int
  busy: bool
  waiting: int
  max_queue: int


def _png_base64(image: Any) -> str:
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  return base64.b64encode(buffer.getvalue()).decode("ascii")


def _grid_base64(images: list[Any]) -> str:
  rows, cols = grid_shape(len(images))
  return _png_base64(make_image_grid(images, rows=rows, cols=cols))


def _model_info(name: str, pipe: Any) -> ModelInfo:
  text_config = pipe.model.config.text_config
  side = math.isqrt(text_config.image_length) * pipe.model.vqgan.config.downsample_factor
  generation = pipe.model.generation_config
  defaults = {key: getattr(generation, key, None) for key in ("guidance_scale", "temperature", "top_k", "top_p")}
  return ModelInfo(name=name, image_size=[side, side], image_vocab_size=int(text_config.image_vocab_size),
                   defaults=defaults)


class _JSONResponse(JSONResponse):
  """JSON rendered as ASCII: a lone surrogate (valid in JSON text, not encodable as UTF-8) comes
  back escaped instead of failing the encode (which was a 500), and NaN never leaves as a bare token."""

  def render(self, content: Any) -> bytes:
    return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def _abridge(value: Any, depth: int = 0) -> Any:
  """A bounded copy of a client's input for an error to echo: long strings cut, big or deep
  containers described, non-finite floats as strings. Echoing it whole recursed once per nesting
  level and a 64 KiB body of ``[[[...]]]`` 600 deep overflowed the stack (a 500)."""
  if isinstance(value, str):
    return value if len(value) <= _ECHO_CHARS else value[:_ECHO_CHARS] + f"... ({len(value)} characters)"
  if isinstance(value, float) and not math.isfinite(value):
    return repr(value)
  if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
    return f"an integer of {value.bit_length()} bits"
  if isinstance(value, (list, tuple, dict)):
    kind = "an object with %d keys" if isinstance(value, dict) else "an array of length %d"
    if depth >= _ECHO_DEPTH or len(value) > _ECHO_ITEMS:
      return kind % len(value)
    if isinstance(value, dict):
      return {str(_abridge(key, depth + 1)): _abridge(item, depth + 1) for key, item in value.items()}
    return [_abridge(item, depth + 1) for item in value]
  return value if value is None or isinstance(value, (bool, int, float)) else repr(value)[:_ECHO_CHARS]


def _has_surrogate(text: str) -> bool:
  try:
    text.encode("utf-8")
  except UnicodeEncodeError:
    return True
  return False


def _validation_errors(error: RequestValidationError) -> list[dict[str, Any]]:
  """pydantic's errors, each input abridged; a key with a lone surrogate (pydantic reports it with
  an empty location) gets its own location, so the answer names it."""
  errors = []
  for item in error.errors():
    item = {**item, "input": _abridge(item.get("input"))}
    if item.get("type") == "string_unicode":
      item["msg"] = "Input should be valid Unicode text: lone surrogates (\\ud800-\\udfff) have no UTF-8 form"
      body = getattr(error, "body", None)
      if tuple(item.get("loc", ())) == ("body",) and isinstance(body, dict):
        bad = [key for key in body if isinstance(key, str) and _has_surrogate(key)]
        errors += [{**item, "loc": ("body", key), "input": _abridge(body[key])} for key in bad]
        if bad:
          continue
    errors.append(item)
  return jsonable_encoder(errors)


async def _json_content_type(request: Request) -> None:
  """415 for a body whose Content-Type is not JSON (it was a 422 "not a dictionary" before)."""
  content_type = request.headers.get("content-type")
  if content_type is not None:
    message = email.message.Message()
    message["content-type"] = content_type
    if message.get_content_maintype() == "application":
      subtype = message.get_content_subtype()
      if subtype == "json" or subtype.endswith("+json"):
        return
  if not await request.body():
    return  # no body at all: the 422 "Field required" says more
  raise HTTPException(415, f"expected a JSON body with Content-Type: application/json, got "
                           f"{'no Content-Type' if content_type is None else repr(content_type[:_ECHO_CHARS])}")


class _BodyLimit:
  """ASGI middleware: 413 for a body over ``limit`` bytes (by Content-Length, or while reading)."""

  def __init__(self, app: ASGIApp, limit: int):
    self.app, self.limit = app, limit

  async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
      await self.app(scope, receive, send)
      return
    headers = dict(scope.get("headers") or [])
    length = headers.get(b"content-length")
    if length is not None and (not length.isdigit() or int(length) > self.limit):
      await self._too_large(send, length.decode("latin-1"))
      return
    if length is not None:
      await self.app(scope, receive, send)
      return
    # no Content-Length (chunked): read the body here, counting, then hand it on as it came
    buffered: list[Message] = []
    seen = 0
    while True:
      message = await receive()
      buffered.append(message)
      if message["type"] != "http.request":
        break
      seen += len(message.get("body", b""))
      if seen > self.limit:
        await self._too_large(send, f"more than {self.limit}")
        return
      if not message.get("more_body", False):
        break

    async def replay() -> Message:
      return buffered.pop(0) if buffered else await receive()

    await self.app(scope, replay, send)

  async def _too_large(self, send: Send, got: str) -> None:
    body = json.dumps({"detail": f"request body too large: expected at most {self.limit} bytes, got {got}"})
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body.encode()})


def create_app(pipes: Mapping[str, Any] | Any, *, max_queue: int = 8, progress_every: int = 16) -> FastAPI:
  """The demo app over one pipeline or ``{name: pipeline}`` (the first is the default model).

  Args:
    pipes: a loaded text-to-image pipeline, or an ordered mapping of model names to pipelines.
    max_queue: the most requests waiting behind the running one (more get 429).
    progress_every: image tokens between streamed progress events unless a request says.

  Returns:
    A FastAPI app; ``app.state.queue`` is its :class:`GenerationQueue` (closed on shutdown).
  """
  if not isinstance(pipes, Mapping):
    pipes = {pipes.model.name_or_path or type(pipes.model.text_model).__name__: pipes}
  if not pipes:
    raise ValueError("create_app needs at least one pipeline, got none")
  infos = {name: _model_info(name, pipe) for name, pipe in pipes.items()}
  default_model = next(iter(pipes))
  queue = GenerationQueue(pipes, max_queue=max_queue, progress_every=progress_every)
  static = resources.files(__package__) / "static"
  page = (static / "index.html").read_text(encoding="utf-8")

  @contextlib.asynccontextmanager
  async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    yield
    queue.close()

  app = FastAPI(title="dalle-flax demo", version="1", summary="Text to image with DALL·E mini models",
                docs_url="/docs", redoc_url=None, lifespan=lifespan, default_response_class=_JSONResponse)
  app.state.queue = queue

  @app.exception_handler(RequestValidationError)
  async def invalid_request(_request: Request, error: RequestValidationError) -> JSONResponse:
    # FastAPI's own handler, except that the inputs echoed are abridged (NaN/Infinity as strings:
    # JSON has no such numbers) and the answer is ASCII (see _JSONResponse)
    return _JSONResponse({"detail": _validation_errors(error)}, status_code=422)

  @app.exception_handler(StarletteHTTPException)
  async def http_error(_request: Request, error: StarletteHTTPException) -> Response:
    # FastAPI's own handler, rendered as ASCII; its 400 for a body the JSON parser gave up on
    # (nesting deeper than the recursion limit, an integer of over 4300 digits, bytes that are
    # not UTF-8) says why
    detail = error.detail
    cause = error.__cause__
    if error.status_code == 400 and detail == "There was an error parsing the body" and cause is not None:
      why = "it nests too deeply" if isinstance(cause, RecursionError) else f"{type(cause).__name__}: {cause}"
      detail = f"the body is not JSON this server can parse: {why[:_ECHO_CHARS]}"
    if error.status_code in (204, 304) or error.status_code < 200:
      return Response(status_code=error.status_code, headers=error.headers)
    return _JSONResponse({"detail": detail}, status_code=error.status_code, headers=error.headers)
  app.add_middleware(_BodyLimit, limit=MAX_BODY_BYTES)
  app.mount("/static", StaticFiles(directory=str(static)), name="static")

  def pipeline_kwargs(body: GenerateRequest, default_images: int = 1) -> tuple[str, dict[str, Any]]:
    name = body.model or default_model
    errors = []
    if name not in pipes:
      errors.append({"loc": ["body", "model"], "type": "value_error", "input": _abridge(name),
                     "msg": f"expected one of {list(pipes)}, got {_abridge(name)!r}"})
    elif body.top_k is not None and body.top_k > (vocab := infos[name].image_vocab_size):
      errors.append({"loc": ["body", "top_k"], "type": "less_than_equal", "input": body.top_k,
                     "msg": f"expected at most the image vocabulary of {name!r} ({vocab}), got {body.top_k}"})
    if errors:
      raise HTTPException(422, errors)
    kwargs = {"prompt": body.prompt, "num_images_per_prompt": body.num_images or default_images,
              **{key: getattr(body, key) for key in ("seed", "guidance_scale", "temperature", "top_k", "top_p")}}
    return name, kwargs

  def submit(name: str, kwargs: dict[str, Any], sink: Any, progress_every: int | None = None) -> Job:
    try:
      return queue.submit(name, kwargs, sink, progress_every=progress_every)
    except QueueFull as error:
      raise HTTPException(429, str(error), headers={"Retry-After": str(error.retry_after)}) from None

  async def run_to_end(request: Request, name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Queues the job and waits for it; a client that leaves cancels it."""
    loop = asyncio.get_running_loop()
    finished: asyncio.Future = loop.create_future()

    def sink(event: str, payload: dict[str, Any]) -> None:
      if event in ("done", "error"):
        loop.call_soon_threadsafe(lambda: finished.done() or finished.set_result((event, payload)))

    job = submit(name, kwargs, sink)
    try:
      while True:
        done, _ = await asyncio.wait({finished}, timeout=_DISCONNECT_POLL_S)
        if done:
          break
        if await request.is_disconnected():
          job.cancel()
          raise HTTPException(499, "the client closed the connection")
    finally:
      if not finished.done():
        job.cancel()
    event, payload = finished.result()
    if event == "error":
      raise HTTPException(500, payload["error"])
    return payload

  json_body = Depends(_json_content_type)

  @app.get("/", response_class=HTMLResponse, include_in_schema=False)
  async def index() -> HTMLResponse:
    return HTMLResponse(page, headers={"Cache-Control": "no-store"})

  @app.get("/health", response_model=HealthResponse)
  async def health() -> HealthResponse:
    state = queue.status()
    return HealthResponse(status="ok", model=default_model, models=list(pipes),
                          image_size=infos[default_model].image_size, max_images=MAX_IMAGES,
                          busy=state["running"], waiting=state["waiting"], max_queue=state["max_queue"])

  @app.get("/version")
  async def version() -> dict[str, str]:
    return {"version": default_model}

  @app.get("/api/models", response_model=list[ModelInfo])
  async def models() -> list[ModelInfo]:
    return list(infos.values())

  @app.post("/api/generate", response_model=GenerateResponse, dependencies=[json_body])
  async def generate(body: GenerateRequest, request: Request) -> GenerateResponse:
    name, kwargs = pipeline_kwargs(body)
    result = await run_to_end(request, name, kwargs)
    return GenerateResponse(images=[_png_base64(image) for image in result["images"]], seeds=result["seeds"],
                            elapsed_s=result["elapsed_s"], model=result["model"])

  @app.post("/generate", response_model=LegacyGenerateResponse, dependencies=[json_body])
  async def legacy_generate(body: GenerateRequest, request: Request) -> LegacyGenerateResponse:
    name, kwargs = pipeline_kwargs(body, default_images=LEGACY_NUM_IMAGES)
    result = await run_to_end(request, name, kwargs)
    return LegacyGenerateResponse(images=[_png_base64(image) for image in result["images"]], version=name)

  @app.post("/api/generate/stream", response_class=StreamingResponse, dependencies=[json_body],
            responses={200: {"content": {"text/event-stream": {}},
                             "description": "event: queued | progress | done | error, data: JSON"}})
  async def generate_stream(body: GenerateRequest, request: Request) -> StreamingResponse:
    name, kwargs = pipeline_kwargs(body)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    job = submit(name, kwargs, lambda event, payload: loop.call_soon_threadsafe(events.put_nowait, (event, payload)),
                 progress_every=body.progress_every)

    async def stream() -> AsyncIterator[str]:
      try:
        while True:
          try:
            event, payload = await asyncio.wait_for(events.get(), timeout=_DISCONNECT_POLL_S)
          except asyncio.TimeoutError:
            if await request.is_disconnected():
              return
            continue
          yield _sse(event, _encode_event(event, payload))
          if event in ("done", "error"):
            return
      finally:
        job.cancel()  # the client left (or the job ended: then a no-op)

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

  return app


def _encode_event(event: str, payload: dict[str, Any]) -> dict[str, Any]:
  """PIL images in an event's payload -> base64 PNG (progress: one preview grid)."""
  if event == "progress":
    return {"step": payload["step"], "total": payload["total"], "preview": _grid_base64(payload["images"])}
  if event == "done":
    images = payload["images"]
    return {"images": [_png_base64(image) for image in images], "grid": _grid_base64(images),
            "seeds": payload["seeds"], "elapsed_s": payload["elapsed_s"], "model": payload["model"]}
  return payload


def _sse(event: str, data: dict[str, Any]) -> str:
  return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"
