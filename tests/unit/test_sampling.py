"""The sampler's statistics, driven by a fake model with a known distribution (flax lm1b style).

The fake ``decode_step`` returns the same logits at every position, ``log [0.5, 0.3, 0.15, 0.05]``
over 4 ids, so the law of every draw is known in closed form. Draws use fixed keys (the tests are
deterministic) and thousands of rows in one call; each bound is one that a correct sampler passes
by a wide margin and a broken one (temperature ignored, top-p not applied, one key reused at every
step) fails by orders of magnitude.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dalle_flax.generation.loop import LoopSpec, SampleState, run_steps
from dalle_flax.generation.sampling import (
  SamplingKnobs,
  apply_guidance,
  greedy_token,
  sample_token,
)

PROBS = np.array([0.5, 0.3, 0.15, 0.05])
LOGITS = np.log(PROBS).astype(np.float32)  # (v,)
VOCAB = PROBS.size
DRAWS = 8192
# Pearson chi-square with at most 3 degrees of freedom: P(X > 30) is about 1e-6 for a correct
# sampler; every broken sampler below scores in the hundreds or thousands.
CHI2_BOUND = 30.0

_sample = jax.jit(sample_token, static_argnames="top_k")
_run = jax.jit(run_steps, static_argnames=("spec", "num_steps", "scan"))


def knobs(temperature=1.0, top_p=1.0, guidance_scale=1.0):
  return SamplingKnobs(jnp.float32(temperature), jnp.float32(top_p), jnp.float32(guidance_scale))


def draw_counts(seed, *, top_k=0, **settings):
  """How often each id comes out of DRAWS independent draws from LOGITS."""
  keys = jax.random.split(jax.random.key(seed), DRAWS)
  logits = jnp.broadcast_to(jnp.asarray(LOGITS), (DRAWS, VOCAB))
  tokens = np.asarray(_sample(keys, logits, knobs(**settings), top_k=top_k))
  return np.bincount(tokens, minlength=VOCAB)


def warped(temperature=1.0, top_k=0, nucleus=None):
  """The law a correct sampler draws from: softmax(logits / T) over the top-k ids, renormalised
  over ``nucleus`` (the ids top-p keeps) when given."""
  probs = np.exp(LOGITS.astype(np.float64) / temperature)
  if top_k:
    probs[np.argsort(-LOGITS)[top_k:]] = 0.0
  if nucleus is not None:
    probs[[i for i in range(VOCAB) if i not in nucleus]] = 0.0
  return probs / probs.sum()


def chi_square(counts, probs):
  """Pearson's statistic; a draw of an id with probability 0 makes it infinite."""
  if counts[probs == 0].any():
    return np.inf
  expected = counts.sum() * probs[probs > 0]
  return float((((counts[probs > 0] - expected) ** 2) / expected).sum())


# ------------------------------------------------------------------------------------------ top-p
# The nucleus is the smallest set of most likely ids whose mass reaches top_p, so the id that
# crosses top_p is in it (transformers' FlaxTopPLogitsWarper); the mass is that of the distribution
# after temperature and top-k (top-p masks the already renormalised top-k logits).
NUCLEI = [
    # top_k, temperature, top_p, nucleus
    (0, 1.0, 0.4, {0}),                # 0.5 alone reaches 0.4
    (0, 1.0, 0.6, {0, 1}),             # 0.5 < 0.6: the crossing id 1 is kept
    (0, 1.0, 0.75, {0, 1}),            # 0.8 reaches 0.75, id 2 is not needed
    (0, 1.0, 0.9, {0, 1, 2}),
    (0, 1.0, 1.0, {0, 1, 2, 3}),       # top_p = 1 keeps every id
    (3, 1.0, 0.82, {0, 1}),            # top-3 mass of ids 0, 1 is 0.8 / 0.95 = 0.84 >= 0.82
    (2, 1.0, 0.6, {0}),                # top-2: id 0 has 0.5 / 0.8 = 0.625 >= 0.6
    (3, 1.0, 0.9, {0, 1, 2}),
    (4, 1.0, 0.75, {0, 1}),            # the top-k path with every id
    (0, 10.0, 0.75, {0, 1, 2}),        # flattened first: 0.28 + 0.26 + 0.24 crosses 0.75
    (3, 10.0, 0.75, {0, 1, 2}),
    (0, 0.5, 0.6, {0}),                # sharpened first: 0.68 alone reaches 0.6
]


