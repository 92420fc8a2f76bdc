"""Per-image seeds and keys of a pipeline call, so any image can be regenerated alone.

Example: ``image_seeds(7, 3) -> [7, 369571992, 1009178997]``.

With ``seed=s`` image ``i`` of a call (prompt-major) gets ``image_seeds(s, n)[i]``: ``s`` itself
for image 0, a hash of ``(s, i)`` for the others. ``generate(seed=[...])`` turns each into
``jax.random.key(seed_i)``, which does not depend on the batch an image is sampled in, so
``pipe(prompt, seed=out.seeds[i])`` gives image ``i`` again. The derivation must never change:
it is what makes a seed printed yesterday reproduce its image today.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

__all__ = ["flatten_seeds", "image_keys", "image_seeds"]


def image_seeds(seed: int, num_images: int) -> list[int]:
  """Per-image seeds of a call with ``seed=seed``: ``seed`` for image 0, then hashes of (seed, i).

  Args:
    seed: an int in [0, 2**32).
    num_images: how many images the call makes (all prompts, prompt-major).

  Returns:
    ``num_images`` ints in [0, 2**32), the same on every machine (numpy ``SeedSequence``).
  """
  seed = _check_seed(seed, "seed")
  return [seed] + [int(np.random.SeedSequence([seed, i]).generate_state(1, np.uint32)[0])
                   for i in range(1, num_images)]


def _check_seed(seed: Any, name: str) -> int:
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
    raise ValueError(f"{name} must be an int in [0, 2**32), got {seed!r}.")
  return int(seed)


def flatten_seeds(seed: Any, num_prompts: int, num_images: int) -> list[int]:
  """The seed of every image of a call, prompt-major.

  Args:
    seed: an int (expanded with :func:`image_seeds`), a flat list with one seed per image, or a
      list per prompt (as ``out.seeds``).
    num_prompts: b prompts in the call.
    num_images: n images per prompt.

  Returns:
    b * n seeds.
  """
  if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
    return image_seeds(int(seed), num_prompts * num_images)
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
        f"prompt(s) x num_images_per_prompt={num_images}), got {len(seed)}."
    )
  return [_check_seed(s, f"seed[{i}]") for i, s in enumerate(seed)]


def image_keys(prng_key: Any, num_images: int) -> jax.Array:
  """(num_images,) keys ``fold_in(prng_key, i)``: image i's key does not depend on batching.

  Args:
    prng_key: one typed key (``jax.random.key``) or raw key data (``jax.random.PRNGKey``).
    num_images: images in the call.
  """
  key = prng_key
  if not jax.dtypes.issubdtype(getattr(key, "dtype", None), jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(np.asarray(key, np.uint32))
  if key.shape != ():
    raise ValueError(
        f"prng_key must be one key, got shape {key.shape}; use seed=[...] for per-image seeds.")
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, np.arange(num_images))
