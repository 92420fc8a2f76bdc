"""generate() mechanics with a fake model (flax lm1b style): keys, guidance, settings, retracing;
the text length and batch independence also on a tiny random DalleBart."""

import logging
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

from dalle_flax import DalleBartConfig, FlaxDalleMiniForConditionalGeneration
from dalle_flax.convert.scan import unscan_params
from dalle_flax.generation import GenerationMixin, apply_guidance, sample_token, top_p_mask
from dalle_flax.generation.sampling import SamplingKnobs
from dalle_flax.generation.seeds import image_seeds
from dalle_flax.modeling_flax_utils import flatten_params, unflatten_params

VOCAB = 10  # ids 0..7 are "codes", 8 is the start token, 9 is eos/pad
LENGTH = 6
TRACES = {"decode_step": 0}


@struct.dataclass
class FakeCache:
  bias: jax.Array  # (rows, vocab): fixed per row, from the "encoder"


class FakeModel(GenerationMixin):
  """Predicts logits = one_hot(token + 1) * 5 + bias(prompt) + position wobble."""

  def __init__(self):
    self.config = SimpleNamespace(
        image_vocab_size=VOCAB - 1, image_length=LENGTH, max_text_length=4,
        decoder_start_token_id=8, bos_token_id=9, eos_token_id=9, pad_token_id=9, do_sample=True)
    self.params = {"w": jnp.linspace(-1.0, 1.0, VOCAB)}

  def _require_params(self, params):
    return self.params if params is None else params

  def encode(self, input_ids, attention_mask, params):
    return (input_ids * attention_mask)[..., None].astype(jnp.float32)  # (b, t, 1)

  def init_cache(self, params, encoder_out, text_mask):
    total = encoder_out[..., 0].sum(-1, keepdims=True)  # (rows, 1)
    return FakeCache(bias=jnp.sin(total * params["w"]))

  def decode_step(self, params, token, position, cache):
    TRACES["decode_step"] += 1
    logits = jax.nn.one_hot((token + 1) % VOCAB, VOCAB) * 5.0 + cache.bias
    return logits + 0.1 * jnp.cos(position * params["w"]), cache


@pytest.fixture
def model():
  return FakeModel()


IDS = np.array([[0, 5, 6, 2], [0, 7, 2, 1], [0, 3, 3, 2]], np.int32)
MASK = (IDS != 1).astype(np.int32)


def test_shapes_and_start_token(model):
  out = model.generate(IDS, MASK, seed=0)
  assert out.sequences.shape == (3, 1 + LENGTH) and out.sequences.dtype == jnp.int32
  assert (np.asarray(out.sequences[:, 0]) == 8).all()
  assert out.image_tokens.shape == (3, LENGTH)
  out = model.generate(IDS, MASK, seed=0, num_return_sequences=2)
  assert out.sequences.shape == (6, 1 + LENGTH)


def test_default_suppresses_undecodable_ids(model):
  for seed in range(5):
    tokens = np.asarray(model.generate(IDS, MASK, seed=seed, top_k=0, temperature=5.0).image_tokens)
    assert tokens.max() < 8
  assert model.generation_config.suppress_tokens == [8, 9]


def test_greedy_equals_top_k_1(model):
  greedy = model.generate(IDS, MASK, do_sample=False).sequences
  top1 = model.generate(IDS, MASK, top_k=1, seed=3).sequences
  np.testing.assert_array_equal(greedy, top1)
  # the fake model predicts token + 1 whenever that id is allowed
  seq = np.asarray(greedy)[:, 1:]
  follows = (seq[:, 1:] == seq[:, :-1] + 1) | (seq[:, :-1] + 1 >= 8)
  assert follows.all()


def test_eos_then_pad_bookkeeping(model):
  # with nothing suppressed the fake model walks 8 -> 9 (eos) -> pad ...
  seq = np.asarray(model.generate(IDS, MASK, do_sample=False, suppress_tokens=[]).sequences)
  assert (seq[:, 1] == 9).all() and (seq[:, 2:] == 9).all()