@pytest.mark.parametrize("top_k, temperature, top_p, nucleus", NUCLEI)
def test_top_p_draws_only_and_all_of_the_nucleus(top_k, temperature, top_p, nucleus):
  counts = draw_counts(1, top_k=top_k, temperature=temperature, top_p=top_p)
  drawn = set(np.flatnonzero(counts).tolist())
  assert drawn == nucleus, f"drew {sorted(drawn)}, nucleus {sorted(nucleus)} (counts {counts.tolist()})"
  assert chi_square(counts, warped(temperature, top_k, nucleus)) < CHI2_BOUND


def test_top_p_keeps_the_crossing_id_with_its_share():
  # nucleus {0, 1} renormalised: 0.625 / 0.375, not 1 / 0 (crossing id dropped) nor 0.5 / 0.3 / ...
  counts = draw_counts(2, top_p=0.6)
  np.testing.assert_allclose(counts / DRAWS, [0.625, 0.375, 0.0, 0.0], atol=0.03)


# ------------------------------------------------------------------------------------ temperature
@pytest.mark.parametrize("top_k", [0, 3, 4])
@pytest.mark.parametrize("temperature", [1.0, 0.5, 10.0])
def test_temperature_warps_the_distribution(top_k, temperature):
  counts = draw_counts(3, top_k=top_k, temperature=temperature)
  assert chi_square(counts, warped(temperature, top_k)) < CHI2_BOUND, counts.tolist()


@pytest.mark.parametrize("top_k", [0, 3])
def test_low_temperature_concentrates_on_the_argmax(top_k):
  # T = 0.1: P(id 0) = 1 / (1 + 0.6 ** 10 + ...) > 0.99; without temperature it is about 0.5
  counts = draw_counts(4, top_k=top_k, temperature=0.1)
  assert counts[0] / DRAWS > 0.98, counts.tolist()


@pytest.mark.parametrize("top_k", [0, 4])
def test_high_temperature_flattens_towards_uniform(top_k):
  # T = 10: the law is [0.28, 0.26, 0.24, 0.22]; untempered it would be [0.5, 0.3, 0.15, 0.05]
  freqs = draw_counts(5, top_k=top_k, temperature=10.0) / DRAWS
  np.testing.assert_allclose(freqs, 0.25, atol=0.06)


# ---------------------------------------------------------------------------------------- greedy
def test_greedy_token_is_the_argmax_lowest_id_on_ties():
  logits = jnp.array([[0.1, 2.0, -1.0, 2.0], [3.0, 3.0, 3.0, 3.0], [-5.0, -4.0, -3.0, -2.0]])
  assert greedy_token(logits).tolist() == [1, 0, 3]
  assert greedy_token(logits).dtype == jnp.int32


# ------------------------------------------------------------------------- the loop with a fake step
def fixed_decode_step(params, token, position, cache):
  """A model whose next-token law is PROBS whatever the token and position."""
  return jnp.broadcast_to(params["logits"], (token.shape[0], VOCAB)), cache


def guided_decode_step(params, token, position, cache):
  """Rows [:b] get the conditional logits, rows [b:] the unconditional ones."""
  b = token.shape[0] // 2
  cond = jnp.broadcast_to(params["cond"], (b, VOCAB))
  uncond = jnp.broadcast_to(params["uncond"], (b, VOCAB))
  return jnp.concatenate([cond, uncond]), cache


def make_state(row_keys, length, rows=None):
  b = row_keys.shape[0]
  rows = b if rows is None else rows
  return SampleState(
      token=jnp.zeros((b,), jnp.int32), sequences=jnp.zeros((b, 1 + length), jnp.int32),
      finished=jnp.zeros((b,), bool), cache=jnp.zeros((rows,), jnp.float32), row_keys=row_keys)


def spec(decode_step=fixed_decode_step, *, do_sample=True, top_k=0, guidance=False, processors=()):
  return LoopSpec(decode_step=decode_step, do_sample=do_sample, top_k=top_k, guidance=guidance,
                  eos_token_id=None, pad_token_id=0, logits_processors=processors)


PARAMS = {"logits": jnp.asarray(LOGITS)}
NO_BIAS = jnp.zeros((VOCAB,), jnp.float32)


def sample_rows(row_keys, length, *, start=0, settings=None, top_k=0):
  state = make_state(row_keys, start + length)
  out = _run(spec(top_k=top_k), PARAMS, state, knobs(**(settings or {})), NO_BIAS, jnp.int32(start), length)
  return np.asarray(out.sequences[:, 1 + start:])  # (b, length)


def test_every_step_draws_with_a_fresh_key():
  # reusing one key per row at every step would make each row constant (the law never changes)
  tokens = sample_rows(jax.random.split(jax.random.key(6), 16), 64)
  distinct = [len(set(row.tolist())) for row in tokens]
  assert min(distinct) >= 3, distinct
  # and the 16 x 64 draws together follow the model's law
  assert chi_square(np.bincount(tokens.ravel(), minlength=VOCAB), PROBS) < CHI2_BOUND


