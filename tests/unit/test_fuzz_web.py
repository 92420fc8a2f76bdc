"""Fuzzing every route of the web demo over real HTTP: any JSON, any bytes, any Content-Type.

Each example is one request to the uvicorn server on loopback (the real tiny model behind it)
and one ``/health`` after it. The answer must be what an oracle computed from the bytes sent:
413 past the size limit, 415 for a body that is not declared JSON, 400/422 for bytes that do not
parse, 422 naming exactly the offending fields (pydantic's bounds, then the served model's), or a
200 with well-formed images and seeds; never a 5xx, never a hang (30 s per request), the memory
of the process bounded, and the queue idle again afterwards.

Seeded (``derandomize=True``) and bounded: 1,000 examples per target in the default run and
9,000 more under the ``slow`` marker, 10,000 per target in all. Valid bodies really generate, so
they draw their shapes (image count, top_k, guidance on/off, progress chunk) from a few values
the server fixture compiles first;
the rest are rejected before the queue.
"""

from __future__ import annotations

import base64
import contextlib
import io
import itertools
import json
import math
import sys
import time
from pathlib import Path

import pytest
from fuzzing import DEFAULT_EXAMPLES, SLOW_EXAMPLES, fuzz_settings
from hypothesis import HealthCheck, event, given
from hypothesis import strategies as st
from PIL import Image

httpx = pytest.importorskip("httpx", reason="the [web] extra is not installed")
pytest.importorskip("fastapi", reason="the [web] extra is not installed")

import dalle_flax  # noqa: E402
from dalle_flax import web  # noqa: E402

TINY = Path(__file__).resolve().parents[1] / "fixtures" / "tiny-dalle-mini"
MODEL, VOCAB, IMAGE_LENGTH, SIDE = str(TINY), 64, 16, 64
REQUEST_TIMEOUT_S = 30.0
# Hypothesis raises the recursion limit by 2000 while a test runs, and the limit is the whole
# process's: the server thread too. Under it a body nested 600 deep echoed fine, while a real
# server (the interpreter's own limit) answered 500; so each example runs at the import-time limit.
RECURSION_LIMIT = sys.getrecursionlimit()
RSS_MARGIN_MIB = 300  # above the RSS after warm-up; a leak of ~100 KiB per example would pass it
POST_ROUTES = ("/api/generate", "/api/generate/stream", "/generate")
FIELDS = ("prompt", "num_images", "seed", "guidance_scale", "temperature", "top_k", "top_p", "model",
          "progress_every")
# Unicode White_Space: what the prompt's r"\S" pattern (pydantic's Rust regex) treats as blank
WHITE_SPACE = frozenset("\t\n\x0b\x0c\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000"
                        + "".join(chr(c) for c in range(0x2000, 0x200B)))


# --- the server ---------------------------------------------------------------------------------------
def _rss_mib() -> float:
  for line in Path("/proc/self/status").read_text().splitlines():
    if line.startswith("VmRSS:"):
      return int(line.split()[1]) / 1024
  return 0.0


@pytest.fixture(scope="module")
def server(jax_cache):
  pipe = dalle_flax.pipeline("text-to-image", model=TINY)
  pipe.set_progress_bar_config(disable=True)
  with web.make_server(pipe, "127.0.0.1", 0, max_queue=8, progress_every=16).start() as server:
    with httpx.Client(base_url=server.url, timeout=REQUEST_TIMEOUT_S) as client:
      # warm-up: compile every shape a valid example can ask for (SHAPES x guidance on/off), so
      # no example compiles and the RSS baseline includes them
      for images, top_k, guidance in itertools.product((1, 2, None), SHAPES["top_k"], (None, 3.0)):
        body = {"prompt": "warm up", "num_images": images, "top_k": top_k, "guidance_scale": guidance}
        for path in ("/generate",) if images is None else ("/api/generate", "/api/generate/stream"):
          assert client.post(path, json={**body, "progress_every": 4}).status_code == 200
      server.client, server.rss_baseline = client, _rss_mib()
      yield server


# --- the oracle -------------------------------------------------------------------------------------
def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> float | None:
  if not isinstance(value, (int, float)) or isinstance(value, bool):
    return None
  try:
    number = float(value)
  except OverflowError:
    return None
  return number if math.isfinite(number) else None


def _unicode(text: str) -> bool:
  try:
    text.encode("utf-8")
  except UnicodeEncodeError:
    return False
  return True


