"""``generate()`` for DALL·E mini: settings resolution, inputs, keys, and the jitted loop.

Example: ``out = model.generate(input_ids, attention_mask, guidance_scale=10.0, seed=0)``.

The model class mixes in :class:`GenerationMixin` and provides three pure functions:
``encode(input_ids, attention_mask, params=)``, ``init_cache(params, encoder_out, text_mask)``
and ``decode_step(params, token, position, cache) -> (logits, cache)``; a model may override
:meth:`GenerationMixin.decoding` to decode with other parameters or functions (a scanned model
decodes through its layers split per layer, on CPU through native kernels).
"""

from __future__ import annotations

import contextlib
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

from ..hub_utils import HubOptions, atomic_write_json, resolve_file
from .configuration import (
    GENERATION_CONFIG_NAME,
    _same,
    default_generation_config,
    pop_generation_aliases,
    resolve_generation_config,
)
from .loop import LoopSpec, SampleState, run_steps
from .sampling import SamplingKnobs
from .seeds import flatten_seeds, image_keys

logger = logging.getLogger(__name__)

__all__ = ["DalleMiniGenerateOutput", "Decoding", "GenerationMixin", "as_ids", "on_one_cpu_device"]

# Special ids of the BART byte-level BPE tokenizers every released DALL·E mini model uses.
TEXT_BOS_ID, TEXT_PAD_ID, TEXT_EOS_ID = 0, 1, 2

_STATIC = ("spec", "num_steps", "scan")
# Donating the loop state lets XLA update the KV cache in place between chunks; the CPU backend
# cannot donate (it would only warn), so it gets the plain version.
_run_steps_jit = jax.jit(run_steps, static_argnames=_STATIC)
_run_steps_jit_donated = jax.jit(run_steps, static_argnames=_STATIC, donate_argnums=(2,))


def _jitted_loop() -> Callable[..., SampleState]:
  return _run_steps_jit if jax.default_backend() == "cpu" else _run_steps_jit_donated


def on_one_cpu_device(params: Any) -> bool:
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


def as_ids(name: str, value: Any, *, allow_1d: bool = False) -> jax.Array:
  """``value`` as a (batch, length) int32 array, or a ValueError saying what was expected."""
  array = value if isinstance(value, jax.Array) else np.asarray(value)
  if allow_1d and array.ndim == 1:
    array = array[None]
  if array.ndim != 2 or not jnp.issubdtype(array.dtype, jnp.integer):
    raise ValueError(
        f"{name} must be a (batch, text_length) integer array, got shape {tuple(array.shape)} "
        f"and dtype {array.dtype}; use DalleMiniProcessor to build it."
    )
  return jnp.asarray(array, jnp.int32)


@dataclass
class DalleMiniGenerateOutput:
  """Output of ``generate``.

  Attributes:
    sequences: (n, 1 + image_length) int32; column 0 is the decoder start token, the rest are
      VQGAN codes (n = batch * num_return_sequences, prompt-major).
    seeds: the seed of each of the n images (``seed=seeds[i]`` regenerates image i alone), or
      None when the call got ``prng_key``.
  """

  sequences: jax.Array
  seeds: list[int] | None = None

  @property
  def image_tokens(self) -> jax.Array:
    """(n, image_length) VQGAN codes: ``sequences[:, 1:]``."""
    return self.sequences[:, 1:]


@dataclass(frozen=True)
class Decoding:
  """What the loop decodes with (see :meth:`GenerationMixin.decoding`).

  Attributes:
    params: the parameters ``init_cache`` and ``decode_step`` take.
    init_cache: ``(params, encoder_out, text_mask) -> cache``.
    decode_step: ``(params, token, position, cache) -> (logits, cache)``; a static argument of
      the jitted loop, so it must be hashable and should not hold the model (a jit cache entry
      keeps it alive).
    native: whether ``decode_step`` runs the native CPU kernels.
  """

  params: Any
  init_cache: Callable[..., Any]
  decode_step: Callable[..., Any]
  native: bool = False