@pytest.mark.parametrize("top_k", [0, 3])
def test_step_t_draws_with_fold_in_of_the_row_key(top_k):
  # SampleState's contract: position t samples with fold_in(row_key, t), t absolute (here from 10)
  row_keys = jax.random.split(jax.random.key(7), 5)
  tokens = sample_rows(row_keys, 12, start=10, settings={"temperature": 2.0}, top_k=top_k)
  logits = jnp.broadcast_to(jnp.asarray(LOGITS), (5, VOCAB))
  for t in range(12):
    keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, 10 + t)
    expected = _sample(keys, logits, knobs(temperature=2.0), top_k=top_k)
    np.testing.assert_array_equal(tokens[:, t], expected, err_msg=f"position {10 + t}")


def test_each_row_has_its_own_stream():
  base = jax.random.split(jax.random.key(8), 4)
  row_keys = base[jnp.array([0, 1, 2, 0, 3, 1])]  # rows 0 and 3, 1 and 5 share a key
  tokens = sample_rows(row_keys, 64)
  np.testing.assert_array_equal(tokens[0], tokens[3])
  np.testing.assert_array_equal(tokens[1], tokens[5])
  for i, j in [(0, 1), (0, 2), (0, 4), (1, 2), (1, 4), (2, 4)]:
    assert (tokens[i] != tokens[j]).any(), f"rows {i} and {j} have different keys but equal tokens"
  # a row's tokens do not depend on the other rows of the batch
  np.testing.assert_array_equal(sample_rows(row_keys[2:3], 64)[0], tokens[2])


def test_greedy_loop_takes_the_argmax_at_every_step():
  state = make_state(jax.random.split(jax.random.key(9), 3), 8)
  out = _run(spec(do_sample=False), PARAMS, state, knobs(), NO_BIAS, jnp.int32(0), 8)
  assert (np.asarray(out.sequences[:, 1:]) == 0).all()


# --------------------------------------------------------------------------------------- guidance
def test_apply_guidance_is_uncond_plus_scale_times_difference():
  cond, uncond = jnp.array([2.0, 0.5, -1.0]), jnp.array([1.0, 1.5, -1.0])
  np.testing.assert_array_equal(apply_guidance(cond, uncond, jnp.float32(3.0)), [4.0, -1.5, -1.0])
  rng = np.random.default_rng(0)
  cond, uncond = rng.normal(size=(2, 2, 16)).astype(np.float32)
  for scale in (0.0, 1.0, 3.0, 10.5):
    np.testing.assert_allclose(apply_guidance(cond, uncond, jnp.float32(scale)),
                               uncond + np.float32(scale) * (cond - uncond), rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(apply_guidance(cond, uncond, jnp.float32(0.0)), uncond)


# cond argmax 0, uncond argmax 0, guided (scale 3) argmax 1: u + 3 (c - u) = [1, 2.7, 0, 0]
GUIDED_PARAMS = {"cond": jnp.array([1.0, 0.9, 0.0, 0.0]), "uncond": jnp.array([1.0, 0.0, 0.0, 0.0])}


def test_loop_decides_on_the_guided_logits():
  seen = []

  def record(sequences, logits, cur_len):
    seen.append(np.asarray(logits))
    return logits

  state = make_state(jax.random.split(jax.random.key(10), 2), 4, rows=4)
  out = run_steps(spec(guided_decode_step, do_sample=False, guidance=True, processors=(record,)),
                  GUIDED_PARAMS, state, knobs(guidance_scale=3.0), NO_BIAS, jnp.int32(0), 4, scan=False)
  assert (np.asarray(out.sequences[:, 1:]) == 1).all()
  np.testing.assert_allclose(np.stack(seen), np.broadcast_to([1.0, 2.7, 0.0, 0.0], (4, 2, VOCAB)), rtol=1e-6)


def test_guided_sampling_follows_the_guided_law():
  # u uniform, c = log PROBS, scale 2: guided logits 2 log p - log(1/4), a law proportional to p ** 2
  params = {"cond": jnp.asarray(LOGITS), "uncond": jnp.full((VOCAB,), np.log(0.25), jnp.float32)}
  b = 4096
  state = make_state(jax.random.split(jax.random.key(11), b), 1, rows=2 * b)
  out = _run(spec(guided_decode_step, guidance=True), params, state, knobs(guidance_scale=2.0), NO_BIAS,
             jnp.int32(0), 1)
  counts = np.bincount(np.asarray(out.sequences[:, 1]), minlength=VOCAB)
  assert chi_square(counts, PROBS**2 / (PROBS**2).sum()) < CHI2_BOUND, counts.tolist()