def _in(value, low, high, *, open_low=False) -> bool:
  number = _number(value)
  return number is not None and (low < number if open_low else low <= number) and number <= high


FIELD_OK = {  # pydantic's bounds (GenerateRequest), None allowed except for the prompt
    "prompt": lambda v: isinstance(v, str) and _unicode(v) and 1 <= len(v) <= web.MAX_PROMPT_CHARS
                        and any(c not in WHITE_SPACE for c in v),
    "num_images": lambda v: v is None or (_is_int(v) and 1 <= v <= web.MAX_IMAGES),
    "seed": lambda v: v is None or (_is_int(v) and 0 <= v < 2**32),
    "guidance_scale": lambda v: v is None or _in(v, 0, 100),
    "temperature": lambda v: v is None or _in(v, 0, 100, open_low=True),
    "top_k": lambda v: v is None or (_is_int(v) and 0 <= v <= 65536),
    "top_p": lambda v: v is None or _in(v, 0, 1, open_low=True),
    "model": lambda v: v is None or (isinstance(v, str) and _unicode(v) and len(v) <= 1000),
    "progress_every": lambda v: v is None or (_is_int(v) and 1 <= v <= 1024),
}
JSON_TYPES = ("application/json", "application/json; charset=utf-8", "Application/JSON",
              "application/problem+json", "application/json;foo=bar", "application/vnd.api+json ; x")
OTHER_TYPES = (None, "", "text/plain", "text/json", "application/x-www-form-urlencoded",
               "multipart/form-data; boundary=x", "application/jsonx", "application", "*/*", ";;",
               "application/json/x", "application/ json", "application/+jsonx", "json")


def _declares_json(content_type: str | None) -> bool:
  """RFC 9110 media type: type/subtype before any parameter, case-insensitive; JSON is
  application/json or application/*+json."""
  if content_type is None:
    return False
  parts = content_type.split(";", 1)[0].strip().lower().split("/")
  return len(parts) == 2 and parts[0] == "application" and (parts[1] == "json" or parts[1].endswith("+json"))


def expect(raw: bytes, content_type: str | None) -> tuple[set[int], set[str] | None]:
  """(allowed statuses, the fields a 422 must name: None when the error is about the whole body)."""
  if len(raw) > web.MAX_BODY_BYTES:
    return {413}, None
  if raw and not _declares_json(content_type):
    return {415}, None
  if not raw:
    return {422}, None
  try:
    body = json.loads(raw)
  except json.JSONDecodeError:
    return {422}, None
  except (ValueError, RecursionError):  # not UTF-8, an integer of > 4300 digits, nesting too deep
    return {400}, None
  if not isinstance(body, dict):
    return {422}, None
  surrogate_keys = {key for key in body if not _unicode(key)}
  if surrogate_keys:
    return {422}, surrogate_keys
  bad = {key for key in body if key not in FIELDS} | {f for f in FIELDS if f in body and not FIELD_OK[f](body[f])}
  if "prompt" not in body:
    bad.add("prompt")
  if bad:
    return {422}, bad
  if body.get("model") not in (None, "", MODEL):
    return {422}, {"model"}
  if body.get("top_k") is not None and body["top_k"] > VOCAB:
    return {422}, {"top_k"}
  return {200}, set()


# --- what a request may be ----------------------------------------------------------------------------
ANY_CHAR = st.characters(codec=None, categories=None, exclude_categories=())  # lone surrogates too
TEXT = st.text(ANY_CHAR, max_size=40)
JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), TEXT,
                      st.sampled_from([2**32, 2**53 + 1, 2**64, 10**100, -(10**30), -0.0, 1e308, 5e-324]))
JSON_ANY = st.recursive(JSON_LEAF, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(TEXT, kids, max_size=4),
                        max_leaves=12)
