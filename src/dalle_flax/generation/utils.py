"""``generate()`` for DALL·E mini: settings resolution, inputs, keys, and the jitted loop.

Example: ``out = model.generate(input_ids, attention_mask, guidance_scale=10.0, seed=0)``.

The model class mixes in :class:`GenerationMixin` and provides three pure functions:
``encode(input_ids, attention_mask, params=)``, ``init_cache(params, encoder_out, text_mask)``
and ``decode_step(params, token, position, cache) -> (logits, cache)``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from transformers import GenerationConfig

from .. import kernels
from ..hub_utils import HubOptions, atomic_write_json, resolve_file
from .configuration import (
    GENERATION_CONFIG_NAME,
    default_generation_config,
    pop_generation_aliases,
    resolve_generation_config,
)
from .loop import LoopSpec, SampleState, run_steps
from .sampling import SamplingKnobs

logger = logging.getLogger(__name__)

__all__ = ["DalleMiniGenerateOutput", "GenerationMixin"]

# Special ids of the BART byte-level BPE tokenizers every released DALL·E mini model uses.
TEXT_BOS_ID, TEXT_PAD_ID, TEXT_EOS_ID = 0, 1, 2

# generate() trims trailing text padding to a multiple of this many tokens before encoding.
_TEXT_BUCKET = 16

_STATIC = ("spec", "num_steps", "scan")
# Donating the loop state lets XLA update the KV cache in place between chunks; the CPU backend
# cannot donate (it would only warn), so it gets the plain version.
_run_steps_jit = jax.jit(run_steps, static_argnames=_STATIC)
_run_steps_jit_donated = jax.jit(run_steps, static_argnames=_STATIC, donate_argnums=(2,))


def _jitted_loop() -> Callable[..., SampleState]:
  return _run_steps_jit if jax.default_backend() == "cpu" else _run_steps_jit_donated


def _on_one_cpu_device(params: Any) -> bool:
  """True when every parameter is (or, for host arrays, will be) on one and the same CPU device."""
  devices = set()
  for leaf in jax.tree.leaves(params):
    if isinstance(leaf, jax.core.Tracer):
      return False
    if isinstance(leaf, jax.Array):
      devices |= leaf.sharding.device_set
    else:
      devices.add(jax.devices()[0])
  return len(devices) == 1 and next(iter(devices)).platform == "cpu"


@dataclass
class DalleMiniGenerateOutput:
  """Output of ``generate``.

  Attributes:
    sequences: (n, 1 + image_length) int32; column 0 is the decoder start token, the rest are
      VQGAN codes (n = batch * num_return_sequences, prompt-major).
  """

  sequences: jax.Array

  @property
  def image_tokens(self) -> jax.Array:
    """(n, image_length) VQGAN codes: ``sequences[:, 1:]``."""
    return self.sequences[:, 1:]


def _as_ids(name: str, value: Any) -> jax.Array:
  array = value if isinstance(value, jax.Array) else np.asarray(value)
  if array.ndim == 1:
    array = array[None]
  if array.ndim != 2 or not jnp.issubdtype(array.dtype, jnp.integer):
    raise ValueError(
        f"{name} must be a (batch, text_length) integer array, got shape {tuple(array.shape)} "
        f"and dtype {array.dtype}; use DalleMiniProcessor to build it."
    )
  return jnp.asarray(array, jnp.int32)


def _merge_alias(name: str, value: Any, kwargs: dict[str, Any]) -> Any:
  """``name`` given as an argument and through its DALL·E mini alias must agree."""
  from .configuration import _same

  other = kwargs.pop(name, None)
  if value is not None and other is not None and not _same(value, other):
    raise ValueError(f"Got different values for {name!r} and its alias; pass only one.")
  return value if value is not None else other


def _row_keys(n: int, prng_key: Any, seed: Any) -> jax.Array:
  """(n,) typed keys: one per image, independent of the batch the image is generated in."""
  if prng_key is not None and seed is not None:
    raise ValueError("Pass either prng_key or seed, not both.")
  if seed is not None:
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
      base = jax.random.key(int(seed))
      return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(base, jnp.arange(n))
    seeds = list(seed)
    if len(seeds) != n or not all(isinstance(s, (int, np.integer)) for s in seeds):
      raise ValueError(f"seed must be an int or a list of {n} ints (one per image), got {seed!r}.")
    return jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
  key = jax.random.key(0) if prng_key is None else prng_key
  if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(jnp.asarray(key, jnp.uint32))
  if key.ndim == 0:
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(n))
  if key.shape != (n,):
    raise ValueError(f"prng_key must be one key or {n} keys (one per image), got shape {key.shape}.")
  return key


def _trimmed_text_length(masks: Sequence[Any], text_length: int) -> int:
  """Text columns the encoder needs: up to the last real token of any row, in buckets of ``_TEXT_BUCKET``.

  Trailing columns that are padding in every row of every mask are masked out of every attention
  as keys, so dropping them leaves the real tokens' encoder output and the decoder's
  cross-attention unchanged. Rounding up to a bucket bounds the compiled shapes (4 for 64 tokens).

  Args:
    masks: (rows, text_length) attention masks (nonzero = real token) that share one encoder
      output, so they must share the length (the prompt's and the unconditional one's).
    text_length: their current length t.

  Returns:
    A length in [min(_TEXT_BUCKET, t), t]; an all-padding batch gets the bucket minimum.
  """
  used = 0
  for mask in masks:
    columns = np.flatnonzero(np.asarray(mask).any(axis=0))  # columns with a real token in some row
    if columns.size:
      used = max(used, int(columns[-1]) + 1)
  bucketed = max(_TEXT_BUCKET, -(-used // _TEXT_BUCKET) * _TEXT_BUCKET)
  return min(bucketed, text_length)


def _padding_is_inert(config: Any) -> bool:
  """False when padded text positions change real tokens' encoder output (then no trimming).

  Sinkformer attention (``sinkhorn_iters > 1``) also normalises over queries, padded ones
  included. Everything else treats a position independently or masks padding out as a key
  (the Swin bias indexes absolute positions, which trimming trailing columns keeps).
  """
  return getattr(config, "sinkhorn_iters", 1) <= 1


class GenerationMixin:
  """Adds ``generate`` and generation-config persistence to a DALL·E mini model."""

  _generation_config: GenerationConfig | None = None

  @property
  def generation_config(self) -> GenerationConfig:
    if self._generation_config is None:
      self._generation_config = default_generation_config(self.config)
    return self._generation_config

  @generation_config.setter
  def generation_config(self, value: GenerationConfig) -> None:
    if not isinstance(value, GenerationConfig):
      raise TypeError(f"generation_config must be a GenerationConfig, got {type(value).__name__}.")
    self._generation_config = value

  def save_extra_files(self, save_directory: Path) -> None:
    atomic_write_json(Path(save_directory) / GENERATION_CONFIG_NAME, self.generation_config.to_diff_dict())

  def load_extra_files(self, pretrained: Any, options: HubOptions) -> None:
    path = resolve_file(pretrained, GENERATION_CONFIG_NAME, options, required=False)
    if path is not None:
      self._generation_config = GenerationConfig.from_dict(json.loads(Path(path).read_text()))
      return
    raw = json.loads(Path(resolve_file(pretrained, "config.json", options)).read_text())
    self._generation_config = default_generation_config(self.config, raw)

  def _encode_jit(self) -> Callable[..., jax.Array]:
    if getattr(self, "_encode_fn", None) is None:
      self._encode_fn = jax.jit(lambda p, ids, mask: self.encode(ids, mask, params=p))
    return self._encode_fn

  def _init_cache_jit(self, unrolled: bool = False) -> Callable[..., Any]:
    fns = self.__dict__.setdefault("_init_cache_fns", {})
    if unrolled not in fns:
      fns[unrolled] = jax.jit(self._unrolled_init_cache if unrolled else self.init_cache)
    return fns[unrolled]

  def generate(
      self,
      input_ids: Any,
      attention_mask: Any = None,
      generation_config: GenerationConfig | None = None,
      prng_key: Any = None,
      params: Any = None,
      logits_processor: Sequence[Callable[..., jax.Array]] | None = None,
      negative_prompt_ids: Any = None,
      negative_prompt_attention_mask: Any = None,
      *,
      seed: int | Sequence[int] | None = None,
      trace: bool = True,
      callback: Callable[[int, np.ndarray], None] | None = None,
      callback_steps: int = 32,
      **kwargs: Any,
  ) -> DalleMiniGenerateOutput:
    """Samples image tokens for a batch of tokenized prompts.

    A scanned model decodes through its decoder layers split per layer (copied once per call; see
    the model's ``_decoding_params``), as fast as an unrolled one.

    Trailing text columns that are padding in every row (prompt and unconditional masks alike)
    are dropped before encoding, rounded up to a multiple of 16 tokens, which leaves the result
    unchanged (not done for Sinkformer models, whose encoder normalises over padded positions too).

    Args:
      input_ids: (b, t) text ids, t <= max_text_length (from ``DalleMiniProcessor``).
      attention_mask: (b, t) 1 for real tokens (default: all ones).
      generation_config: settings to start from (default: the model's).
      prng_key: one key (images get ``fold_in(key, i)``) or one key per output image.
      params: parameters to use instead of ``self.params``.
      logits_processor: Flax-signature processors ``(sequences, logits, cur_len) -> logits``,
        applied after guidance and before temperature/top-k/top-p.
      negative_prompt_ids / negative_prompt_attention_mask: (b, t) unconditional inputs for
        guidance (aliases ``input_ids_uncond`` / ``attention_mask_uncond``); default: the empty
        string, ``[<s>, </s>, <pad>...]``, as the original.
      seed: an int (like prng_key=key(seed)) or one int per output image.
      trace: False runs the same step in a Python loop without jit (for debugging).
      callback: called as ``callback(step, tokens)`` every ``callback_steps`` tokens with the
        (n, step) tokens sampled so far (progress bars, progressive previews).
      **kwargs: GenerationConfig fields (do_sample, top_k, top_p, temperature, guidance_scale /
        condition_scale, num_return_sequences, suppress_tokens).

    Returns:
      ``DalleMiniGenerateOutput`` with ``.sequences`` of shape (b * num_return_sequences,
      1 + image_length), column 0 the start token.
    """
    pop_generation_aliases(kwargs)
    negative_prompt_ids = _merge_alias("negative_prompt_ids", negative_prompt_ids, kwargs)
    negative_prompt_attention_mask = _merge_alias(
        "negative_prompt_attention_mask", negative_prompt_attention_mask, kwargs)
    config = self.config
    vocab = config.image_vocab_size + 1
    gen = resolve_generation_config(self.generation_config, generation_config, kwargs,
                                    image_length=config.image_length, vocab_size=vocab)
    params = self._require_params(params)
    # a scanned model decodes through its decoder layers split per layer (see _decoding_params)
    decoding = getattr(self, "_decoding_params", None)
    loop_params, unrolled = decoding(params) if decoding is not None else (params, False)
    if getattr(config, "use_scan", False) and not unrolled and not getattr(self, "_warned_scan", False):
      self._warned_scan = True
      logger.warning("Generating with scanned (stacked) decoder layers, which slices every layer's weights "
                     "out of the stack at each step (about 3x slower on CPU); load with from_pretrained(..., "
                     "use_scan=False) for inference: see the README's performance section.")
    input_ids = _as_ids("input_ids", input_ids)
    b, t = input_ids.shape
    if t > config.max_text_length:
      raise ValueError(
          f"input_ids has length {t} but config.max_text_length is {config.max_text_length}; "
          f"tokenize with DalleMiniProcessor (max_text_length={config.max_text_length})."
      )
    attention_mask = jnp.ones_like(input_ids) if attention_mask is None else _as_ids("attention_mask", attention_mask)
    if attention_mask.shape != input_ids.shape:
      raise ValueError(f"attention_mask shape {attention_mask.shape} != input_ids shape {input_ids.shape}.")

    scale = 1.0 if gen.guidance_scale is None else float(gen.guidance_scale)
    guidance = scale != 1.0
    n_ret = gen.num_return_sequences or 1
    if n_ret > 1:
      input_ids = jnp.repeat(input_ids, n_ret, axis=0)
      attention_mask = jnp.repeat(attention_mask, n_ret, axis=0)
    n = b * n_ret
    if guidance:
      neg_ids, neg_mask = self._negative_inputs(negative_prompt_ids, negative_prompt_attention_mask, b, t, n_ret)
    if _padding_is_inert(config):
      # both encodings go into one cross-attention, so they share the trimmed length L <= t
      text_len = _trimmed_text_length([attention_mask, neg_mask] if guidance else [attention_mask], t)
      input_ids, attention_mask = input_ids[:, :text_len], attention_mask[:, :text_len]
      if guidance:
        neg_ids, neg_mask = neg_ids[:, :text_len], neg_mask[:, :text_len]

    encode = self._encode_jit() if trace else (lambda p, i, m: self.encode(i, m, params=p))
    encoder_out = encode(params, input_ids, attention_mask)  # (n, L, d)
    text_mask = attention_mask
    if guidance:
      if bool(jnp.all(neg_ids == neg_ids[:1])) and bool(jnp.all(neg_mask == neg_mask[:1])):
        # one unconditional encoding, shared by every row
        neg_out = jnp.broadcast_to(encode(params, neg_ids[:1], neg_mask[:1]), (n, *encoder_out.shape[1:]))
      else:
        neg_out = encode(params, neg_ids, neg_mask)
      encoder_out = jnp.concatenate([encoder_out, neg_out.astype(encoder_out.dtype)])
      text_mask = jnp.concatenate([attention_mask, neg_mask])
    if trace:
      init_cache = self._init_cache_jit(unrolled)
    else:
      init_cache = self._unrolled_init_cache if unrolled else self.init_cache
    cache = init_cache(loop_params, encoder_out, text_mask)

    start_id = gen.decoder_start_token_id if gen.decoder_start_token_id is not None else config.decoder_start_token_id
    pad_id = gen.pad_token_id if gen.pad_token_id is not None else start_id
    eos = gen.eos_token_id[0] if isinstance(gen.eos_token_id, list) else gen.eos_token_id
    sequences = jnp.full((n, 1 + config.image_length), pad_id, jnp.int32).at[:, 0].set(start_id)
    state = SampleState(
        token=jnp.full((n,), start_id, jnp.int32), sequences=sequences,
        finished=jnp.zeros((n,), bool), cache=cache, row_keys=_row_keys(n, prng_key, seed))
    spec = LoopSpec(
        decode_step=self._loop_decode_step(params, unrolled), do_sample=bool(gen.do_sample),
        top_k=min(int(gen.top_k or 0), vocab),  # as transformers: k capped at the vocabulary
        guidance=guidance, eos_token_id=eos if eos is not None and 0 <= eos < vocab else None,
        pad_token_id=int(pad_id), logits_processors=tuple(logits_processor or ()))
    knobs = SamplingKnobs(
        temperature=jnp.float32(1.0 if gen.temperature is None else gen.temperature),
        top_p=jnp.float32(1.0 if gen.top_p is None else gen.top_p),
        guidance_scale=jnp.float32(scale))
    suppress_bias = jnp.zeros((vocab,), jnp.float32).at[jnp.asarray(gen.suppress_tokens or [], jnp.int32)].set(-jnp.inf)

    length = config.image_length
    chunk = length if callback is None else max(1, min(int(callback_steps), length))
    for begin in range(0, length, chunk):
      steps = min(chunk, length - begin)
      if trace:
        state = _jitted_loop()(spec, loop_params, state, knobs, suppress_bias, jnp.int32(begin), steps)
      else:
        state = run_steps(spec, loop_params, state, knobs, suppress_bias, jnp.int32(begin), steps, scan=False)
      if callback is not None:
        callback(begin + steps, np.asarray(state.sequences[:, 1 : begin + steps + 1]))
    return DalleMiniGenerateOutput(sequences=state.sequences)

  def _loop_decode_step(self, params: Any, unrolled: bool = False) -> Callable[..., Any]:
    """The model's ``native_decode_step`` (native CPU kernels) when the parameters sit on one CPU
    device and the kernels build; else ``decode_step`` (their ``_unrolled_*`` variants for the
    parameters of ``_decoding_params``)."""
    prefix = "_unrolled_" if unrolled else ""
    native = getattr(self, prefix + "native_decode_step", None)
    if native is not None and _on_one_cpu_device(params) and kernels.kernels_available():
      return native
    return getattr(self, prefix + "decode_step")

  def _negative_inputs(self, ids: Any, mask: Any, b: int, t: int, n_ret: int) -> tuple[jax.Array, jax.Array]:
    if ids is None:
      if mask is not None:
        raise ValueError("negative_prompt_attention_mask was given without negative_prompt_ids.")
      row = np.full((t,), TEXT_PAD_ID, np.int32)
      row[:2] = (TEXT_BOS_ID, TEXT_EOS_ID)
      ids = np.broadcast_to(row, (b, t))
      mask = np.broadcast_to((np.arange(t) < 2).astype(np.int32), (b, t))
    ids = _as_ids("negative_prompt_ids", ids)
    mask = (ids != TEXT_PAD_ID).astype(jnp.int32) if mask is None else _as_ids("negative_prompt_attention_mask", mask)
    if ids.shape[0] == 1 and b > 1:
      ids, mask = jnp.broadcast_to(ids, (b, ids.shape[1])), jnp.broadcast_to(mask, (b, ids.shape[1]))
    if ids.shape != (b, t) or mask.shape != (b, t):
      raise ValueError(
          f"negative_prompt_ids and its mask must have the prompt shape {(b, t)} (or one row), got "
          f"{tuple(ids.shape)} and {tuple(mask.shape)}."
      )
    if n_ret > 1:
      ids, mask = jnp.repeat(ids, n_ret, axis=0), jnp.repeat(mask, n_ret, axis=0)
    return ids, mask
