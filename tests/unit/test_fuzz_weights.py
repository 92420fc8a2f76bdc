"""Fuzzing weight loading at the reader level: damaged safetensors and flax msgpack files.

Each example starts from a real small weights file (several dtypes and ranks) and damages it:
truncated at any offset, bits flipped (mostly in the header, where the structure lives), a run
of zero bytes, a rewritten safetensors header (wrong dtypes, shapes, offsets), bytes appended,
or random bytes. The reader must return a dict of arrays whose sizes agree with their shapes,
or raise an ``OSError``/``ValueError`` naming the file, in bounded time and memory; never
another exception, a hang or a crash. Seeded (``derandomize=True``): 1,000 examples per target
by default and 9,000 more under ``slow``. A third target feeds the tiny model's own tensors with
keys dropped or renamed and shapes or dtypes changed to the model's checker (100 + 1,000: each
example traces the model's shapes): every change is named, nothing that does not fit is loaded.
"""

from __future__ import annotations

import json
import struct
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from flax import serialization
from fuzzing import DEFAULT_EXAMPLES, SLOW_EXAMPLES, fuzz_settings
from hypothesis import HealthCheck, given
from hypothesis import strategies as st

from dalle_flax import modeling_flax_utils

PEAK_BYTES = 64 * 2**20

_rng = np.random.default_rng(0)
TENSORS = {
    "encoder/embed/embedding": _rng.standard_normal((16, 8)).astype(np.float32),
    "encoder/ln/scale": np.ones(8, np.float16),
    "decoder/dense/kernel": _rng.standard_normal((2, 3, 4)).astype(np.float32),
    "decoder/ids": np.arange(5, dtype=np.int32),
    "decoder/scalar": np.array(2.5, np.float32),
}
SAFETENSORS = safetensors.numpy.save({k.replace("/", "."): v for k, v in TENSORS.items()})
MSGPACK = serialization.msgpack_serialize(modeling_flax_utils.unflatten_params(dict(TENSORS)))
_HEADER_LEN = struct.unpack("<Q", SAFETENSORS[:8])[0]
HEADER = json.loads(SAFETENSORS[8:8 + _HEADER_LEN])
DTYPES = ["F32", "F16", "BF16", "F64", "I8", "I32", "I64", "U8", "BOOL", "F8_E4M3", "C64", "X9", "", 7, None]


def _flip(data: bytes, bits: list[int], in_header: bool) -> bytes:
  out = bytearray(data)
  span = 8 + _HEADER_LEN if in_header else len(out)
  for bit in bits:
    out[(bit // 8) % span] ^= 1 << (bit % 8)
  return bytes(out)


@st.composite
def _rewritten_header(draw) -> bytes:
  """A safetensors file whose JSON header is changed but still JSON: wrong dtypes, shapes, offsets."""
  header = json.loads(json.dumps(HEADER))
  names = sorted(k for k in header if k != "__metadata__")
  for name in draw(st.lists(st.sampled_from(names), min_size=1, max_size=3)):
    entry = header[name]
    if not isinstance(entry, dict):  # replaced by junk already
      continue
    field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "drop", "junk"]))
    if field == "dtype":
      entry["dtype"] = draw(st.sampled_from(DTYPES))
    elif field == "shape":
      entry["shape"] = draw(st.lists(st.one_of(st.integers(-2, 40), st.sampled_from([2**31, 2**62, 2**64])),
                                     max_size=5))
    elif field == "data_offsets":
      entry["data_offsets"] = draw(st.lists(st.one_of(st.integers(-5, 2000), st.sampled_from([2**40, 2**64])),
                                            min_size=0, max_size=3))
    elif field == "drop":
      entry.pop(draw(st.sampled_from(sorted(entry))))
    else:
      header[name] = draw(st.one_of(st.none(), st.integers(), st.text(max_size=5), st.lists(st.integers(), max_size=3)))
  text = json.dumps(header).encode()
  declared = draw(st.one_of(st.just(len(text)), st.integers(0, len(text) + 100), st.just(2**63)))
  return struct.pack("<Q", declared % 2**64) + text + SAFETENSORS[8 + _HEADER_LEN:]


def _damaged(original: bytes, *, safetensors_file: bool):
  header_cases = [_rewritten_header()] if safetensors_file else []
  return st.one_of(
      st.integers(0, len(original) - 1).map(lambda n: original[:n]),
      st.tuples(st.lists(st.integers(0, 8 * len(original)), min_size=1, max_size=8), st.booleans()).map(
          lambda t: _flip(original, t[0], in_header=t[1])),
      st.tuples(st.integers(0, len(original)), st.integers(1, 64)).map(
          lambda t: original[:t[0]] + bytes(t[1]) + original[t[0] + t[1]:]),
      st.binary(min_size=1, max_size=32).map(lambda extra: original + extra),
      st.binary(max_size=256),
      *header_cases,
  )


def _check_reader(path: Path, content: bytes, reader) -> None:
  path.write_bytes(content)
  tracemalloc.start()
  start = time.perf_counter()
  try:
    flat = reader(path)
  except (OSError, ValueError) as e:
    assert str(path) in str(e), f"the error must name the file: {e}"
  else:
    assert isinstance(flat, dict)
    for key, value in flat.items():
      assert isinstance(key, str) and isinstance(value, np.ndarray), (key, type(value))
      assert value.nbytes == int(np.prod(value.shape, dtype=np.int64)) * value.dtype.itemsize
      assert value.dtype.kind in "fiub" or value.dtype.name == "bfloat16", (key, value.dtype)
  finally:
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
  assert time.perf_counter() - start < 10
  assert peak < PEAK_BYTES, f"reading {len(content)} bytes peaked at {peak / 2**20:.0f} MiB"