# Values a valid request draws from: every number anywhere in its bounds, except the ones that
# are shapes of the compiled loop (image count, top_k, guidance on/off, progress chunk), which
# come from a few values the server fixture compiles first: a new shape costs 1-2 s and ~15 MiB
# of executable, so no example compiles, and the memory check can be tight.
SHAPES = {"num_images": (None, 1, 2), "top_k": (None, 50), "progress_every": (None, 4, 16, 1024)}
VALID = {
    "prompt": st.one_of(
        st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=80).filter(
            lambda t: any(c not in WHITE_SPACE for c in t)),
        st.sampled_from(["a red circle", "x" * 1000, "é" * 1000, "\U0001F98A" * 1000, "\x00", "\x1c", "<s></s>",
                         " a ", "\u202e\u200b!", "\ud83d\ude00"])),  # the last: a pair, one emoji in JSON
    "seed": st.none() | st.integers(0, 2**32 - 1),
    "guidance_scale": st.none() | st.floats(0, 100) | st.integers(0, 100) | st.just(1.0),
    "temperature": st.none() | st.floats(0, 100, exclude_min=True) | st.sampled_from([5e-324, 1e-300, 100]),
    "top_p": st.none() | st.floats(0, 1, exclude_min=True) | st.sampled_from([5e-324, 1e-300, 1]),
    "model": st.sampled_from([None, "", MODEL]),
    **{name: st.sampled_from(values) for name, values in SHAPES.items()},
    "num_images": st.sampled_from([1, 2, 1, 2, None]),  # None: 9 on /generate, the costly one
}
EDGES = {  # just past each bound, wrong types that lax mode would coerce, non-finite numbers
    "prompt": ["", " ", "\t\n", "\u3000\u2028\x85", "x" * 1001, "\ud800", "a\udfff b", 3, None, ["a"], True],
    "num_images": [0, 17, -1, 2**64, True, 2.0, "2", [], {}, float("inf")],
    "seed": [-1, 2**32, 2**63, 2**64 + 1, 1.5, 7.0, "7", True, float("nan")],
    "guidance_scale": [-1e-9, 100.00000000000001, 101, float("nan"), float("inf"), float("-inf"), "1", True, 10**400],
    "temperature": [0, 0.0, -0.0, -1, 100.5, float("nan"), float("inf"), "1", False],
    "top_k": [-1, 65, 1000, 65536, 65537, 50.0, True, "5", 2**70],
    "top_p": [0, 0.0, -0.1, 1.0000000000000002, 2, float("nan"), float("-inf"), "0.9"],
    "model": ["nope", "x" * 1001, "\ud800", 3, MODEL + " ", MODEL.upper(), "../" * 10],
    "progress_every": [0, -1, 1025, 1.5, True, "4"],
}


def _not_a_new_shape(name):
  return lambda value: name not in SHAPES or value in SHAPES[name] or not FIELD_OK[name](value) or (
      name == "top_k" and value > VOCAB)  # rejected by the app before the queue


FIELD = {name: st.one_of(VALID[name], st.sampled_from(EDGES[name]), JSON_ANY.filter(_not_a_new_shape(name)))
         for name in FIELDS}
EXTRA_KEYS = st.dictionaries(TEXT.filter(lambda key: key not in FIELDS) | st.sampled_from(["steps", "Prompt", "\ud800"]),
                             JSON_ANY, min_size=1, max_size=3)


def _dump(value) -> bytes:
  return json.dumps(value).encode("ascii")  # NaN/Infinity as bare tokens, surrogates as \ud800


valid_bodies = st.fixed_dictionaries({"prompt": VALID["prompt"], "num_images": VALID["num_images"]},
                                     optional={k: v for k, v in VALID.items() if k not in ("prompt", "num_images")}
                                     ).map(_dump)
mixed_bodies = st.builds(lambda fields, extra: {**fields, **extra},
                         st.fixed_dictionaries({}, optional=FIELD), st.just({}) | EXTRA_KEYS).map(_dump)
LITERALS = ["NaN", "-Infinity", "Infinity", "1e400", "-1e400", "1e-400", "1E2", "0x10", "01", "+1", ".5", "1.",
            "-", '"\\ud800"', '"\\udfff\\ud800"', '"\\u0000"', "1" + "0" * 5000, "true", "null", "[]", "{}",
            '"\\x41"', '"unterminated', "[" * 50 + "]" * 50, "[" * 300 + "]" * 300, "[" * 600 + "]" * 600, '{"a":' * 900 + "1" + "}" * 900,
            "[" * 5000 + "]" * 5000]
literal_bodies = st.builds(lambda field, literal: f'{{"prompt": "a fox", "{field}": {literal}}}'.encode(),
                           st.sampled_from(FIELDS), st.sampled_from(LITERALS))
deep_bodies = st.builds(lambda depth, opener: (opener[0] * depth + "1" + opener[1] * depth).encode(),
                        st.sampled_from([50, 300, 600, 900, 5000]), st.sampled_from([("[", "]"), ('{"a":', "}")]))
