"""DalleBart modules on tiny configs: every architecture option, cache == teacher forcing,
scan == unscan, remat, jit == no-jit, parameter trees and real-size parameter counts.

Parameters come from ``jax.eval_shape`` filled with numpy noise (scales near 1), so no test
pays for compiling ``init``; the initialisers are checked on one small module.
"""

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dalle_flax import DalleBartConfig, DecoderCache, FlaxDalleMiniForConditionalGeneration
from dalle_flax.convert import convert_bart2021_config, convert_bart2021_params, scan_params, unscan_params
from dalle_flax.layers_dalle_mini import Attention
from dalle_flax.modeling_flax_dalle_mini import model_spec
from dalle_flax.modeling_flax_utils import flatten_params, unflatten_params


def stacked(layers):
  """A cache field as one (layers, ...) array: stacked (scanned) or a per-layer tuple (unrolled)."""
  return jnp.stack(layers) if isinstance(layers, tuple) else layers


FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures"

TINY = dict(
    d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
    encoder_ffn_dim=48, decoder_ffn_dim=48, encoder_vocab_size=50, image_vocab_size=20, image_length=8,
    max_text_length=6, dropout=0.0, gradient_checkpointing=False,
)
TEXT_IDS = np.array([[0, 5, 6, 7, 2, 1], [0, 9, 2, 1, 1, 1]], np.int32)
TEXT_MASK = (TEXT_IDS != 1).astype(np.int32)
IMAGE_IDS = np.array([[20, 3, 4, 5, 6, 7, 8, 9], [20, 1, 2, 19, 4, 5, 6, 7]], np.int32)


def tiny_model(seed: int = 0, **overrides) -> FlaxDalleMiniForConditionalGeneration:
  """A tiny model with random parameters (noise, not ``init``: nothing to compile)."""
  model = FlaxDalleMiniForConditionalGeneration(DalleBartConfig(**{**TINY, **overrides}), _do_init=False)
  rng = np.random.default_rng(seed)

  def noise(path, leaf):
    if jax.tree_util.keystr(path).endswith("['scale']") or "head_scale" in jax.tree_util.keystr(path):
      return jnp.asarray(1 + 0.1 * rng.standard_normal(leaf.shape), leaf.dtype)
    return jnp.asarray(0.3 * rng.standard_normal(leaf.shape), leaf.dtype)

  model.params = jax.tree_util.tree_map_with_path(noise, model.params_shape_tree)
  return model


def teacher_forced_and_incremental(model, params, text_ids, text_mask, image_ids):
  """Teacher-forced logits (b, n, v), the same from n decode_steps in a lax.scan, final cache."""
  out = model(text_ids, text_mask, image_ids, params=params)
  cache = model.init_cache(params, out.encoder_last_hidden_state, text_mask)

  def step(cache, inputs):
    token, position = inputs  # position is traced: one compiled step serves every position
    logits, cache = model.decode_step(params, token, position, cache)
    return cache, logits

  cache, steps = jax.lax.scan(step, cache, (image_ids.T, jnp.arange(image_ids.shape[1])))
  return out.logits, jnp.swapaxes(steps, 0, 1), cache


# Together these cover every ln_positions, both norms, GLU/FFN, bias, head scale, cosine
# attention, the Swin bias (with and without absolute positions), sinkhorn, final norms,
# force_ln_scale, DeepNet/subln gains, seed-only options, scanned and unrolled stacks.
COMBOS = {
    "released-normformer-glu-scanned": {},
    "swinv2-rmsnorm-cosine-headscale-swinbias-smelu": dict(
        ln_positions="swinv2", ln_type="rmsnorm", use_cosine_attention=True, tau_init=0.1,
        use_head_scale=True, use_swin_position_embeddings=True, activation_function="smelu"),
    "cogview-ffn-bias-forcescale-sinkhorn-deepnet": dict(
        ln_positions="cogview", use_glu=False, use_bias=True, force_ln_scale=True, sinkhorn_iters=3,
        use_deepnet_scaling=True, activation_function="gelu_new"),
    "subln-rmsnorm-swinbias-nopositions-nofinalln": dict(
        ln_positions="subln", ln_type="rmsnorm", use_subln_init=True, use_scan=False, encoder_layers=1,
        decoder_layers=1, use_absolute_position_embeddings=False, use_swin_position_embeddings=True,
        use_final_ln_encoder=False, use_final_ln_decoder=False),
    "postln-seedlike": dict(ln_positions="postln", use_glu=False, use_bias=True, position_embedding_offset=2,
                            use_final_logits_bias=True, scale_embedding=True, decoder_max_position_embeddings=9,
                            encoder_max_position_embeddings=7, activation_function="relu"),
    "preln-unscanned": dict(ln_positions="preln", use_scan=False, encoder_layers=1, decoder_layers=1),
}