TARGETS = {
    "safetensors": ("model.safetensors", SAFETENSORS, modeling_flax_utils._read_safetensors, True),
    "msgpack": ("flax_model.msgpack", MSGPACK, modeling_flax_utils._read_msgpack, False),
}


def _fuzz(tmp_path, target: str, examples: int) -> None:
  name, original, reader, is_safetensors = TARGETS[target]
  seen = []

  @fuzz_settings(examples, HealthCheck.function_scoped_fixture)
  @given(_damaged(original, safetensors_file=is_safetensors))
  def run(content):
    seen.append(len(content))
    _check_reader(tmp_path / name, content, reader)

  run()
  assert len(seen) >= examples, f"hypothesis ran {len(seen)} of {examples} examples"


def test_the_undamaged_files_read_back(tmp_path):
  for name, original, reader, _ in TARGETS.values():
    (tmp_path / name).write_bytes(original)
    flat = reader(tmp_path / name)
    assert sorted(flat) == sorted(TENSORS)
    for key, value in TENSORS.items():
      np.testing.assert_array_equal(flat[key], value)
      assert flat[key].dtype == value.dtype


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_fuzz_weight_files(tmp_path, target):
  _fuzz(tmp_path, target, DEFAULT_EXAMPLES)


@pytest.mark.slow
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_fuzz_weight_files_slow(tmp_path, target):
  _fuzz(tmp_path, target, SLOW_EXAMPLES)


# --- structurally valid files that do not fit the model: wrong keys, shapes and dtypes -----------
TINY = Path(__file__).resolve().parents[1] / "fixtures" / "tiny-dalle-mini"
WRONG_DTYPES = [np.int32, np.int8, np.uint8, np.bool_, np.complex64, np.float64, np.float16]


@pytest.fixture(scope="module")
def tiny_model():
  from dalle_flax import FlaxDalleMiniForConditionalGeneration
  model = FlaxDalleMiniForConditionalGeneration.from_pretrained(TINY)
  flat = {k: np.asarray(v) for k, v in modeling_flax_utils.flatten_params(model.params).items()}
  model.expected_shapes = modeling_flax_utils.flatten_params(model.params_shape_tree)
  return model, flat


@st.composite
def _changed_tensors(draw, keys: list[str]):
  changes = draw(st.lists(st.tuples(st.sampled_from(keys),
                                    st.sampled_from(["drop", "rename", "shape", "dtype", "transpose", "empty"])),
                          min_size=1, max_size=3))
  dtype = draw(st.sampled_from(WRONG_DTYPES))
  extra = draw(st.integers(1, 3))
  return changes, dtype, extra


def _apply(flat: dict, changes) -> dict:
  (changes, dtype, extra) = changes
  out = dict(flat)
  for key, kind in changes:
    if key not in out:
      continue
    value = out[key]
    if kind == "drop":
      del out[key]
    elif kind == "rename":
      out[key + "_x"] = out.pop(key)
    elif kind == "shape":
      out[key] = np.zeros(value.shape[:-1] + (value.shape[-1] + extra,) if value.ndim else (extra,), value.dtype)
    elif kind == "dtype":
      out[key] = value.astype(dtype)
    elif kind == "transpose":
      out[key] = value.T.copy() if value.ndim == 2 else value.reshape(-1)
    else:
      out[key] = np.zeros((0,), value.dtype)
  return out


def _expected_ok(flat: dict, changed: dict, model) -> bool:
  shapes = model.expected_shapes
  return set(changed) == set(shapes) and all(
      changed[k].shape == shapes[k].shape and np.issubdtype(changed[k].dtype, np.floating) for k in shapes)


def _fuzz_model(tiny_model, examples: int) -> None:
  model, flat = tiny_model
  keys = sorted(flat)

  @fuzz_settings(examples, HealthCheck.function_scoped_fixture)
  @given(_changed_tensors(keys))
  def run(changes):
    changed = _apply(flat, changes)
    ok = _expected_ok(flat, changed, model)
    try:
      params = model._validate_and_place(dict(changed), "fuzzed.safetensors", None)
    except ValueError as e:
      assert not ok, f"a checkpoint that fits was refused: {e}"
      assert "fuzzed.safetensors" in str(e)
      named = {key for key, _ in changes[0]}
      assert any(key in str(e) for key in named) or any(key + "_x" in str(e) for key in named), str(e)
    else:
      assert ok, "a checkpoint with a missing/extra key or a wrong shape/dtype was accepted"
      placed = modeling_flax_utils.flatten_params(params)
      assert {k: v.shape for k, v in placed.items()} == {k: v.shape for k, v in flat.items()}

  run()


def test_fuzz_wrong_tensors_are_named(tiny_model):
  _fuzz_model(tiny_model, 100)  # each example traces the model's shapes (~0.1 s)


@pytest.mark.slow
def test_fuzz_wrong_tensors_are_named_slow(tiny_model):
  _fuzz_model(tiny_model, 1_000)


def test_integer_weights_for_float_parameters_are_refused(tiny_model):
  """Found by the fuzzer: an int32 kernel of the right shape loaded and ran as integers."""
  model, flat = tiny_model
  key = sorted(flat)[0]
  with pytest.raises(ValueError, match=f"{key}: checkpoint dtype int32 vs model float32"):
    model._validate_and_place({**flat, key: flat[key].astype(np.int32)}, "x.safetensors", None)