# one byte of a valid body replaced by a structural or non-UTF-8 one (never a digit: that could
# make a new shape, "top_k": 4)
mutated_bodies = st.builds(lambda raw, cut, byte: raw[:cut] + byte + raw[cut + 1:], valid_bodies, st.integers(0, 80),
                           st.sampled_from([b'"', b"{", b"}", b"[", b",", b":", b"\\", b"\x00", b"\xff", b"\xed\xa0",
                                            b"\xc3", b" ", b"\n", b"'", b"\xef\xbb\xbf"]))
encoded_bodies = st.builds(lambda raw, codec: raw.decode("ascii").encode(codec), mixed_bodies,
                           st.sampled_from(["utf-16", "utf-16-be", "utf-32-le", "utf-8-sig"]))
sized_bodies = st.builds(lambda raw, extra: raw + b" " * (web.MAX_BODY_BYTES - len(raw) + extra), mixed_bodies,
                         st.sampled_from([0, 1, 1, 4096]))
# about one body in 20 is valid (and generates, ~80 ms); the rest are rejected before the queue (~4 ms)
KINDS = {"valid": valid_bodies, "mixed": mixed_bodies, "json": JSON_ANY.map(_dump), "bytes": st.binary(max_size=300),
         "literal": literal_bodies, "deep": deep_bodies, "mutated": mutated_bodies, "encoded": encoded_bodies,
         "sized": sized_bodies}
WEIGHTS = {"valid": 2, "mixed": 16, "json": 6, "bytes": 6, "literal": 6, "deep": 2, "mutated": 2, "encoded": 4, "sized": 2}
BODIES = st.sampled_from([kind for kind, weight in WEIGHTS.items() for _ in range(weight)]).flatmap(KINDS.__getitem__)
# any header value HTTP can carry (visible ASCII, latin-1 obs-text, inner blanks), and some
# built around "application/...json"; 8 in 10 from the listed ones
HEADER_TEXT = st.text(st.sampled_from([chr(c) for c in (*range(0x21, 0x7F), *range(0x80, 0x100))] + [" ", "\t"]),
                      max_size=30).map(str.strip)
LISTED_TYPES = st.sampled_from(["application/json"] * 20 + list(JSON_TYPES) + list(OTHER_TYPES))
BUILT_TYPES = st.builds("{}/{}{}".format, st.sampled_from(["application", "APPLICATION", "text", ""]),
                        st.sampled_from(["json", "x+json", "+json", "json+x", ""]) | HEADER_TEXT,
                        st.sampled_from(["", ";", "; charset=latin-1", ";q=1;;"]) | HEADER_TEXT)
CONTENT_TYPES = st.integers(0, 9).flatmap(lambda i: LISTED_TYPES if i < 8 else HEADER_TEXT | BUILT_TYPES)
REQUESTS = st.tuples(BODIES, CONTENT_TYPES, st.sampled_from([False, False, False, True]))


# --- one example ------------------------------------------------------------------------------------
def _check_images(images, n):
  assert isinstance(images, list) and len(images) == n
  for b64 in images:
    image = Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))
    assert image.format == "PNG" and image.size == (SIDE, SIDE) and image.mode == "RGB"


def _check_ok(path, body, reply):
  n = body.get("num_images") or (web.LEGACY_NUM_IMAGES if path == "/generate" else 1)
  if path == "/api/generate/stream":
    assert reply.headers["content-type"].startswith("text/event-stream")
    events = []
    for block in reply.text.replace("\r\n", "\n").strip().split("\n\n"):
      fields = dict(line.split(": ", 1) for line in block.split("\n"))
      events.append((fields["event"], json.loads(fields["data"])))
    names = [name for name, _ in events]
    assert names[0] == "queued" and names[-1] == "done" and set(names[1:-1]) <= {"progress", "queued"}, names
    steps = [data["step"] for name, data in events if name == "progress"]
    assert steps == sorted(steps) and steps[0] == 0 and steps[-1] == n * IMAGE_LENGTH
    done = events[-1][1]
    images, seeds = done["images"], done["seeds"]
    Image.open(io.BytesIO(base64.b64decode(done["grid"], validate=True))).verify()
  else:
    out = reply.json()
    assert set(out) == ({"images", "version"} if path == "/generate" else {"images", "seeds", "elapsed_s", "model"})
    images, seeds = out["images"], out.get("seeds", [])
  _check_images(images, n)
  if seeds:
    assert len(seeds) == n and all(_is_int(s) and 0 <= s < 2**32 for s in seeds)
    if body.get("seed") is not None:
      assert seeds[0] == body["seed"]


