"""generate() against the original implementation's generate.npz (greedy / top-k 1, guidance 1 and 3)."""

from pathlib import Path

import numpy as np
import pytest

from dalle_flax import FlaxDalleMiniForConditionalGeneration

pytestmark = pytest.mark.golden

FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures"
DALLEBART = ["dallebart-mini-like", "dallebart-variant-swinv2", "dallebart-variant-cogview"]


def _load(name: str):
  folder = FIXTURES / name
  if not folder.is_dir():
    pytest.skip(f"golden fixtures not found at {folder} (they live in ../shared beside the checkout)")
  return FlaxDalleMiniForConditionalGeneration.from_pretrained(folder), np.load(folder / "expected" / "generate.npz")


@pytest.fixture(scope="module", params=DALLEBART)
def loaded(request):
  return _load(request.param)


def test_greedy_guidance_1(loaded):
  model, expected = loaded
  out = model.generate(expected["input_ids"], expected["attention_mask"], do_sample=False, suppress_tokens=[])
  np.testing.assert_array_equal(np.asarray(out.sequences), expected["greedy_cs1"])


def test_top_k_1_guidance_1(loaded):
  model, expected = loaded
  out = model.generate(expected["input_ids"], expected["attention_mask"], top_k=1, seed=0, suppress_tokens=[])
  np.testing.assert_array_equal(np.asarray(out.sequences), expected["topk1_cs1"])


@pytest.mark.parametrize("trace", [True, False])
def test_top_k_1_guidance_3(loaded, trace):
  model, expected = loaded
  # the original's argument names, exactly as the fixture recipe called them
  out = model.generate(
      expected["input_ids"], expected["attention_mask"], input_ids_uncond=expected["input_ids_uncond"],
      attention_mask_uncond=expected["attention_mask_uncond"], do_sample=True, top_k=1,
      condition_scale=3.0, suppress_tokens=[], trace=trace)
  np.testing.assert_array_equal(np.asarray(out.sequences), expected["topk1_cs3"])


def test_default_negative_prompt_is_the_original_empty_string(loaded):
  model, expected = loaded
  out = model.generate(expected["input_ids"], expected["attention_mask"], top_k=1, guidance_scale=3.0,
                       suppress_tokens=[])
  np.testing.assert_array_equal(np.asarray(out.sequences), expected["topk1_cs3"])


def test_default_suppression_only_changes_undecodable_ids(loaded):
  model, expected = loaded
  reference = expected["topk1_cs3"]
  out = np.asarray(model.generate(expected["input_ids"], expected["attention_mask"], top_k=1,
                                  guidance_scale=3.0).sequences)
  assert (out[:, 1:] < model.config.decoder_start_token_id).all()
  for row in range(out.shape[0]):
    bad = np.flatnonzero(reference[row, 1:] >= model.config.decoder_start_token_id)
    upto = (bad[0] if bad.size else reference.shape[1] - 1) + 1
    np.testing.assert_array_equal(out[row, :upto], reference[row, :upto])


def test_bart2021_seed_greedy():
  model, expected = _load("bart2021-seed")
  out = model.generate(expected["input_ids"], expected["attention_mask"], do_sample=False, suppress_tokens=[])
  np.testing.assert_array_equal(np.asarray(out.sequences), expected["greedy"])