@dataclass(frozen=True)
class _Text:
  """Tokenized text of one call, one row per image (n rows), at the model's text length.

  ``neg_ids`` / ``neg_mask`` are the unconditional rows (None without guidance);
  ``shared_neg`` says every unconditional row is the same (then it is encoded once).
  """

  ids: jax.Array
  mask: jax.Array
  neg_ids: jax.Array | None
  neg_mask: jax.Array | None
  shared_neg: bool


def _merge_alias(name: str, value: Any, kwargs: dict[str, Any]) -> Any:
  """``name`` given as an argument and through its DALL·E mini alias must agree."""
  other = kwargs.pop(name, None)
  if value is not None and other is not None and not _same(value, other):
    raise ValueError(f"Got different values for {name!r} and its alias; pass only one.")
  return value if value is not None else other


def _pad_text(ids: jax.Array, mask: jax.Array, length: int) -> tuple[jax.Array, jax.Array]:
  """Pads (rows, t) ids and mask with ``<pad>`` / 0 to ``length`` columns."""
  extra = length - ids.shape[1]
  if extra == 0:
    return ids, mask
  return (jnp.pad(ids, ((0, 0), (0, extra)), constant_values=TEXT_PAD_ID),
          jnp.pad(mask, ((0, 0), (0, extra))))