def _check_error(reply, status, fields):
  assert reply.headers["content-type"] == "application/json", reply.headers
  assert reply.content.isascii()
  detail = reply.json()["detail"]
  if status != 422:
    assert isinstance(detail, str) and detail
    return
  assert isinstance(detail, list) and detail
  for error in detail:
    assert isinstance(error["msg"], str) and error["msg"] and error["loc"][0] == "body", error
  named = {error["loc"][1] for error in detail if len(error["loc"]) > 1 and isinstance(error["loc"][1], str)}
  if fields is None:  # about the whole body: nothing parsed to name
    assert not named, detail
  else:
    assert named == fields, detail


def _wait_idle(client):
  deadline = time.monotonic() + 10
  while True:
    reply = client.get("/health", timeout=1.0)
    assert reply.status_code == 200 and reply.json()["status"] == "ok"
    if not reply.json()["busy"] and not reply.json()["waiting"]:
      return
    assert time.monotonic() < deadline, "the queue did not go back to idle"
    time.sleep(0.02)


@contextlib.contextmanager
def _recursion_limit(limit):
  previous = sys.getrecursionlimit()
  sys.setrecursionlimit(limit)
  try:
    yield
  finally:
    sys.setrecursionlimit(previous)


def run_example(server, path, request):
  with _recursion_limit(RECURSION_LIMIT):
    return _run_example(server, path, request)