@pytest.mark.parametrize("combo", list(COMBOS))
def test_cache_decoding_equals_teacher_forcing(combo):
  model = tiny_model(**COMBOS[combo])
  full, steps, cache = jax.jit(teacher_forced_and_incremental, static_argnums=0)(
      model, model.params, TEXT_IDS, TEXT_MASK, IMAGE_IDS)
  assert full.shape == (2, 8, 21) and full.dtype == jnp.float32
  assert np.isfinite(np.asarray(full)).all() and float(jnp.std(full)) > 0.1
  # fp32 atol 1e-5 at unit logit scale (no final norm leaves logits of size ~50)
  np.testing.assert_allclose(steps, full, atol=1e-5 * max(1.0, float(jnp.abs(full).max())))
  assert int(cache.length) == 8
  positions = model.config.decoder_positions
  layers = model.config.decoder_layers
  assert stacked(cache.self_key).shape == (layers, 2, 4, positions, 8) and stacked(cache.cross_key).shape == (layers, 2, 4, 6, 8)


def test_decode_api_contract():
  model = tiny_model()
  params = model.params
  full = model(TEXT_IDS, TEXT_MASK, IMAGE_IDS).logits  # (b, n, v), same compile as the scan test
  encoder_out = model.encode(TEXT_IDS, TEXT_MASK)
  assert encoder_out.shape == (2, 6, 32)
  cache = model.init_cache(params, encoder_out, TEXT_MASK)
  assert isinstance(cache, DecoderCache) and int(cache.length) == 0
  assert cache.text_mask.dtype == jnp.bool_ and not bool(stacked(cache.self_key).any())
  start = jnp.full((2,), model.config.decoder_start_token_id, jnp.int32)
  logits, cache = model.decode_step(params, start, 0, cache)  # a Python int position works too
  assert logits.shape == (2, 21) and int(cache.length) == 1
  np.testing.assert_allclose(logits, full[:, 0], atol=1e-5)
  # decode() with a cache continues at cache.length (a chunk of 3 tokens)
  more, cache = model.decode(IMAGE_IDS[:, 1:4], cache=cache)
  assert int(cache.length) == 4 and not bool(stacked(cache.self_key)[:, :, :, 4:].any())  # only decoded slots written
  np.testing.assert_allclose(more, full[:, 1:4], atol=1e-5)
  # decode() without a cache is teacher forcing from position 0
  teacher, no_cache = model.decode(IMAGE_IDS, encoder_out, TEXT_MASK)
  assert no_cache is None
  np.testing.assert_allclose(teacher, full, atol=1e-5)
  # no decoder input: the start token alone
  ids = jax.ShapeDtypeStruct((2, 6), jnp.int32)
  assert jax.eval_shape(lambda p, i: model(i, params=p).logits, params, ids).shape == (2, 1, 21)
  with pytest.raises(ValueError, match="cannot decode 5 token.* at position 4: the cache holds 8"):
    model.decode_chunk(params, IMAGE_IDS[:, :5], 4, cache)
  with pytest.raises(ValueError, match="input_ids has length 7 but the model has 6 text positions"):
    model.encode(np.zeros((1, 7), np.int32))
  with pytest.raises(ValueError, match="decoder_input_ids has length 9 but the decoder has 8 positions"):
    model(TEXT_IDS, TEXT_MASK, np.zeros((2, 9), np.int32))
  with pytest.raises(ValueError, match="decoder_attention_mask is only supported without cache"):
    model.decode(IMAGE_IDS[:, :1], cache=cache, decoder_attention_mask=np.ones((2, 1)))