def test_seeds_and_batch_independence(model):
  a = np.asarray(model.generate(IDS, MASK, seed=1, temperature=3.0).sequences)
  b = np.asarray(model.generate(IDS, MASK, seed=1, temperature=3.0).sequences)
  c = np.asarray(model.generate(IDS, MASK, seed=2, temperature=3.0).sequences)
  np.testing.assert_array_equal(a, b)
  assert (a != c).any()
  # image i with per-image seeds does not depend on the other images of the call
  seeds = [11, 12, 13]
  together = np.asarray(model.generate(IDS, MASK, seed=seeds, temperature=3.0).sequences)
  for i in range(3):
    alone = np.asarray(model.generate(IDS[i : i + 1], MASK[i : i + 1], seed=[seeds[i]], temperature=3.0).sequences)
    np.testing.assert_array_equal(alone[0], together[i])
  # a single key: image i uses fold_in(key, i), so prefixes of the batch agree
  key = jax.random.key(5)
  full = np.asarray(model.generate(IDS, MASK, prng_key=key, temperature=3.0).sequences)
  first = np.asarray(model.generate(IDS[:1], MASK[:1], prng_key=key, temperature=3.0).sequences)
  np.testing.assert_array_equal(first[0], full[0])


def test_guidance_matches_hand_computed_logits(model):
  params = model.params
  cond_cache = model.init_cache(params, model.encode(jnp.asarray(IDS[:1]), jnp.asarray(MASK[:1]), params), None)
  neg = np.array([[0, 2, 1, 1]], np.int32)
  uncond_cache = model.init_cache(params, model.encode(jnp.asarray(neg), (neg != 1).astype(np.int32), params), None)
  token, expected = jnp.array([8]), [8]
  for position in range(LENGTH):
    lc, _ = model.decode_step(params, token, position, cond_cache)
    lu, _ = model.decode_step(params, token, position, uncond_cache)
    guided = lu + 3.0 * (lc - lu)
    guided = guided.at[:, 8:].set(-jnp.inf)
    token = jnp.argmax(guided, axis=-1)
    expected.append(int(token[0]))
  got = model.generate(IDS[:1], MASK[:1], do_sample=False, guidance_scale=3.0).sequences
  assert list(np.asarray(got[0])) == expected
  alias = model.generate(IDS[:1], MASK[:1], do_sample=False, condition_scale=3.0,
                         input_ids_uncond=neg, attention_mask_uncond=(neg != 1).astype(np.int32)).sequences
  np.testing.assert_array_equal(alias, got)


def test_no_retrace_when_scalars_change(model):
  model.generate(IDS, MASK, seed=0, temperature=1.0, guidance_scale=3.0, top_p=0.9)
  before = TRACES["decode_step"]
  for temperature, scale, top_p in [(0.5, 10.0, 0.5), (2.0, 1.5, 1.0), (0.7, 4.0, 0.95)]:
    model.generate(IDS, MASK, seed=1, temperature=temperature, guidance_scale=scale, top_p=top_p)
  assert TRACES["decode_step"] == before


def test_trace_false_matches_jit(model):
  jitted = model.generate(IDS, MASK, seed=4, guidance_scale=2.0, temperature=2.0).sequences
  eager = model.generate(IDS, MASK, seed=4, guidance_scale=2.0, temperature=2.0, trace=False).sequences
  np.testing.assert_array_equal(jitted, eager)


def test_callback_chunks_do_not_change_tokens(model):
  calls = []
  plain = model.generate(IDS, MASK, seed=9, temperature=2.0).sequences
  chunked = model.generate(IDS, MASK, seed=9, temperature=2.0, callback_steps=4,
                           callback=lambda s, t: calls.append((s, t.shape))).sequences
  np.testing.assert_array_equal(plain, chunked)
  assert calls == [(4, (3, 4)), (6, (3, 6))]


def test_logits_processor_is_applied(model):
  def only_code_3(sequences, logits, cur_len):
    return jnp.where(jnp.arange(VOCAB) == 3, logits, -jnp.inf)

  seq = np.asarray(model.generate(IDS, MASK, seed=0, logits_processor=[only_code_3]).image_tokens)
  assert (seq == 3).all()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"temperature": 0.0}, ValueError, "temperature must be a finite number > 0"),
        ({"top_p": 1.5}, ValueError, r"top_p must be in \(0, 1\]"),
        ({"top_k": -1}, ValueError, "top_k must be an int >= 0"),
        ({"foo": 1}, TypeError, r"unknown argument\(s\) \['foo'\]"),
        ({"do_sample": False, "num_return_sequences": 2}, ValueError, "num_return_sequences"),
        ({"num_beams": 4}, ValueError, "Beam search is not supported"),
        ({"max_length": 3}, ValueError, "max_length must be 1 \\+ image_length"),
        ({"guidance_scale": float("nan")}, ValueError, "guidance_scale must be a finite number"),
        ({"seed": 1, "prng_key": jax.random.key(0)}, ValueError, "either prng_key or seed"),
        ({"condition_scale": 2.0, "guidance_scale": 3.0}, ValueError, "Got both 'condition_scale'"),
    ],
)
def test_invalid_settings_raise(model, kwargs, error, match):
  with pytest.raises(error, match=match):
    model.generate(IDS, MASK, **kwargs)