def _run_example(server, path, request):
  raw, content_type, chunked = request
  client = server.client
  headers = {} if content_type is None else {"content-type": content_type.encode("latin-1")}
  content = iter([raw[: len(raw) // 2], raw[len(raw) // 2:]]) if chunked else raw
  start = time.perf_counter()
  reply = client.post(path, content=content, headers=headers)
  assert time.perf_counter() - start < REQUEST_TIMEOUT_S
  statuses, fields = expect(raw, content_type)
  assert reply.status_code in statuses, (reply.status_code, reply.text[:500], raw[:200], content_type)
  if reply.status_code == 200:
    _check_ok(path, json.loads(raw), reply)
  else:
    _check_error(reply, reply.status_code, fields)
  _wait_idle(client)
  assert _rss_mib() < server.rss_baseline + RSS_MARGIN_MIB, (_rss_mib(), server.rss_baseline)
  return reply.status_code


GET_ROUTES = ("/", "/health", "/version", "/api/models", "/docs", "/openapi.json", "/static/app.js",
              "/static/style.css", "/static/index.html")
STATIC = {name: (Path(web.__file__).parent / "static" / name).read_bytes() for name in ("app.js", "style.css", "index.html")}
SEGMENT = st.text(ANY_CHAR.filter(_unicode), max_size=20) | st.sampled_from(
    ["..", ".", "%2e%2e", "%2f", "..%2f..%2fapp.py", "%00", "%ff", "%ed%a0%80", "app.js", "\\..\\", "a" * 300])
GET_REQUESTS = st.tuples(
    st.one_of(st.sampled_from(GET_ROUTES), st.lists(SEGMENT, min_size=1, max_size=4).map(lambda s: "/static/" + "/".join(s))),
    st.dictionaries(TEXT.filter(_unicode), TEXT.filter(_unicode), max_size=4))


def run_get_example(server, path, query):
  with _recursion_limit(RECURSION_LIMIT):
    _run_get_example(server, path, query)


def _run_get_example(server, path, query):
  client = server.client
  try:
    url = httpx.URL(server.url.rstrip("/") + path.replace("?", "%3F").replace("#", "%23"), params=query)
  except httpx.InvalidURL:
    return  # the client refuses to build it: nothing reaches the server
  reply = client.get(url)
  assert reply.status_code in (200, 307, 404), (reply.status_code, path, query, reply.text[:300])
  if reply.status_code == 307:  # /static -> /static/ (the router's trailing-slash redirect), same host
    assert httpx.URL(reply.headers["location"]).host in ("", "127.0.0.1")
  elif reply.status_code == 404:
    assert reply.headers["content-type"] == "application/json" and reply.json() == {"detail": "Not Found"}
  elif reply.url.path.startswith("/static/"):  # a static file, and nothing outside the folder
    assert reply.content in STATIC.values(), reply.url
  _wait_idle(client)


_SUPPRESS = (HealthCheck.data_too_large, HealthCheck.filter_too_much)


@pytest.mark.parametrize("path", POST_ROUTES)
@fuzz_settings(DEFAULT_EXAMPLES, *_SUPPRESS)
@given(request=REQUESTS)
def test_post_route_answers_any_body(server, path, request):
  event(f"status {run_example(server, path, request)}")


@fuzz_settings(DEFAULT_EXAMPLES, *_SUPPRESS)
@given(target=GET_REQUESTS)
def test_get_routes_answer_any_path_and_query(server, target):
  run_get_example(server, *target)


@pytest.mark.slow
@pytest.mark.parametrize("path", POST_ROUTES)
@fuzz_settings(SLOW_EXAMPLES, *_SUPPRESS)
@given(request=REQUESTS)
def test_post_route_answers_any_body_slow(server, path, request):
  event(f"status {run_example(server, path, request)}")


@pytest.mark.slow
@fuzz_settings(SLOW_EXAMPLES, *_SUPPRESS)
@given(target=GET_REQUESTS)
def test_get_routes_answer_any_path_and_query_slow(server, target):
  run_get_example(server, *target)


# What the fuzzer found: each of these was a 500, or a 422 where 415 is right, before the fix
# (the old server's answer is in the comment). Then the edges next to them, whose status was right
# already (the 400s said only "There was an error parsing the body"; now they say why).
FOUND = [
    # 500: the 422 echoed the input whole and jsonable_encoder recursed once per level (RecursionError)
    (b'{"prompt": "x", "junk": ' + b"[" * 600 + b"]" * 600 + b"}", "application/json", 422, {"junk"}),
    (b'{"a":' * 900 + b"1" + b"}" * 900, "application/json", 422, {"a", "prompt"}),
    # 500: a lone surrogate echoed in the 422 could not be encoded as UTF-8 (UnicodeEncodeError)
    (b'{"prompt": "\\ud800"}', "application/json", 422, {"prompt"}),
    (b'{"prompt": "x", "\\udfff": 1}', "application/json", 422, {"\udfff"}),
    (b'{"prompt": "x", "model": "\\ud800"}', "application/json", 422, {"model"}),
    (b'{"prompt": "' + b"x" * 1001 + b'\\ud800"}', "application/json", 422, {"prompt"}),
    (b'{"prompt": "x", "top_k": ["\\udfff\\ud800"]}'.decode().encode("utf-32"), "application/json", 422, {"top_k"}),
    # 422 "Input should be a valid dictionary" (the body was taken as a string): now 415
    (b'{"prompt": "x"}', "text/plain", 415, None), (b'{"prompt": "x"}', None, 415, None),
    (b'{"prompt": "x"}', "application/json/x", 415, None),
    # 500: a non-JSON Content-Type with bytes that are not UTF-8 (UnicodeDecodeError echoing them)
    (b"v\xb8", "*/*", 415, None), (b"\xff\xfe{\x00}\x00", "application/x-www-form-urlencoded", 415, None),
]
EDGES_OK_BEFORE = [
    (b'{"prompt": "x", "model": "nope", "top_k": 65}', "application/json", 422, {"model"}),
    (b"[" * 5000 + b"]" * 5000, "application/json", 400, None),
    (b'{"prompt": "x", "seed": 1' + b"0" * 5000 + b"}", "application/json", 400, None),
    (b'{"prompt": "x", "seed": 1' + b"0" * 4200 + b"}", "application/json", 422, {"seed"}),
    (b'{"prompt": "\\ud83d\\ude00", "num_images": 1}', "application/json", 200, set()),
    (b'{"prompt": "x"}', "application/vnd.api+json ; x", 200, set()),
]


@pytest.mark.parametrize("raw, content_type, status, fields", FOUND + EDGES_OK_BEFORE)
def test_what_the_fuzzer_found(server, raw, content_type, status, fields):
  assert expect(raw, content_type) == ({status}, fields)
  assert run_example(server, "/api/generate", (raw, content_type, False)) == status
  reply = server.client.post("/api/generate", content=raw,
                             headers={} if content_type is None else {"content-type": content_type})
  if status == 415:
    assert "expected a JSON body with Content-Type: application/json" in reply.json()["detail"]
  if status == 422 and b"[" * 600 in raw:
    assert reply.json()["detail"][0]["input"] == [[["an array of length 1"]]]
  if status == 400:
    assert reply.json()["detail"].startswith("the body is not JSON this server can parse")