def test_jit_equals_no_jit():
  model = tiny_model(**COMBOS["preln-unscanned"])
  encoder_out = model.encode(TEXT_IDS, TEXT_MASK)
  cache = model.init_cache(model.params, encoder_out, TEXT_MASK)
  jitted, jitted_cache = model.decode_step(model.params, IMAGE_IDS[:, 0], 0, cache)
  with jax.disable_jit():
    eager, eager_cache = model.decode_step(model.params, IMAGE_IDS[:, 0], 0, cache)
  np.testing.assert_allclose(eager, jitted, atol=1e-5)
  np.testing.assert_allclose(stacked(eager_cache.self_key), stacked(jitted_cache.self_key), atol=1e-5)


def test_scan_unscan_conversion_keeps_numbers():
  scanned = tiny_model()
  unscanned = FlaxDalleMiniForConditionalGeneration(DalleBartConfig(**TINY, use_scan=False), _do_init=False)
  flat = flatten_params(scanned.params)
  converted = FlaxDalleMiniForConditionalGeneration.convert_checkpoint_params(dict(flat), unscanned.config)
  assert set(converted) == set(flatten_params(unscanned.params_shape_tree))
  back = FlaxDalleMiniForConditionalGeneration.convert_checkpoint_params(dict(converted), scanned.config)
  assert set(back) == set(flat) and all(np.array_equal(back[k], flat[k]) for k in flat)
  unscanned.params = unflatten_params(converted)
  np.testing.assert_allclose(unscanned(TEXT_IDS, TEXT_MASK, IMAGE_IDS).logits,
                             scanned(TEXT_IDS, TEXT_MASK, IMAGE_IDS).logits, atol=1e-5)


def test_remat_gives_same_values():
  plain, remat = tiny_model(), tiny_model(gradient_checkpointing=True)
  np.testing.assert_allclose(remat(TEXT_IDS, TEXT_MASK, IMAGE_IDS).logits,
                             plain(TEXT_IDS, TEXT_MASK, IMAGE_IDS).logits, atol=1e-6)

  def loss(model):
    return lambda p: model(TEXT_IDS, TEXT_MASK, IMAGE_IDS, params=p).logits.sum()

  # one remat per layer stack, and the backward pass recomputes the layers (more matmuls)
  assert str(jax.make_jaxpr(loss(remat))(plain.params)).count("remat") == 2
  assert "remat" not in str(jax.make_jaxpr(loss(plain))(plain.params))
  matmuls = [str(jax.make_jaxpr(jax.grad(loss(m)))(plain.params)).count("dot_general") for m in (plain, remat)]
  assert matmuls[1] > matmuls[0]


def test_dropout_only_in_train_mode():
  model = tiny_model(dropout=0.5, use_scan=False, encoder_layers=1, decoder_layers=1)
  key = jax.random.key(3)
  eval_logits = model(TEXT_IDS, TEXT_MASK, IMAGE_IDS).logits
  train_a = model(TEXT_IDS, TEXT_MASK, IMAGE_IDS, train=True, dropout_rng=key).logits
  train_b = model(TEXT_IDS, TEXT_MASK, IMAGE_IDS, train=True, dropout_rng=key).logits
  np.testing.assert_array_equal(train_a, train_b)
  assert float(jnp.abs(train_a - eval_logits).max()) > 1e-2
  with pytest.raises(ValueError, match="train=True applies dropout and needs dropout_rng"):
    model(TEXT_IDS, TEXT_MASK, IMAGE_IDS, train=True)


