"""The native CPU small-batch matmul: numbers, dispatch, build cache, fallback, use in generate()."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dalle_flax import DalleBartConfig, FlaxDalleMiniForConditionalGeneration, kernels

needs_kernel = pytest.mark.skipif(not kernels.small_matmul_available(),
                                  reason="the native kernel does not build here (no C++ compiler)")


def _uses_kernel(fn, *args) -> bool:
  return kernels.TARGET in str(jax.make_jaxpr(fn)(*args))


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
  first = kernels.build_small_matmul(cache_dir=tmp_path)
  stamp = first.stat().st_mtime_ns
  assert kernels.build_small_matmul(cache_dir=tmp_path) == first  # cached: not rebuilt
  assert first.stat().st_mtime_ns == stamp
  assert sorted(p.name for p in tmp_path.iterdir()) == [first.name]  # no temp files left
  with pytest.raises(RuntimeError, match="compiling the small-matmul kernel failed"):
    kernels.build_small_matmul(cache_dir=tmp_path / "other", compiler="/bin/false")
  assert not any((tmp_path / "other").iterdir())


def test_unavailable_kernel_falls_back_with_one_warning(fresh_kernel_state, monkeypatch, caplog):
  def broken(*args, **kwargs):
    raise RuntimeError("no C++ compiler found (set $CXX, or install g++ or clang++)")

  monkeypatch.setattr(kernels, "build_small_matmul", broken)
  with caplog.at_level(logging.WARNING, logger="dalle_flax.kernels"):
    assert not kernels.small_matmul_available()
    assert not kernels.small_matmul_available()
  warnings = [r for r in caplog.records if "native CPU kernels unavailable" in r.getMessage()]
  assert len(warnings) == 1 and "no C++ compiler found" in warnings[0].getMessage()
  x, w = np.ones((2, 1, 8), np.float32), np.ones((8, 3), np.float32)
  dims = (((2,), (0,)), ((), ()))
  assert not _uses_kernel(lambda a, b: kernels.small_batch_dot_general(a, b, dims), x, w)
  np.testing.assert_array_equal(kernels.small_batch_dot_general(x, w, dims), np.full((2, 1, 3), 8.0))


def test_environment_switch_turns_kernels_off(fresh_kernel_state, monkeypatch):
  monkeypatch.setattr(kernels, "build_small_matmul", lambda *a, **k: pytest.fail("must not build"))
  monkeypatch.setenv(kernels.ENV_SWITCH, "0")
  assert not kernels.native_kernels_enabled()
  assert not kernels.small_matmul_available()
  monkeypatch.setenv(kernels.ENV_SWITCH, "1")
  assert kernels.native_kernels_enabled()


def _tiny_model() -> FlaxDalleMiniForConditionalGeneration:
  config = DalleBartConfig(
      d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
      encoder_ffn_dim=48, decoder_ffn_dim=48, encoder_vocab_size=50, image_vocab_size=20, image_length=8,
      max_text_length=6, dropout=0.0, use_scan=False)
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
  assert model._loop_decode_step(model.params) == model.native_decode_step

  encoder_out = model.encode(ids, mask)
  cache = model.init_cache(model.params, jnp.concatenate([encoder_out] * 2), jnp.concatenate([mask] * 2))
  token, position = jnp.array([20, 20, 20, 20], jnp.int32), jnp.int32(0)
  native_logits, native_cache = model.native_decode_step(model.params, token, position, cache)
  logits, new_cache = model.decode_step(model.params, token, position, cache)
  np.testing.assert_allclose(native_logits, logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(native_cache.self_key[0], new_cache.self_key[0], rtol=1e-5, atol=1e-5)
  step = jax.jit(model.native_decode_step)
  assert kernels.TARGET in step.lower(model.params, token, position, cache).as_text()

  kwargs = {"do_sample": False, "guidance_scale": 3.0}
  with_kernel = np.asarray(model.generate(ids, mask, **kwargs).sequences)
  monkeypatch.setenv(kernels.ENV_SWITCH, "0")
  assert model._loop_decode_step(model.params) == model.decode_step
  without = np.asarray(model.generate(ids, mask, **kwargs).sequences)
  np.testing.assert_array_equal(with_kernel, without)