def test_bad_inputs_raise(model):
  with pytest.raises(ValueError, match="max_text_length is 4"):
    model.generate(np.zeros((1, 5), np.int32))
  with pytest.raises(ValueError, match="integer array"):
    model.generate(np.zeros((1, 4), np.float32))


def test_top_p_mask_keeps_crossing_token():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  kept = np.isfinite(np.asarray(top_p_mask(logits, jnp.float32(0.7))))
  assert kept.tolist() == [[True, True, False, False]]
  kept = np.isfinite(np.asarray(top_p_mask(logits, jnp.float32(0.1))))
  assert kept.tolist() == [[True, False, False, False]]


def test_sample_token_respects_top_k():
  logits = jnp.tile(jnp.arange(10.0), (64, 1))
  keys = jax.random.split(jax.random.key(0), 64)
  knobs = SamplingKnobs(jnp.float32(100.0), jnp.float32(1.0), jnp.float32(1.0))
  tokens = np.asarray(sample_token(keys, logits, knobs, top_k=3))
  assert set(tokens.tolist()) <= {7, 8, 9} and len(set(tokens.tolist())) == 3


def test_apply_guidance_formula():
  c, u = jnp.array([2.0]), jnp.array([1.0])
  assert float(apply_guidance(c, u, jnp.float32(10.0))[0]) == 11.0


def test_legacy_beam_settings_are_dropped():
  from dalle_flax.generation import default_generation_config

  config = FakeModel().config
  legacy = {"num_beams": 4, "no_repeat_ngram_size": 3, "length_penalty": 2.0, "do_sample": False,
            "max_length": 142, "min_length": 56, "top_k": 8}
  generation_config = default_generation_config(config, legacy)
  assert generation_config.num_beams in (None, 1)
  assert generation_config.no_repeat_ngram_size in (None, 0)
  assert generation_config.do_sample is False and generation_config.top_k == 8
  assert generation_config.max_length == LENGTH + 1 and generation_config.min_length is None


# ------------------------------------------------------- one text length: images do not depend on the batch
def padded_prompts(lengths, text_length):
  """(b, text_length) ids ``<s> 3 4 5 ... </s> <pad>...`` with ``lengths`` real tokens, and their mask."""
  ids = np.full((len(lengths), text_length), 1, np.int32)
  for row, length in enumerate(lengths):
    ids[row, :length] = np.arange(length) % 5 + 3
    ids[row, 0], ids[row, length - 1] = 0, 2
  return ids, (ids != 1).astype(np.int32)


def spy_encoder_inputs(model):
  """Records every (ids, mask) the encoder gets, as numpy arrays (runs eagerly: nothing is traced)."""
  seen = []
  encode = model.encode

  def spy_encode(input_ids, attention_mask, params=None):
    seen.append((np.asarray(input_ids), np.asarray(attention_mask)))
    return encode(input_ids, attention_mask, params=params)

  model.encode = spy_encode
  return seen


def tiny_dallebart(**overrides):
  """A tiny DalleBart with numpy-noise parameters (nothing to compile for init)."""
  settings = dict(
      d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
      encoder_ffn_dim=48, decoder_ffn_dim=48, encoder_vocab_size=50, image_vocab_size=20, image_length=8,
      max_text_length=40, dropout=0.0, gradient_checkpointing=False)
  config = DalleBartConfig(**{**settings, **overrides})
  model = FlaxDalleMiniForConditionalGeneration(config, _do_init=False)
  rng = np.random.default_rng(0)
  model.params = jax.tree.map(lambda leaf: jnp.asarray(0.3 * rng.standard_normal(leaf.shape), leaf.dtype),
                              model.params_shape_tree)
  return model