def test_dtypes():
  model = FlaxDalleMiniForConditionalGeneration(DalleBartConfig(**TINY), dtype=jnp.bfloat16,
                                                param_dtype=jnp.bfloat16, _do_init=False)
  assert {leaf.dtype for leaf in jax.tree.leaves(model.params_shape_tree)} == {jnp.dtype(jnp.bfloat16)}
  ids = jax.ShapeDtypeStruct((2, 6), jnp.int32)
  out = jax.eval_shape(lambda p, i: model(i, i, i, params=p), model.params_shape_tree, ids)
  assert out.logits.dtype == jnp.bfloat16


def test_config_from_dict_checks_model_type_and_overrides():
  load = FlaxDalleMiniForConditionalGeneration.config_from_dict
  assert load({"model_type": "dallebart", "d_model": 64, "encoder_attention_heads": 4,
               "decoder_attention_heads": 4}, use_scan=False).use_scan is False
  with pytest.raises(TypeError, match=r"unknown DalleBartConfig key\(s\) \['use_scann'\].*did you mean 'use_scan'"):
    load({"model_type": "dallebart"}, use_scann=False)
  with pytest.raises(ValueError, match="model_type 'vqgan'.*loads 'dallebart' checkpoints"):
    load({"model_type": "vqgan"})


# --------------------------------------------------------------------------- initialisation
def test_deepnet_and_subln_gains():
  n, m = 2, 2
  deepnet = model_spec(DalleBartConfig(**TINY, use_deepnet_scaling=True))
  assert deepnet.encoder.residual_gain == pytest.approx(0.81 * (n**4 * m) ** (1 / 16))
  assert deepnet.encoder.attention_init_gain == pytest.approx(0.87 * (n**4 * m) ** (-1 / 16))
  assert deepnet.decoder.residual_gain == pytest.approx((3 * m) ** 0.25)
  assert deepnet.decoder.cross_attention_init_gain == pytest.approx((12 * m) ** -0.25)
  subln = model_spec(DalleBartConfig(**TINY, use_subln_init=True))
  assert subln.encoder.ffn_init_gain == pytest.approx(math.sqrt(math.log(3 * m) * math.log(2 * n) / 3))
  assert subln.decoder.attention_init_gain == pytest.approx(math.sqrt(math.log(3 * m)))
  assert subln.decoder.cross_attention_init_gain == 1.0 and subln.decoder.residual_gain == 1.0
  assert model_spec(DalleBartConfig(**TINY)).decoder.attention_init_gain == 1.0

  # v_proj/out_proj are drawn from normal(init_std) * gain; q_proj/k_proj are not scaled
  spec = model_spec(DalleBartConfig(**{**TINY, "d_model": 256}, init_std=0.02, use_subln_init=True)).encoder
  x = jnp.zeros((1, 2, 256))
  params = Attention(spec, is_encoder=True).init(jax.random.key(0), x, method=lambda a, x: a.key_value(x))["params"]
  assert float(params["k_proj"]["kernel"].std()) == pytest.approx(0.02, rel=0.02)
  assert float(params["v_proj"]["kernel"].std()) == pytest.approx(0.02 * spec.attention_init_gain, rel=0.02)


# --------------------------------------------------------------------------- parameter trees
def _expected_tree(name):
  path = FIXTURES / name / "expected" / "param_tree.txt"
  if not path.is_file():
    pytest.skip(f"golden fixtures not found at {FIXTURES} (they live in ../shared beside the checkout)")
  rows = (line.rstrip("\n").split("\t") for line in path.read_text().splitlines())
  return {p: tuple(int(x) for x in s.strip("()").split(",") if x.strip()) for p, s, _ in rows}


@pytest.mark.parametrize(
    "name", ["dallebart-mini-like", "dallebart-variant-swinv2", "dallebart-variant-cogview", "bart2021-seed"])
