"""Pure logits-to-token functions used inside the jitted generation loop.

Example: ``token = sample_token(key, logits, SamplingKnobs(1.0, 0.9, 3.0), top_k=50)``.

Order (as DALL·E mini and transformers): guidance on raw logits, then logits processors
(suppressed ids, user processors), then temperature, top-k and top-p, then a categorical draw.
``temperature``, ``top_p`` and ``guidance_scale`` are traced values, so changing them never
recompiles; ``top_k`` is static because ``lax.top_k`` needs a static ``k``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

__all__ = ["SamplingKnobs", "apply_guidance", "greedy_token", "sample_token", "top_p_mask"]

_NEG_INF = -jnp.inf


@struct.dataclass
class SamplingKnobs:
  """Traced sampling scalars (each a 0-d float32 array)."""

  temperature: jax.Array
  top_p: jax.Array
  guidance_scale: jax.Array


def apply_guidance(cond: jax.Array, uncond: jax.Array, scale: jax.Array) -> jax.Array:
  """Super-conditioning (classifier-free guidance on logits): ``u + s (c - u)``.

  Source: K. Crowson's trick as used by DALL·E mini (reference §6.1 step 2). Written as in the
  original so fp32 results match it bit for bit.
  """
  return uncond + scale * (cond - uncond)


def top_p_mask(logits: jax.Array, top_p: jax.Array) -> jax.Array:
  """Masks (to -inf) all but the smallest set of ids whose probability mass reaches ``top_p``.

  The id that crosses ``top_p`` is kept, and so is the most likely id, as transformers does.

  Args:
    logits: (b, v) logits (already temperature-scaled and top-k masked).
    top_p: scalar in (0, 1].
  """
  sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]  # (b, v) descending
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  keep = mass_before < top_p
  keep = keep.at[:, 0].set(True)
  threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits < threshold, _NEG_INF, logits)


def _warp(logits: jax.Array, knobs: SamplingKnobs) -> jax.Array:
  logits = logits / knobs.temperature
  return jax.lax.cond(
      jnp.all(knobs.top_p >= 1.0), lambda x: x, lambda x: top_p_mask(x, knobs.top_p), logits
  )


def sample_token(keys: jax.Array, logits: jax.Array, knobs: SamplingKnobs, *, top_k: int) -> jax.Array:
  """Draws one id per row.

  Args:
    keys: (b,) typed PRNG keys, one per row (so a row does not depend on its batch).
    logits: (b, v) processed logits.
    knobs: temperature and top_p (traced).
    top_k: static; 0 disables it.

  Returns:
    (b,) int32 ids.
  """
  logits = logits.astype(jnp.float32)
  draw = jax.vmap(jax.random.categorical)
  if top_k:
    # Sample among the k best only: same distribution as masking the rest, far cheaper than a
    # full-vocabulary draw (k << 16 385).
    values, indices = jax.lax.top_k(logits, top_k)  # (b, k) each, descending
    values = _warp(values, knobs)
    choice = draw(keys, values)  # (b,)
    return jnp.take_along_axis(indices, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
  return draw(keys, _warp(logits, knobs)).astype(jnp.int32)


def greedy_token(logits: jax.Array) -> jax.Array:
  """(b, v) -> (b,) int32 argmax (lowest id on ties, like ``lax.top_k``)."""
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)
