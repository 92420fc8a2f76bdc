"""generate() against the original implementation's generate.npz (greedy / top-k 1, guidance 1 and 3),
and the logits, margins and sampled ids it records along those paths."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dalle_flax import FlaxDalleMiniForConditionalGeneration
from dalle_flax.generation.sampling import apply_guidance, top_p_mask

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


# ------------------------------------------- logits, margins and sampled ids along the fixture paths
TOLERANCE = {"atol": 1e-4, "rtol": 1e-4}  # the READMEs' suggestion for float32 logits


def _teacher_forced(model, ids, mask, sequences):
  """(b, n, v) logits of every step, the decoder fed ``sequences`` (b, 1 + n) up to that step."""
  return np.asarray(model(ids, mask, sequences[:, :-1]).logits)


def _guided_teacher_forced(model, expected, sequences, scale):
  """``u + s (c - u)`` of the teacher-forced logits, as the fixtures' ``*_combined_logits_tf``."""
  cond = _teacher_forced(model, expected["input_ids"], expected["attention_mask"], sequences)
  uncond = _teacher_forced(model, expected["input_ids_uncond"], expected["attention_mask_uncond"], sequences)
  return np.asarray(apply_guidance(jnp.asarray(cond), jnp.asarray(uncond), jnp.float32(scale)))


def _margins(logits):
  """top1 - top2 per step, as the fixtures' ``*_margins``."""
  top2 = np.sort(logits, axis=-1)[..., -2:]
  return top2[..., 1] - top2[..., 0]


@pytest.mark.parametrize("trace", [True, False])
def test_guided_logits_of_every_step_match_the_original(loaded, trace):
  """The logits generate() decides on (guidance 3, before warping) are the original's combined ones."""
  model, expected = loaded
  steps = {}

  def record(sequences, logits, cur_len):  # cur_len = position + 1, traced under jit
    jax.debug.callback(lambda n, x: steps.__setitem__(int(n), np.asarray(x)), cur_len, logits)
    return logits

  out = model.generate(
      expected["input_ids"], expected["attention_mask"], negative_prompt_ids=expected["input_ids_uncond"],
      negative_prompt_attention_mask=expected["attention_mask_uncond"], top_k=1, guidance_scale=3.0,
      suppress_tokens=[], logits_processor=[record], trace=trace)
  jax.effects_barrier()
  np.testing.assert_array_equal(np.asarray(out.sequences), expected["topk1_cs3"])  # the same path
  combined = expected["topk1_cs3_combined_logits_tf"]  # (b, n, v)
  assert sorted(steps) == list(range(1, combined.shape[1] + 1))
  got = np.stack([steps[n] for n in sorted(steps)], axis=1)
  np.testing.assert_allclose(got[:, 0], combined[:, 0], **TOLERANCE)  # the first step, then all
  np.testing.assert_allclose(got, combined, **TOLERANCE)


def test_teacher_forced_logits_and_margins_match_the_original(loaded):
  model, expected = loaded
  greedy = expected["greedy_cs1"]
  logits = _teacher_forced(model, expected["input_ids"], expected["attention_mask"], greedy)
  assert bool(expected["greedy_cs1_tf_argmax_matches"])
  np.testing.assert_array_equal(np.argmax(logits, axis=-1), greedy[:, 1:])
  np.testing.assert_allclose(_margins(logits), expected["greedy_cs1_margins"], **TOLERANCE)

  guided_path = expected["topk1_cs3"]
  combined = _guided_teacher_forced(model, expected, guided_path, 3.0)
  np.testing.assert_allclose(combined, expected["topk1_cs3_combined_logits_tf"], **TOLERANCE)
  assert bool(expected["topk1_cs3_tf_argmax_matches"])
  np.testing.assert_array_equal(np.argmax(combined, axis=-1), guided_path[:, 1:])
  np.testing.assert_allclose(_margins(combined), expected["topk1_cs3_margins"], **TOLERANCE)


def test_bart2021_seed_teacher_forced_margins():
  model, expected = _load("bart2021-seed")
  greedy = expected["greedy"]
  logits = _teacher_forced(model, expected["input_ids"], expected["attention_mask"], greedy)
  assert bool(expected["greedy_tf_argmax_matches"])
  np.testing.assert_array_equal(np.argmax(logits, axis=-1), greedy[:, 1:])
  np.testing.assert_allclose(_margins(logits), expected["greedy_margins"], **TOLERANCE)


def _original_draws(logits, seed, *, top_k, top_p=1.0, temperature=1.0):
  """The ids the original samples from the (b, n, v) logits of its n steps (README "Sampling RNG").

  transformers 4.25's Flax sampler: at each step ``key, next = split(key)``, then temperature,
  top-k, top-p and one ``categorical(key, logits)`` over the whole batch, under jax 0.4.13's
  threefry (not partitionable). Our generate() draws with a key per image and step instead, so its
  sampled ids differ by design; replaying this schedule over our logits checks those logits along
  a sampled path, and our top-p nucleus against transformers', draw for draw.
  """
  if not hasattr(jax, "threefry_partitionable"):
    pytest.skip("this jax cannot switch threefry_partitionable off, which the original's draws need")
  key = jax.random.PRNGKey(seed)
  tokens = []
  with jax.threefry_partitionable(False):
    for step in range(logits.shape[1]):
      step_key, key = jax.random.split(key)
      scores = jnp.asarray(logits[:, step]) / temperature
      kth = jax.lax.top_k(scores, top_k)[0][:, -1:]  # transformers' top-k warper: the rest to -inf
      scores = jnp.where(scores < kth, -jnp.inf, scores)
      if top_p < 1.0:
        scores = top_p_mask(scores, jnp.float32(top_p))
      tokens.append(np.asarray(jax.random.categorical(step_key, scores, axis=-1)))
  return np.stack(tokens, axis=1)


@pytest.mark.parametrize(
    "name, scale, draws",
    [("sample_topk8_cs3_key42", 3.0, {"seed": 42, "top_k": 8}),
     # top_k None in the original's call: the config default, 50
     ("sample_default_topk_topp0.9_temp0.7_cs1_key7", 1.0,
      {"seed": 7, "top_k": 50, "top_p": 0.9, "temperature": 0.7})],
    ids=["top_k_8_guidance_3", "top_p_0.9_temperature_0.7"])
def test_sampled_ids_replay_over_our_logits(loaded, name, scale, draws):
  model, expected = loaded
  sampled = expected[name]
  if scale != 1.0:
    logits = _guided_teacher_forced(model, expected, sampled, scale)
  else:
    logits = _teacher_forced(model, expected["input_ids"], expected["attention_mask"], sampled)
  np.testing.assert_array_equal(_original_draws(logits, **draws), sampled[:, 1:])


def test_bart2021_seed_sampled_ids_replay_over_our_logits():
  model, expected = _load("bart2021-seed")
  sampled = expected["sample_app2021_key42"]  # the 2021 app's call: top_k the config default, 50
  logits = _teacher_forced(model, expected["input_ids"], expected["attention_mask"], sampled)
  np.testing.assert_array_equal(_original_draws(logits, 42, top_k=50), sampled[:, 1:])
