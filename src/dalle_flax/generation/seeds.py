"""The key of image ``i`` of a call: the one definition ``generate()``, the pipeline, the CLI and
the web demo share.

Example: ``image_seeds(7, 3) -> [7, 369571992, 1009178997]``.

A call that makes n images (prompt-major: all images of prompt 0, then of prompt 1, ...) gives
image ``i``:

* with ``seed=s`` (an int): the seed ``image_seeds(s, n)[i]``, that is ``s`` itself for image 0
  and a hash of ``(s, i)`` for the others;
* with ``seed=[s_0, ..., s_{n-1}]`` (one int per image): the seed ``s_i``;
* with ``prng_key=k`` (one jax key): no seed, the key ``fold_in(k, i)``;

and an image with seed ``s_i`` is sampled with the key ``jax.random.key(s_i)``; decode step ``t``
draws with ``fold_in(key, t)``. An image's key never depends on the batch it is sampled in, so
``seed=out.seeds[i]`` regenerates image ``i`` alone (``generate()`` also encodes every prompt at
the same text length, so nothing else depends on the batch either). The derivation must never
change: it is what makes a seed printed yesterday reproduce its image today.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["SEED_LIMIT", "check_seed", "flatten_seeds", "image_keys", "image_seeds"]

SEED_LIMIT = 2**32  # seeds are uint32, as jax.random.key's


def check_seed(seed: Any, name: str = "seed") -> int:
  """``seed`` as a Python int, or a ValueError naming the accepted range."""
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < SEED_LIMIT:
    raise ValueError(f"{name} must be an int in [0, 2**32), got {seed!r}.")
  return int(seed)


def image_seeds(seed: int, num_images: int) -> list[int]:
  """Per-image seeds of a call with ``seed=seed``: ``seed`` for image 0, then hashes of (seed, i).

  Args:
    seed: an int in [0, 2**32).
    num_images: how many images the call makes (all prompts, prompt-major).

  Returns:
    ``num_images`` ints in [0, 2**32), the same on every machine (numpy ``SeedSequence``).
  """
  seed = check_seed(seed)
  return [seed] + [int(np.random.SeedSequence([seed, i]).generate_state(1, np.uint32)[0])
                   for i in range(1, num_images)]


def flatten_seeds(seed: Any, num_prompts: int, num_images: int) -> list[int]:
  """The seed of every image of a call, prompt-major.

  Args:
    seed: an int (expanded with :func:`image_seeds`), a flat list with one seed per image, or a
      list per prompt (as a pipeline's ``out.seeds``).
    num_prompts: b prompts in the call.
    num_images: n images per prompt.

  Returns:
    b * n seeds.
  """
  if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
    return image_seeds(int(seed), num_prompts * num_images)
  if isinstance(seed, np.ndarray):
    seed = seed.tolist()
  if not isinstance(seed, (list, tuple)):
    raise TypeError(f"seed must be an int or a list of ints, got {type(seed).__name__}.")
  if seed and all(isinstance(s, (list, tuple)) for s in seed):
    if len(seed) != num_prompts or any(len(s) != num_images for s in seed):
      raise ValueError(
          f"seed given per prompt must be {num_prompts} lists of {num_images} ints (as "
          f"out.seeds), got lengths {[len(s) for s in seed]}."
      )
    seed = [s for per_prompt in seed for s in per_prompt]
  if len(seed) != num_prompts * num_images:
    raise ValueError(
        f"seed lists one seed per image: expected {num_prompts * num_images} ({num_prompts} "
        f"prompt(s) x {num_images} image(s) each), got {len(seed)}."
    )
  return [check_seed(s, f"seed[{i}]") for i, s in enumerate(seed)]


def image_keys(num_images: int, *, seeds: Sequence[int] | None = None, prng_key: Any = None) -> jax.Array:
  """(num_images,) typed keys: ``key(seeds[i])``, or ``fold_in(prng_key, i)``.

  Args:
    num_images: images in the call.
    seeds: one checked seed per image (from :func:`flatten_seeds`).
    prng_key: one typed key (``jax.random.key``) or raw key data (``jax.random.PRNGKey``), or
      ``num_images`` of them (used as they are).
  """
  if seeds is not None:
    return jax.vmap(jax.random.key)(jnp.asarray(np.asarray(seeds, np.uint32)))
  key = prng_key
  if not jax.dtypes.issubdtype(getattr(key, "dtype", None), jax.dtypes.prng_key):
    try:
      key = jax.random.wrap_key_data(jnp.asarray(key, jnp.uint32))
    except (TypeError, ValueError) as e:
      raise ValueError(f"prng_key must be a jax key (jax.random.key(0)) or raw key data, got {prng_key!r:.80} "
                       f"({e}).") from None
  if key.shape == ():
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(num_images))
  if key.shape != (num_images,):
    raise ValueError(f"prng_key must be one key or {num_images} keys (one per image), got shape {key.shape}; "
                     "use seed=[...] for per-image seeds.")
  return key