def test_every_prompt_is_encoded_at_max_text_length(model):
  seen = spy_encoder_inputs(model)
  short_ids, short_mask = IDS[:, :3].copy(), MASK[:, :3].copy()
  short = model.generate(short_ids, short_mask, seed=1, guidance_scale=3.0,
                         negative_prompt_ids=np.array([[0, 2]], np.int32)).sequences
  assert [ids.shape for ids, _ in seen] == [(3, 4), (1, 4)]  # prompts, then the shared negative prompt
  np.testing.assert_array_equal(seen[0][0][:, 3], [1, 1, 1])  # padded with <pad> ...
  np.testing.assert_array_equal(seen[0][1][:, 3], [0, 0, 0])  # ... masked out
  padded = np.pad(short_ids, ((0, 0), (0, 1)), constant_values=1)
  np.testing.assert_array_equal(short, model.generate(padded, (padded != 1).astype(np.int32), seed=1,
                                                      guidance_scale=3.0).sequences)


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_image_regenerated_alone_is_identical_at_realistic_lengths(guidance_scale):
  """``seed=out.seeds[i]`` gives image i again bit for bit, whatever the other prompts' lengths."""
  model = tiny_dallebart(max_text_length=64)
  ids, mask = padded_prompts([5, 23, 61], 64)  # short, medium and nearly full prompts in one batch
  seen = spy_encoder_inputs(model)
  kwargs = dict(guidance_scale=guidance_scale, temperature=2.0, top_k=0)
  batch = model.generate(ids, mask, seed=7, num_return_sequences=2, **kwargs)
  tokens = np.asarray(batch.sequences)
  assert len(batch.seeds) == 6 and len(set(batch.seeds)) == 6
  batch_rows = seen[0][0]
  for i, image_seed in enumerate(batch.seeds):
    prompt = i // 2
    alone = model.generate(ids[prompt:prompt + 1, :mask[prompt].sum() + 3], mask[prompt:prompt + 1, :mask[prompt].sum() + 3],
                           seed=image_seed, **kwargs)
    np.testing.assert_array_equal(seen[-1 - (guidance_scale != 1.0)][0][0], batch_rows[i])  # same encoder input
    np.testing.assert_array_equal(np.asarray(alone.sequences)[0], tokens[i])
    assert alone.seeds == [image_seed]


def test_no_trimming_for_sinkformer_either():
  # Sinkformer attention normalises over padded queries too: its encoding depends on the padding,
  # which is why every prompt gets the same length
  model = tiny_dallebart(max_text_length=16, sinkhorn_iters=3)
  seen = spy_encoder_inputs(model)
  ids, mask = padded_prompts([3], 8)
  model.generate(ids, mask, seed=0)
  assert seen[0][0].shape == (1, 16)


def test_scanned_model_decodes_through_unrolled_layers(caplog):
  ids, mask = padded_prompts([5, 7], 40)
  scanned = tiny_dallebart(use_scan=True)
  unrolled = tiny_dallebart(use_scan=False)
  unrolled.params = unflatten_params(unscan_params(flatten_params(scanned.params)))
  params, was_unrolled = scanned._decoding_params(scanned.params)
  assert was_unrolled and "FlaxBartDecoderLayer_1" in str(jax.tree_util.tree_structure(params))
  assert "FlaxBartEncoderLayers" in str(jax.tree_util.tree_structure(params))  # the encoder stays stacked
  decoding = scanned.decoding()
  assert decoding.decode_step.module.spec.unrolled_decoder and decoding.init_cache.module.spec.unrolled_decoder
  for kwargs in ({"do_sample": False}, {"seed": 4, "guidance_scale": 3.0, "temperature": 2.0}):
    with caplog.at_level(logging.WARNING, logger="dalle_flax.modeling_flax_dalle_mini"):
      got = np.asarray(scanned.generate(ids, mask, **kwargs).sequences)
    np.testing.assert_array_equal(got, unrolled.generate(ids, mask, **kwargs).sequences)
  eager = scanned.generate(ids, mask, do_sample=False, trace=False).sequences  # the Python loop too
  np.testing.assert_array_equal(eager, unrolled.generate(ids, mask, do_sample=False).sequences)
  assert not [r for r in caplog.records if "use_scan=False" in r.getMessage()]  # ... so no warning


