"""The native CPU kernels (small-batch matmul, one-query attention): numbers, dispatch, build cache,
fallback, use in generate()."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dalle_flax import DalleBartConfig, FlaxDalleMiniForConditionalGeneration, kernels

needs_kernel = pytest.mark.skipif(not kernels.kernels_available(),
                                  reason="the native kernel does not build here (no C++ compiler)")


def _uses_kernel(fn, *args) -> bool:
  return kernels.MATMUL_TARGET in str(jax.make_jaxpr(fn)(*args))


@pytest.fixture
def fresh_kernel_state():
  """Lets a test rebuild or break the kernel, then restores the process-wide state."""
  saved = dict(kernels._state)
  kernels._state.clear()
  yield
  kernels._state.clear()
  kernels._state.update(saved)


@needs_kernel
@pytest.mark.parametrize("rows,k,n", [(1, 5, 3), (2, 1024, 1000), (3, 333, 77), (8, 64, 17), (16, 130, 9),
                                      (5, 7, 8), (1, 1, 1), (16, 2, 40), (2, 300, 33)])
def test_small_matmul_matches_float64_reference(rows, k, n):
  rng = np.random.default_rng(rows * 1000 + k + n)
  x = rng.standard_normal((rows, k), dtype=np.float32)
  w = rng.standard_normal((k, n), dtype=np.float32)
  got = np.asarray(jax.jit(kernels.small_matmul)(x, w))
  want = x.astype(np.float64) @ w.astype(np.float64)
  assert got.shape == (rows, n) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.sqrt(k))


@needs_kernel
def test_small_matmul_is_bitwise_reproducible_and_handles_empty_contraction():
  rng = np.random.default_rng(0)
  x, w = rng.standard_normal((4, 777), dtype=np.float32), rng.standard_normal((777, 300), dtype=np.float32)
  fn = jax.jit(kernels.small_matmul)
  first = np.asarray(fn(x, w))
  for _ in range(3):
    assert np.array_equal(np.asarray(fn(x, w)), first)  # fixed chunking: no thread-timing effects
  empty = np.asarray(fn(np.ones((2, 0), np.float32), np.ones((0, 5), np.float32)))
  assert np.array_equal(empty, np.zeros((2, 5), np.float32))


@needs_kernel
def test_kernel_inside_scan_and_jit():
  rng = np.random.default_rng(1)
  w = jnp.asarray(rng.standard_normal((64, 64), dtype=np.float32) / 8)
  x = jnp.asarray(rng.standard_normal((2, 64), dtype=np.float32))

  def run(mm):
    return jax.jit(lambda x: jax.lax.scan(lambda h, _: (jnp.tanh(mm(h, w)), None), x, None, length=5)[0])(x)

  np.testing.assert_allclose(run(kernels.small_matmul), run(jnp.matmul), rtol=1e-5, atol=1e-6)


@needs_kernel
def test_dot_general_dispatch():
  rng = np.random.default_rng(2)
  w = rng.standard_normal((32, 24), dtype=np.float32)
  dims = (((2,), (0,)), ((), ()))
  dot = kernels.small_batch_dot_general
  x = rng.standard_normal((4, 1, 32), dtype=np.float32)  # a decode step: 4 rows, one position
  assert _uses_kernel(lambda a, b: dot(a, b, dims), x, w)
  np.testing.assert_allclose(dot(x, w, dims), jax.lax.dot_general(x, w, dims), rtol=1e-5, atol=1e-5)
  # everything else is XLA's dot, unchanged
  many = rng.standard_normal((kernels.MAX_ROWS + 1, 1, 32), dtype=np.float32)
  assert not _uses_kernel(lambda a, b: dot(a, b, dims), many, w)
  assert not _uses_kernel(lambda a, b: dot(a, b, dims), x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
  batched = (((2,), (1,)), ((0,), (0,)))
  xb, wb = rng.standard_normal((2, 1, 32), dtype=np.float32), rng.standard_normal((2, 32, 5), dtype=np.float32)
  assert not _uses_kernel(lambda a, b: dot(a, b, batched), xb, wb)
  np.testing.assert_array_equal(dot(xb, wb, batched), jax.lax.dot_general(xb, wb, batched))


def test_small_matmul_rejects_bad_inputs():
  with pytest.raises(ValueError, match=r"needs x \(M, K\) and w \(K, N\), got \(2, 3\) and \(4, 5\)"):
    kernels.small_matmul(jnp.ones((2, 3)), jnp.ones((4, 5)))
  with pytest.raises(ValueError, match="float32 only"):
    kernels.small_matmul(jnp.ones((2, 3), jnp.bfloat16), jnp.ones((3, 5), jnp.bfloat16))
  with pytest.raises(ValueError, match=f"1 to {kernels.MAX_ROWS} rows, got 17"):
    kernels.small_matmul(jnp.ones((17, 3)), jnp.ones((3, 5)))


@needs_kernel
def test_build_is_cached_atomic_and_reports_compiler_errors(tmp_path):
  first = kernels.build_kernels(cache_dir=tmp_path)
  stamp = first.stat().st_mtime_ns
  assert kernels.build_kernels(cache_dir=tmp_path) == first  # cached: not rebuilt
  assert first.stat().st_mtime_ns == stamp
  assert sorted(p.name for p in tmp_path.iterdir()) == [first.name]  # no temp files left
  with pytest.raises(RuntimeError, match="compiling the native kernels failed"):
    kernels.build_kernels(cache_dir=tmp_path / "other", compiler="/bin/false")
  assert not any((tmp_path / "other").iterdir())


def test_unavailable_kernel_falls_back_with_one_warning(fresh_kernel_state, monkeypatch, caplog):
  def broken(*args, **kwargs):
    raise RuntimeError("no C++ compiler found (set $CXX, or install g++ or clang++)")

  monkeypatch.setattr(kernels, "build_kernels", broken)
  with caplog.at_level(logging.WARNING, logger="dalle_flax.kernels"):
    assert not kernels.kernels_available()
    assert not kernels.kernels_available()
  warnings = [r for r in caplog.records if "native CPU kernels unavailable" in r.getMessage()]
  assert len(warnings) == 1 and "no C++ compiler found" in warnings[0].getMessage()
  x, w = np.ones((2, 1, 8), np.float32), np.ones((8, 3), np.float32)
  dims = (((2,), (0,)), ((), ()))
  assert not _uses_kernel(lambda a, b: kernels.small_batch_dot_general(a, b, dims), x, w)
  np.testing.assert_array_equal(kernels.small_batch_dot_general(x, w, dims), np.full((2, 1, 3), 8.0))


def test_environment_switch_turns_kernels_off(fresh_kernel_state, monkeypatch):
  monkeypatch.setattr(kernels, "build_kernels", lambda *a, **k: pytest.fail("must not build"))
  monkeypatch.setenv(kernels.ENV_SWITCH, "0")
  assert not kernels.native_kernels_enabled()
  assert not kernels.kernels_available()
  monkeypatch.setenv(kernels.ENV_SWITCH, "1")
  assert kernels.native_kernels_enabled()


def _tiny_model(**overrides) -> FlaxDalleMiniForConditionalGeneration:
  config = DalleBartConfig(**{
      **dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
             encoder_ffn_dim=48, decoder_ffn_dim=48, encoder_vocab_size=50, image_vocab_size=20, image_length=8,
             max_text_length=6, dropout=0.0, use_scan=False),
      **overrides})
  model = FlaxDalleMiniForConditionalGeneration(config, _do_init=False)
  rng = np.random.default_rng(0)
  model.params = jax.tree.map(lambda leaf: jnp.asarray(0.3 * rng.standard_normal(leaf.shape), leaf.dtype),
                              model.params_shape_tree)
  return model


@needs_kernel
def test_generate_uses_the_kernel_and_matches_xla(monkeypatch):
  model = _tiny_model()
  ids = np.array([[0, 5, 6, 7, 2, 1], [0, 9, 2, 1, 1, 1]], np.int32)
  mask = (ids != 1).astype(np.int32)
  assert model.decoding().native

  encoder_out = model.encode(ids, mask)
  cache = model.init_cache(model.params, jnp.concatenate([encoder_out] * 2), jnp.concatenate([mask] * 2))
  token, position = jnp.array([20, 20, 20, 20], jnp.int32), jnp.int32(0)
  native_logits, native_cache = model.native_decode_step(model.params, token, position, cache)
  logits, new_cache = model.decode_step(model.params, token, position, cache)
  np.testing.assert_allclose(native_logits, logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(native_cache.self_key[0], new_cache.self_key[0], rtol=1e-5, atol=1e-5)
  step = jax.jit(model.native_decode_step)
  assert kernels.MATMUL_TARGET in step.lower(model.params, token, position, cache).as_text()

  kwargs = {"do_sample": False, "guidance_scale": 3.0}
  with_kernel = np.asarray(model.generate(ids, mask, **kwargs).sequences)
  monkeypatch.setenv(kernels.ENV_SWITCH, "0")
  assert not model.decoding().native
  without = np.asarray(model.generate(ids, mask, **kwargs).sequences)
  np.testing.assert_array_equal(with_kernel, without)



def _attention_reference(q, k, v, mask, scale):
  logits = np.einsum("bhd,bhsd->bhs", q.astype(np.float64), k.astype(np.float64)) * scale
  logits = np.where(mask[:, None, :], logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  return np.einsum("bhs,bhsd->bhd", weights / weights.sum(-1, keepdims=True), v.astype(np.float64))


@needs_kernel
@pytest.mark.parametrize("b,h,s,d", [(2, 16, 256, 64), (3, 4, 37, 20), (1, 1, 1, 8), (4, 2, 9, 128), (2, 3, 64, 32),
                                     (1, 2, 11, 5)])
def test_decode_attention_matches_float64_reference(b, h, s, d):
  rng = np.random.default_rng(b * 1000 + s + d)
  q = rng.standard_normal((b, h, d), dtype=np.float32)
  k = rng.standard_normal((b, h, s, d), dtype=np.float32)
  v = rng.standard_normal((b, h, s, d), dtype=np.float32)
  fn = jax.jit(kernels.decode_attention, static_argnums=4)
  for mask in (rng.random((b, s)) < 0.6,  # scattered (text padding)
               np.arange(s)[None].repeat(b, 0) <= rng.integers(0, s, (b, 1)),  # a filled cache prefix
               np.ones((b, s), bool)):
    mask[:, 0] = True  # at least one visible key per row
    got = np.asarray(fn(q, k, v, mask, 0.3))
    assert got.shape == (b, h, d) and got.dtype == np.float32
    np.testing.assert_allclose(got, _attention_reference(q, k, v, mask, 0.3), rtol=2e-5, atol=2e-6)
  # large logits: the softmax is shifted by the max (no overflow), tiny weights underflow to 0
  big = np.asarray(fn(q * 40, k, v, np.ones((b, s), bool), 1.0))
  np.testing.assert_allclose(big, _attention_reference(q * 40, k, v, np.ones((b, s), bool), 1.0),
                             rtol=1e-4, atol=1e-5)


@needs_kernel
def test_decode_attention_skips_masked_slots_and_gives_nan_without_keys():
  rng = np.random.default_rng(3)
  q, k, v = (rng.standard_normal(shape, dtype=np.float32) for shape in ((2, 4, 16), (2, 4, 10, 16), (2, 4, 10, 16)))
  mask = np.zeros((2, 10), bool)
  mask[0, :4] = True
  poisoned_k, poisoned_v = k.copy(), v.copy()
  poisoned_k[:, :, 4:], poisoned_v[:, :, 4:] = np.nan, np.inf  # masked slots are never read
  out = np.asarray(kernels.decode_attention(q, poisoned_k, poisoned_v, mask, 0.25))
  np.testing.assert_allclose(out[0], _attention_reference(q[:1], k[:1], v[:1], mask[:1], 0.25)[0], rtol=2e-5, atol=2e-6)
  assert np.isnan(out[1]).all()  # as jax.nn.softmax over all -inf
  xla = np.asarray(jax.nn.softmax(jnp.full((4,), -jnp.inf)))
  assert np.isnan(xla).all()


@needs_kernel
def test_decode_attention_is_bitwise_reproducible_and_rejects_bad_inputs():
  rng = np.random.default_rng(4)
  q, k, v = (rng.standard_normal(shape, dtype=np.float32) for shape in ((8, 16, 64), (8, 16, 256, 64),
                                                                        (8, 16, 256, 64)))
  mask = np.ones((8, 256), bool)
  fn = jax.jit(kernels.decode_attention, static_argnums=4)
  first = np.asarray(fn(q, k, v, mask, 0.125))
  for _ in range(3):
    assert np.array_equal(np.asarray(fn(q, k, v, mask, 0.125)), first)  # one thread per (b, h)
  with pytest.raises(ValueError, match="mask"):
    kernels.decode_attention(q, k, v, mask[:, :10], 0.1)
  with pytest.raises(ValueError, match="q \\(B, H, D\\)"):
    kernels.decode_attention(q[:, :3], k, v, mask, 0.1)
  with pytest.raises(ValueError, match="float32 only"):
    kernels.decode_attention(q.astype(jnp.bfloat16), k, v, mask, 0.1)


def test_one_query_attention_dispatch(fresh_kernel_state, monkeypatch):
  rng = np.random.default_rng(5)
  q, k, v = (rng.standard_normal(shape, dtype=np.float32) for shape in ((2, 3, 8), (2, 3, 6, 8), (2, 3, 6, 8)))
  mask = np.arange(6)[None].repeat(2, 0) < np.array([[2], [6]])
  want = _attention_reference(q, k, v, mask, 0.5)

  def uses(*args):  # a new function each time: make_jaxpr caches traces per function
    return kernels.ATTENTION_TARGET in str(jax.make_jaxpr(lambda *a: kernels.one_query_attention(*a, 0.5))(*args))

  if kernels.kernels_available():
    assert uses(q, k, v, mask)
    np.testing.assert_allclose(kernels.one_query_attention(q, k, v, mask, 0.5), want, rtol=1e-5, atol=1e-6)
  bf16 = [jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)]
  assert kernels.one_query_attention(*bf16, mask, 0.5) is None  # float32 only: the caller's einsum path
  monkeypatch.setenv(kernels.ENV_SWITCH, "0")
  kernels._state.clear()
  assert kernels.one_query_attention(q, k, v, mask, 0.5) is None  # switched off: the caller's einsum path


@needs_kernel
def test_native_decode_step_in_bfloat16_is_the_xla_step():
  config = _tiny_model().config
  model = FlaxDalleMiniForConditionalGeneration(config, dtype=jnp.bfloat16, _do_init=False)
  model.params = _tiny_model().params
  ids = np.array([[0, 5, 6, 7, 2, 1]], np.int32)
  mask = (ids != 1).astype(np.int32)
  cache = model.init_cache(model.params, model.encode(ids, mask), mask)
  token, position = jnp.array([20], jnp.int32), jnp.int32(0)
  lowered = jax.jit(model.native_decode_step).lower(model.params, token, position, cache).as_text()
  assert kernels.ATTENTION_TARGET not in lowered and kernels.MATMUL_TARGET not in lowered
  np.testing.assert_array_equal(model.native_decode_step(model.params, token, position, cache)[0],
                                model.decode_step(model.params, token, position, cache)[0])


@needs_kernel
@pytest.mark.parametrize("overrides,native_attention", [
    ({}, True),
    ({"use_cosine_attention": True, "use_head_scale": True, "ln_positions": "normformer"}, True),
    ({"use_swin_position_embeddings": True, "ln_positions": "swinv2", "use_scan": False}, False),
])
def test_native_decode_steps_match_xla_over_a_filled_cache(overrides, native_attention):
  model = _tiny_model(**overrides)
  ids = np.array([[0, 5, 6, 7, 2, 1], [0, 9, 2, 1, 1, 1]], np.int32)
  mask = (ids != 1).astype(np.int32)
  cache = model.init_cache(model.params, model.encode(ids, mask), mask)
  native_cache = cache
  step, native_step = jax.jit(model.decode_step), jax.jit(model.native_decode_step)
  lowered = native_step.lower(model.params, jnp.zeros((2,), jnp.int32), jnp.int32(0), cache).as_text()
  assert (kernels.ATTENTION_TARGET in lowered) == native_attention  # Swin's position bias: einsum path
  tokens = jnp.array([20, 20], jnp.int32)
  for position in range(model.config.image_length):
    logits, cache = step(model.params, tokens, jnp.int32(position), cache)
    native_logits, native_cache = native_step(model.params, tokens, jnp.int32(position), native_cache)
    np.testing.assert_allclose(native_logits, logits, rtol=1e-4, atol=1e-4)
    tokens = jnp.argmax(logits, -1).astype(jnp.int32) % 20  # the same inputs to both