def test_parameter_tree_snapshot_matches_fixture(name):
  expected = _expected_tree(name)
  config = FlaxDalleMiniForConditionalGeneration.config_from_dict(
      __import__("json").loads((FIXTURES / name / "config.json").read_text()))
  model = FlaxDalleMiniForConditionalGeneration(config, _do_init=False)
  ours = {k: tuple(v.shape) for k, v in flatten_params(model.params_shape_tree).items()}
  if name == "bart2021-seed":
    expected = convert_bart2021_params(expected)
  assert ours == expected


def test_swinv2_extra_norm_every_sixth_layer_and_postln_last_scale():
  shapes = FlaxDalleMiniForConditionalGeneration(
      DalleBartConfig(**{**TINY, "encoder_layers": 13}, ln_positions="swinv2"), _do_init=False).params_shape_tree
  layers = shapes["model"]["encoder"]["layers"]
  extra = [i for i in range(13) if "LayerNorm_1" in layers[f"FlaxBartEncoderLayer_{i}"]]
  assert extra == [5, 11] and set(layers["FlaxBartEncoderLayer_5"]["LayerNorm_1"]) == {"scale", "bias"}

  postln = FlaxDalleMiniForConditionalGeneration(
      DalleBartConfig(**TINY, ln_positions="postln", use_scan=False), _do_init=False).params_shape_tree
  decoder = postln["model"]["decoder"]["layers"]
  assert set(decoder["FlaxBartDecoderLayer_0"]["LayerNorm_2"]) == {"scale", "bias"}
  assert set(decoder["FlaxBartDecoderLayer_1"]["LayerNorm_2"]) == {"bias"}  # unrolled last layer
  assert "final_ln" not in postln["model"]["decoder"]
  # scanning fills that scale with ones; unscanning drops it again
  flat = {k: np.full(v.shape, 0.5, np.float32) for k, v in flatten_params(postln).items()}
  scanned = scan_params(flat)
  assert np.all(scanned["model/decoder/layers/FlaxBartDecoderLayers/LayerNorm_2/scale"][1] == 1)
  config = DalleBartConfig(**TINY, ln_positions="postln", use_scan=False)
  assert set(FlaxDalleMiniForConditionalGeneration.convert_checkpoint_params(scanned, config)) == set(flat)
  assert set(unscan_params(scanned)) == set(flat) | {"model/decoder/layers/FlaxBartDecoderLayer_1/LayerNorm_2/scale",
                                                     "model/encoder/layers/FlaxBartEncoderLayer_1/LayerNorm_1/scale"}
  with pytest.raises(ValueError, match="leaf 'LayerNorm_1/bias' is missing in layers"):
    scan_params(flatten_params(jax.tree.map(lambda s: np.zeros(s.shape), shapes)))


# --------------------------------------------------------------------------- real sizes
MINI_1 = dict(
    d_model=1024, encoder_layers=12, decoder_layers=12, encoder_attention_heads=16, decoder_attention_heads=16,
    encoder_ffn_dim=2730, decoder_ffn_dim=2730, encoder_vocab_size=50264, image_vocab_size=16384,
    image_length=256, max_text_length=64, bos_token_id=16385, eos_token_id=16385, pad_token_id=16385,
    decoder_start_token_id=16384, dropout=0.0, gradient_checkpointing=True, use_scan=True, init_std=0.02,
)
MEGA_1 = dict(MINI_1, d_model=2048, encoder_layers=24, decoder_layers=24, encoder_attention_heads=32,
              decoder_attention_heads=32, encoder_ffn_dim=4096, decoder_ffn_dim=4096, encoder_vocab_size=50272,
              image_vocab_size=16415, init_std=0.01)
# Reference §2.9 (released mini-1, scanned): every leaf and its shape.
_ENC, _DEC = "model/encoder/layers/FlaxBartEncoderLayers/", "model/decoder/layers/FlaxBartDecoderLayers/"
_ATTN = {f"{p}/kernel": (12, 1024, 1024) for p in ("q_proj", "k_proj", "v_proj", "out_proj")}
_GLU = {"GLU_0/LayerNorm_0/bias": (12, 1024), "GLU_0/Dense_0/kernel": (12, 1024, 2730),
        "GLU_0/Dense_1/kernel": (12, 1024, 2730), "GLU_0/LayerNorm_1/bias": (12, 2730),
        "GLU_0/Dense_2/kernel": (12, 2730, 1024)}
