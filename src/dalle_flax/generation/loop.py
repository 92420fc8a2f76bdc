"""The image-token sampling loop: ``lax.scan`` over positions with an explicit KV cache.

Example: ``state = run_steps(spec, params, state, knobs, start=0, num_steps=256)``.

The loop only talks to the model through ``decode_step(params, token, position, cache) ->
(logits, cache)`` (flax lm1b style), so it is tested with a fake model. Rows ``[:b]`` of the cache
are conditional, rows ``[b:]`` unconditional when guidance is on; both get the same token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from .sampling import SamplingKnobs, apply_guidance, greedy_token, sample_token

__all__ = ["LoopSpec", "SampleState", "run_steps"]

DecodeStep = Callable[[Any, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]


@struct.dataclass
class SampleState:
  """Loop state; b = number of images.

  Attributes:
    token: (b,) int32, the last token fed to the decoder.
    sequences: (b, 1 + image_length) int32, start token then sampled ids (pad-filled ahead).
    finished: (b,) bool, rows that emitted eos (only possible when eos is a sampleable id).
    cache: the decoder cache (2b rows with guidance, else b).
    row_keys: (b,) typed PRNG keys, one per image; step t uses ``fold_in(row_key, t)``.
  """

  token: jax.Array
  sequences: jax.Array
  finished: jax.Array
  cache: Any
  row_keys: jax.Array


@dataclass(frozen=True)
class LoopSpec:
  """Static (hashable) description of one compiled loop.

  Attributes:
    decode_step: the model's pure step function.
    do_sample: sample (True) or argmax (False).
    top_k: static top-k (0: off).
    guidance: run unconditional rows and combine logits.
    eos_token_id / pad_token_id: after a row emits eos, later positions are pad (transformers'
      bookkeeping, reproduced for exactness; unreachable when eos is suppressed or outside the
      logits).
    logits_processors: Flax-signature processors ``(sequences, logits, cur_len) -> logits``.
  """

  decode_step: DecodeStep
  do_sample: bool
  top_k: int
  guidance: bool
  eos_token_id: int | None
  pad_token_id: int
  logits_processors: Sequence[Callable[..., jax.Array]] = ()


def _step(spec: LoopSpec, params: Any, knobs: SamplingKnobs, suppress_bias: jax.Array,
          state: SampleState, position: jax.Array) -> SampleState:
  """Decodes one position for every image and writes the sampled token."""
  b = state.token.shape[0]
  token_in = jnp.concatenate([state.token, state.token]) if spec.guidance else state.token
  logits, cache = spec.decode_step(params, token_in, position, state.cache)  # (rows, v)
  logits = logits.astype(jnp.float32)
  if spec.guidance:
    logits = apply_guidance(logits[:b], logits[b:], knobs.guidance_scale)
  logits = logits + suppress_bias
  for processor in spec.logits_processors:
    logits = processor(state.sequences, logits, position + 1)
  if spec.do_sample:
    keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(state.row_keys, position)
    token = sample_token(keys, logits, knobs, top_k=spec.top_k)
  else:
    token = greedy_token(logits)
  finished = state.finished
  if spec.eos_token_id is not None:
    token = jnp.where(finished, spec.pad_token_id, token)
    finished = finished | (token == spec.eos_token_id)
  sequences = jax.lax.dynamic_update_slice(state.sequences, token[:, None], (0, position + 1))
  return state.replace(token=token, sequences=sequences, finished=finished, cache=cache)


def run_steps(spec: LoopSpec, params: Any, state: SampleState, knobs: SamplingKnobs,
              suppress_bias: jax.Array, start: jax.Array, num_steps: int,
              *, scan: bool = True) -> SampleState:
  """Runs ``num_steps`` decode steps from position ``start`` (traced).

  With ``scan=False`` the same step runs in a Python loop (the debug path).
  """
  def body(carry: SampleState, position: jax.Array) -> tuple[SampleState, None]:
    return _step(spec, params, knobs, suppress_bias, carry, position), None

  positions = start + jnp.arange(num_steps, dtype=jnp.int32)
  if scan:
    state, _ = jax.lax.scan(body, state, positions)
    return state
  for position in positions:
    state, _ = body(state, position)
  return state
