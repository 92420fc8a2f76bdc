"""DalleBart against the golden fixtures made with the original code (../shared/fixtures).

Each fixture folder is a hub-style checkpoint (``config.json`` + ``flax_model.msgpack``) loaded
with ``from_pretrained``; encoder states and decoder logits (teacher-forced, and one token at
a time through the KV cache) must match ``expected/forward.npz`` within the READMEs'
tolerance (atol = rtol = 1e-4; the original's own eager/jit/cache paths differ by ~1e-5).
"""

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dalle_flax import FlaxDalleMiniForConditionalGeneration

pytestmark = pytest.mark.golden

FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures"
NAMES = ["dallebart-mini-like", "dallebart-variant-swinv2", "dallebart-variant-cogview", "bart2021-seed"]
TOLERANCE = dict(atol=1e-4, rtol=1e-4)


def _folder(name: str) -> Path:
  folder = FIXTURES / name
  if not (folder / "expected" / "forward.npz").is_file():
    pytest.skip(f"golden fixture {name} not found under {FIXTURES} (../shared beside the checkout)")
  return folder


def _forward_and_incremental(model, params, ids, mask, image_ids):
  """Teacher-forced outputs and the logits of n single-token decode_steps (jitted as one)."""
  out = model(ids, mask, image_ids, params=params)
  cache = model.init_cache(params, out.encoder_last_hidden_state, mask)

  def step(cache, token_position):
    logits, cache = model.decode_step(params, *token_position, cache)
    return cache, logits

  _, steps = jax.lax.scan(step, cache, (image_ids.T, jnp.arange(image_ids.shape[1])))
  return out.encoder_last_hidden_state, out.logits, jnp.swapaxes(steps, 0, 1)


def _run(model, expected):
  run = jax.jit(functools.partial(_forward_and_incremental, model))  # params are traced, not closed over
  return run(model.params, expected["input_ids"], expected["attention_mask"], expected["decoder_input_ids"])


@pytest.mark.parametrize("name", NAMES)
def test_forward_and_cached_decoding_match_the_original(name):
  folder = _folder(name)
  expected = dict(np.load(folder / "expected" / "forward.npz"))
  model = FlaxDalleMiniForConditionalGeneration.from_pretrained(folder)
  encoder_out, logits, incremental = _run(model, expected)
  np.testing.assert_allclose(encoder_out, expected["encoder_last_hidden_state"], **TOLERANCE)
  for key in ("decoder_logits", "decoder_logits_jit", "decoder_logits_incremental"):
    if key in expected:  # the seed fixture has the eager logits only
      np.testing.assert_allclose(logits, expected[key], **TOLERANCE)
      np.testing.assert_allclose(incremental, expected[key], **TOLERANCE)
  assert np.array_equal(np.argmax(logits, -1), np.argmax(expected["decoder_logits"], -1))


def test_seed_checkpoint_loads_scanned():
  """The (unrolled) 2021 seed tree converts to DalleBart and then to the scanned layout."""
  folder = _folder("bart2021-seed")
  expected = dict(np.load(folder / "expected" / "forward.npz"))
  model = FlaxDalleMiniForConditionalGeneration.from_pretrained(folder, use_scan=True)
  assert model.config.use_scan is True
  assert "FlaxBartEncoderLayers" in model.params["model"]["encoder"]["layers"]
  logits = model(expected["input_ids"], expected["attention_mask"], expected["decoder_input_ids"]).logits
  np.testing.assert_allclose(logits, expected["decoder_logits"], **TOLERANCE)


def test_save_and_reload_keeps_the_released_layout(tmp_path):
  folder = _folder("dallebart-mini-like")
  model = FlaxDalleMiniForConditionalGeneration.from_pretrained(folder)
  model.save_pretrained(tmp_path)
  reloaded = FlaxDalleMiniForConditionalGeneration.from_pretrained(tmp_path)
  assert reloaded.config.to_dict()["use_scan"] is True
  for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(reloaded.params)):
    np.testing.assert_array_equal(a, b)
  assert jax.tree.structure(model.params) == jax.tree.structure(reloaded.params)
