"""The key of image i of a call (dalle_flax.generation.seeds): one definition for generate(),
the pipeline, the CLI and the web demo (generate()'s use of it: test_generation_loop.py)."""

import jax
import numpy as np
import pytest

from dalle_flax.generation.seeds import flatten_seeds, image_keys, image_seeds


def test_image_seeds_are_fixed_forever():
  # a seed printed today must reproduce its image tomorrow: these values never change
  assert image_seeds(7, 3) == [7, 369571992, 1009178997]
  assert image_seeds(0, 1) == [0]
  assert image_seeds(2**32 - 1, 2)[0] == 2**32 - 1


def test_flatten_seeds_forms():
  assert flatten_seeds(7, 1, 3) == image_seeds(7, 3)
  assert flatten_seeds([[1, 2], [3, 4]], 2, 2) == [1, 2, 3, 4]
  assert flatten_seeds(np.array([5, 6], np.uint32), 2, 1) == [5, 6]
  with pytest.raises(ValueError, match=r"expected 4 \(2 prompt\(s\) x 2 image\(s\) each\), got 3"):
    flatten_seeds([1, 2, 3], 2, 2)
  with pytest.raises(ValueError, match="2 lists of 2 ints"):
    flatten_seeds([[1, 2], [3]], 2, 2)
  with pytest.raises(TypeError, match="got str"):
    flatten_seeds("7", 1, 1)


def test_keys_of_images():
  seeds = image_seeds(3, 4)
  keys = image_keys(4, seeds=seeds)
  for i in range(4):
    np.testing.assert_array_equal(jax.random.key_data(keys[i]), jax.random.key_data(jax.random.key(seeds[i])))
  base = jax.random.key(9)
  folded = image_keys(3, prng_key=base)
  np.testing.assert_array_equal(jax.random.key_data(folded[2]), jax.random.key_data(jax.random.fold_in(base, 2)))
  raw = image_keys(3, prng_key=jax.random.PRNGKey(9))  # raw key data works the same
  np.testing.assert_array_equal(jax.random.key_data(raw), jax.random.key_data(folded))
  with pytest.raises(ValueError, match="one key or 3 keys"):
    image_keys(3, prng_key=jax.random.split(base, 2))