MINI_1_TREE = {
    "lm_head/kernel": (1024, 16385),
    "model/encoder/embed_tokens/embedding": (50264, 1024), "model/encoder/embed_positions/embedding": (64, 1024),
    "model/encoder/layernorm_embedding/scale": (1024,), "model/encoder/layernorm_embedding/bias": (1024,),
    "model/encoder/final_ln/bias": (1024,),
    "model/decoder/embed_tokens/embedding": (16385, 1024), "model/decoder/embed_positions/embedding": (256, 1024),
    "model/decoder/layernorm_embedding/scale": (1024,), "model/decoder/layernorm_embedding/bias": (1024,),
    "model/decoder/final_ln/bias": (1024,),
    **{_ENC + k: v for k, v in {"LayerNorm_0/bias": (12, 1024), "LayerNorm_1/scale": (12, 1024),
                                "LayerNorm_1/bias": (12, 1024), **{f"FlaxBartAttention_0/{a}": s for a, s in _ATTN.items()},
                                **_GLU}.items()},
    **{_DEC + k: v for k, v in {"LayerNorm_0/bias": (12, 1024), "LayerNorm_1/scale": (12, 1024),
                                "LayerNorm_1/bias": (12, 1024), "LayerNorm_2/bias": (12, 1024),
                                "LayerNorm_3/scale": (12, 1024), "LayerNorm_3/bias": (12, 1024),
                                **{f"FlaxBartAttention_0/{a}": s for a, s in _ATTN.items()},
                                **{f"FlaxBartAttention_1/{a}": s for a, s in _ATTN.items()}, **_GLU}.items()},
}
BART_LARGE_CNN_SEED = {
    "model_type": "bart", "vocab_size": 50264, "d_model": 1024, "encoder_layers": 12, "decoder_layers": 12,
    "encoder_attention_heads": 16, "decoder_attention_heads": 16, "encoder_ffn_dim": 4096,
    "decoder_ffn_dim": 4096, "max_position_embeddings": 1024, "activation_function": "gelu",
    "vocab_size_output": 16385, "max_position_embeddings_decoder": 257, "decoder_start_token_id": 16384,
    "bos_token_id": 16384, "eos_token_id": 16385, "pad_token_id": 1, "min_length": 257, "max_length": 257,
    "tie_word_embeddings": False, "scale_embedding": False, "dropout": 0.1,
}


def _shapes(config):
  tree = FlaxDalleMiniForConditionalGeneration(config, _do_init=False).params_shape_tree
  return {k: tuple(v.shape) for k, v in flatten_params(tree).items()}


def test_real_size_parameter_counts():
  mini = _shapes(DalleBartConfig(**MINI_1))
  assert mini == MINI_1_TREE and len(mini) == 42
  assert sum(math.prod(s) for s in mini.values()) == 437_833_712
  mini_unscanned = _shapes(DalleBartConfig(**{**MINI_1, "use_scan": False}))
  assert len(mini_unscanned) == 383 and sum(math.prod(s) for s in mini_unscanned.values()) == 437_833_712
  mega = _shapes(DalleBartConfig(**MEGA_1))
  assert len(mega) == 42 and sum(math.prod(s) for s in mega.values()) == 2_587_521_024
  assert mega["lm_head/kernel"] == (2048, 16416) and mega[_ENC + "GLU_0/Dense_0/kernel"] == (24, 2048, 4096)
  seed = _shapes(convert_bart2021_config(BART_LARGE_CNN_SEED))
  assert len(seed) == 514 and sum(math.prod(s) for s in seed.values()) == 439_077_889
  assert seed["final_logits_bias"] == (1, 16385) and seed["model/decoder/embed_positions/embedding"] == (259, 1024)
  assert seed["model/encoder/embed_positions/embedding"] == (1026, 1024)