def test_scanned_postln_with_a_last_scale_decodes_scanned_and_warns_once(caplog):
  ids, mask = padded_prompts([5], 40)
  model = tiny_dallebart(use_scan=True, ln_positions="postln")
  flat = flatten_params(model.params)
  key = next(k for k in flat if k.startswith("model/decoder/layers/FlaxBartDecoderLayers/") and k.endswith("_2/scale"))
  flat[key] = flat[key].at[-1].set(2.0)  # the unrolled layout has no scale there: cannot unroll
  model.params = unflatten_params(flat)
  assert model._decoding_params(model.params)[1] is False
  with caplog.at_level(logging.WARNING, logger="dalle_flax.modeling_flax_dalle_mini"):
    model.generate(ids, mask, do_sample=False)
    out = model.generate(ids, mask, do_sample=False).sequences
  assert out.shape == (1, 1 + model.config.image_length)
  warnings = [r for r in caplog.records if "use_scan=False" in r.getMessage()]
  assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING


def test_trace_false_runs_eagerly(model):
  seen = []

  def record(sequences, logits, cur_len):
    seen.append(isinstance(logits, jax.core.Tracer))
    float(logits[0, 0])  # a debugging print / breakpoint works on concrete values only
    return logits

  eager = model.generate(IDS, MASK, seed=3, logits_processor=[record], trace=False).sequences
  assert len(seen) == LENGTH and not any(seen)
  jitted = model.generate(IDS, MASK, seed=3, logits_processor=[lambda s, lg, c: seen.append(1) or lg]).sequences
  np.testing.assert_array_equal(eager, jitted)


def test_trace_false_runs_the_real_model_without_jit():
  model = tiny_dallebart()
  ids, mask = padded_prompts([5], 40)
  jit_flags = []

  def record(sequences, logits, cur_len):
    jit_flags.append(bool(jax.config.jax_disable_jit))  # the model's step ran under the same flag
    return logits

  eager = model.generate(ids, mask, seed=2, guidance_scale=3.0, logits_processor=[record], trace=False)
  assert jit_flags == [True] * model.config.image_length
  np.testing.assert_array_equal(eager.sequences, model.generate(ids, mask, seed=2, guidance_scale=3.0).sequences)


def test_num_return_sequences_gives_distinct_images(model):
  out = model.generate(IDS[:1], MASK[:1], seed=0, num_return_sequences=4, temperature=5.0, top_k=0)
  rows = {tuple(row) for row in np.asarray(out.image_tokens)}
  assert len(rows) == 4


def test_generate_seed_means_the_same_as_per_image_seeds():
  model = FakeModel()
  kwargs = dict(temperature=3.0, top_k=0)
  out = model.generate(IDS, MASK, seed=5, num_return_sequences=2, **kwargs)
  assert out.seeds == image_seeds(5, 6)
  explicit = model.generate(IDS, MASK, seed=image_seeds(5, 6), num_return_sequences=2, **kwargs)
  np.testing.assert_array_equal(out.sequences, explicit.sequences)
  first = model.generate(IDS[:1], MASK[:1], seed=5, **kwargs)  # image 0 of seed=s is seed s
  np.testing.assert_array_equal(first.sequences[0], out.sequences[0])
  np.testing.assert_array_equal(model.generate(IDS[:1], MASK[:1], seed=[5], **kwargs).sequences, first.sequences)
  assert model.generate(IDS, MASK, prng_key=jax.random.key(0)).seeds is None


@pytest.mark.parametrize("seed, match", [
    ([-1, 0, 1], r"seed\[0\] must be an int in \[0, 2\*\*32\), got -1"),
    ([0, 1, 2**32], r"seed\[2\] must be an int in \[0, 2\*\*32\), got 4294967296"),
    (-1, r"seed must be an int in \[0, 2\*\*32\), got -1"),
    (2**40, r"seed must be an int in \[0, 2\*\*32\)"),
    ([0.5, 1, 2], r"seed\[0\] must be an int"),
    ([True, 1, 2], r"seed\[0\] must be an int"),
    ([1, 2], r"expected 3"),
    ([[1], [2], [3]], "flat list of 3 ints"),
    ("0", "seed must be an int or a list of ints"),
])
def test_bad_seeds_raise_clear_errors(seed, match):
  with pytest.raises((ValueError, TypeError), match=match):
    FakeModel().generate(IDS, MASK, seed=seed)