def _image_seeds(seed: Any, b: int, n_ret: int) -> list[int]:
  """``generate``'s ``seed=``: an int (expanded per image) or one int per output image."""
  if isinstance(seed, (list, tuple, np.ndarray)) and any(isinstance(s, (list, tuple)) for s in seed):
    raise ValueError(f"seed for generate() is an int or a flat list of {b * n_ret} ints (one per image).")
  return flatten_seeds(seed, b, n_ret)


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
    self._generation_config = default_generation_config(self.config, raw, name_or_path=str(pretrained))

  def decoding(self, params: Any) -> Decoding:
    """The parameters and functions ``generate`` decodes with; by default the model's own."""
    return Decoding(params, self.init_cache, self.decode_step)

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

    Every prompt is encoded at ``config.max_text_length`` tokens (shorter inputs are padded),
    so an image depends on its own prompt and key only, never on the batch it is sampled in:
    ``seed=out.seeds[i]`` gives image ``i`` again (see ``dalle_flax.generation.seeds``).

    Args:
      input_ids: (b, t) text ids, t <= max_text_length (from ``DalleMiniProcessor``).
      attention_mask: (b, t) 1 for real tokens (default: all ones).
      generation_config: settings to start from (default: the model's).
      prng_key: one key (image i gets ``fold_in(key, i)``) or one key per output image.
      params: parameters to use instead of ``self.params``.
      logits_processor: Flax-signature processors ``(sequences, logits, cur_len) -> logits``,
        applied after guidance and before temperature/top-k/top-p.
      negative_prompt_ids / negative_prompt_attention_mask: (b, t') unconditional inputs for
        guidance (aliases ``input_ids_uncond`` / ``attention_mask_uncond``); default: the empty
        string, ``[<s>, </s>, <pad>...]``, as the original.
      seed: an int (image i gets seed ``image_seeds(seed, n)[i]``: ``seed`` itself for image 0)
        or one int in [0, 2**32) per output image. Neither seed nor prng_key: seed 0.
      trace: False runs every step eagerly in a Python loop, without jit (for debugging:
        logits processors and the model see concrete arrays).
      callback: called as ``callback(step, tokens)`` every ``callback_steps`` tokens with the
        (n, step) tokens sampled so far (progress bars, progressive previews).
      **kwargs: GenerationConfig fields (do_sample, top_k, top_p, temperature, guidance_scale /
        condition_scale, num_return_sequences, suppress_tokens).

    Returns:
      ``DalleMiniGenerateOutput`` with ``.sequences`` of shape (b * num_return_sequences,
      1 + image_length), column 0 the start token, and ``.seeds``.
    """
    pop_generation_aliases(kwargs)
    negative_prompt_ids = _merge_alias("negative_prompt_ids", negative_prompt_ids, kwargs)
    negative_prompt_attention_mask = _merge_alias(
        "negative_prompt_attention_mask", negative_prompt_attention_mask, kwargs)
    vocab = self.config.image_vocab_size + 1
    gen = resolve_generation_config(self.generation_config, generation_config, kwargs,
                                    image_length=self.config.image_length, vocab_size=vocab)
    params = self._require_params(params)
    scale = 1.0 if gen.guidance_scale is None else float(gen.guidance_scale)
    n_ret = gen.num_return_sequences or 1
    text = self._text_rows(input_ids, attention_mask, negative_prompt_ids, negative_prompt_attention_mask,
                           n_ret, guidance=scale != 1.0)
    n = text.ids.shape[0]
    if prng_key is not None and seed is not None:
      raise ValueError("Pass either prng_key or seed, not both.")
    seeds = None if prng_key is not None else _image_seeds(0 if seed is None else seed, n // n_ret, n_ret)
    row_keys = image_keys(n, seeds=seeds, prng_key=prng_key)
    with contextlib.nullcontext() if trace else jax.disable_jit():
      decoding = self.decoding(params)
      cache = decoding.init_cache(decoding.params, *self._encode_rows(params, text))
      state, spec, knobs, suppress_bias = self._loop_inputs(gen, decoding, cache, row_keys, n, scale,
                                                            logits_processor)
      state = self._sample(spec, decoding.params, state, knobs, suppress_bias, trace, callback, callback_steps)
    return DalleMiniGenerateOutput(sequences=state.sequences, seeds=seeds)

  # --- the steps of generate() -----------------------------------------------------------------
  def _text_rows(self, input_ids: Any, attention_mask: Any, neg_ids: Any, neg_mask: Any, n_ret: int,
                 *, guidance: bool) -> _Text:
    """Checks the text inputs; one row per output image, padded to ``max_text_length``."""
    length = self.config.max_text_length
    ids = as_ids("input_ids", input_ids, allow_1d=True)
    b, t = ids.shape
    if t > length:
      raise ValueError(
          f"input_ids has length {t} but config.max_text_length is {length}; "
          f"tokenize with DalleMiniProcessor (max_text_length={length})."
      )
    mask = jnp.ones_like(ids) if attention_mask is None else as_ids("attention_mask", attention_mask, allow_1d=True)
    if mask.shape != ids.shape:
      raise ValueError(f"attention_mask shape {tuple(mask.shape)} != input_ids shape {tuple(ids.shape)}.")
    ids, mask = _pad_text(jnp.repeat(ids, n_ret, axis=0), jnp.repeat(mask, n_ret, axis=0), length)
    if not guidance:
      if neg_ids is not None or neg_mask is not None:
        logger.debug("negative prompt ignored: guidance is off (guidance_scale 1)")
      return _Text(ids, mask, None, None, False)
    neg_ids, neg_mask = self._negative_rows(neg_ids, neg_mask, b, length)
    shared = bool(jnp.all(neg_ids == neg_ids[:1])) and bool(jnp.all(neg_mask == neg_mask[:1]))
    neg_ids, neg_mask = jnp.repeat(neg_ids, n_ret, axis=0), jnp.repeat(neg_mask, n_ret, axis=0)
    return _Text(ids, mask, neg_ids, neg_mask, shared)

  def _negative_rows(self, ids: Any, mask: Any, b: int, length: int) -> tuple[jax.Array, jax.Array]:
    """(b, length) unconditional ids and mask; default: the empty string, as the original."""
    if ids is None:
      if mask is not None:
        raise ValueError("negative_prompt_attention_mask was given without negative_prompt_ids.")
      ids = np.full((1, length), TEXT_PAD_ID, np.int32)
      ids[0, :2] = (TEXT_BOS_ID, TEXT_EOS_ID)
    ids = as_ids("negative_prompt_ids", ids, allow_1d=True)
    mask = (ids != TEXT_PAD_ID).astype(jnp.int32) if mask is None else as_ids(
        "negative_prompt_attention_mask", mask, allow_1d=True)
    if ids.shape != mask.shape or ids.shape[0] not in (1, b) or ids.shape[1] > length:
      raise ValueError(
          f"negative_prompt_ids and its mask must both have shape ({b}, t) or (1, t) with t <= "
          f"max_text_length={length}, got {tuple(ids.shape)} and {tuple(mask.shape)}."
      )
    ids, mask = _pad_text(ids, mask, length)
    return jnp.broadcast_to(ids, (b, length)), jnp.broadcast_to(mask, (b, length))

  def _encode_rows(self, params: Any, text: _Text) -> tuple[jax.Array, jax.Array]:
    """Encoder output and text mask of every row: (rows, t, d) and (rows, t); with guidance the
    n conditional rows come first, then the n unconditional ones."""
    encoder_out = self.encode(text.ids, text.mask, params=params)  # (n, t, d)
    if text.neg_ids is None:
      return encoder_out, text.mask
    if text.shared_neg:  # one unconditional encoding, shared by every row
      neg_out = jnp.broadcast_to(self.encode(text.neg_ids[:1], text.neg_mask[:1], params=params),
                                 encoder_out.shape)
    else:
      neg_out = self.encode(text.neg_ids, text.neg_mask, params=params)
    return (jnp.concatenate([encoder_out, neg_out.astype(encoder_out.dtype)]),
            jnp.concatenate([text.mask, text.neg_mask]))

  def _loop_inputs(self, gen: GenerationConfig, decoding: Decoding, cache: Any, row_keys: jax.Array, n: int,
                   scale: float, logits_processor: Sequence[Callable[..., jax.Array]] | None
                   ) -> tuple[SampleState, LoopSpec, SamplingKnobs, jax.Array]:
    """The loop's initial state, its static spec, the traced knobs and the suppression bias."""
    config, vocab = self.config, self.config.image_vocab_size + 1
    start_id = gen.decoder_start_token_id if gen.decoder_start_token_id is not None else config.decoder_start_token_id
    pad_id = gen.pad_token_id if gen.pad_token_id is not None else start_id
    eos = gen.eos_token_id[0] if isinstance(gen.eos_token_id, list) else gen.eos_token_id
    sequences = jnp.full((n, 1 + config.image_length), pad_id, jnp.int32).at[:, 0].set(start_id)
    state = SampleState(token=jnp.full((n,), start_id, jnp.int32), sequences=sequences,
                        finished=jnp.zeros((n,), bool), cache=cache, row_keys=row_keys)
    spec = LoopSpec(
        decode_step=decoding.decode_step, do_sample=bool(gen.do_sample),
        top_k=min(int(gen.top_k or 0), vocab),  # as transformers: k capped at the vocabulary
        guidance=scale != 1.0, eos_token_id=eos if eos is not None and 0 <= eos < vocab else None,
        pad_token_id=int(pad_id), logits_processors=tuple(logits_processor or ()))
    knobs = SamplingKnobs(
        temperature=jnp.float32(1.0 if gen.temperature is None else gen.temperature),
        top_p=jnp.float32(1.0 if gen.top_p is None else gen.top_p),
        guidance_scale=jnp.float32(scale))
    suppress = jnp.asarray(gen.suppress_tokens or [], jnp.int32)
    return state, spec, knobs, jnp.zeros((vocab,), jnp.float32).at[suppress].set(-jnp.inf)

  def _sample(self, spec: LoopSpec, params: Any, state: SampleState, knobs: SamplingKnobs,
              suppress_bias: jax.Array, trace: bool, callback: Callable[[int, np.ndarray], None] | None,
              callback_steps: int) -> SampleState:
    """Runs every position: one jitted scan, or chunks of ``callback_steps`` with a callback."""
    length = self.config.image_length
    chunk = length if callback is None else max(1, min(int(callback_steps), length))
    for begin in range(0, length, chunk):
      steps = min(chunk, length - begin)
      if trace:
        state = _jitted_loop()(spec, params, state, knobs, suppress_bias, jnp.int32(begin), steps)
      else:
        state = run_steps(spec, params, state, knobs, suppress_bias, jnp.int32(begin), steps, scan=False)
      if callback is not None:
        callback(begin + steps, np.asarray(state.sequences[:, 1 : begin + steps + 1]))
    return state
