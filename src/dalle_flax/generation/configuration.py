"""Resolving and validating generation settings with transformers' ``GenerationConfig``.

Example: ``settings = resolve_generation_config(model.generation_config, None, {"top_k": 8})``.

DALL·E mini's released configs keep their generation keys (``do_sample``, ``min_length``,
``max_length``) in ``config.json``; transformers 5.x pops them out of model configs, so we
recover them with ``GenerationConfig.from_model_config(raw_dict)``. The sampling defaults of the
released models (top_k 50, top_p 1, temperature 1) came from the old ``PretrainedConfig``
defaults, which transformers 5.x no longer has: we set them explicitly.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
from transformers import GenerationConfig

__all__ = [
    "GENERATION_CONFIG_NAME",
    "RELEASED_GENERATION_SETTINGS",
    "default_generation_config",
    "pop_generation_aliases",
    "resolve_generation_config",
]

GENERATION_CONFIG_NAME = "generation_config.json"

# DALL·E mini's names -> transformers' names.
_KWARG_ALIASES = {"condition_scale": "guidance_scale"}
_INPUT_ALIASES = {
    "input_ids_uncond": "negative_prompt_ids",
    "attention_mask_uncond": "negative_prompt_attention_mask",
}
# Keys of GenerationConfig that our loop honours; anything else set to a non-default value is an
# error rather than being silently ignored.
_SUPPORTED = {
    "do_sample", "top_k", "top_p", "temperature", "guidance_scale", "num_return_sequences",
    "suppress_tokens", "max_length", "max_new_tokens", "min_length", "decoder_start_token_id",
    "bos_token_id", "eos_token_id", "pad_token_id", "num_beams", "use_cache",
    "transformers_version", "_from_model_config",
}


# Sampling settings of the original notebooks for the released text models, which ship no
# generation_config.json (reference dalle-mini.md §6.2: the inference notebook since 2022-05-28
# guides with scale 10 at the top-k 50 default; §3.3: the 2021 seed notebook sampled unguided,
# and the seed was trained without blank captions). Keyed by lower-case repo id.
RELEASED_GENERATION_SETTINGS: dict[str, dict[str, Any]] = {
    "dalle-mini/dalle-mini": {"guidance_scale": 10.0, "top_k": 50},
    "dalle-mini/dalle-mega": {"guidance_scale": 10.0, "top_k": 50},
    "flax-community/dalle-mini": {"top_k": 50},
}

_LEGACY_KEYS = {"do_sample", "top_k", "top_p", "temperature", "max_length", "decoder_start_token_id",
                "bos_token_id", "eos_token_id", "pad_token_id"}


def default_generation_config(config: Any, legacy: Mapping[str, Any] | None = None, *,
                              name_or_path: str | None = None) -> GenerationConfig:
  """The generation config of a DalleBart model that has no ``generation_config.json``.

  Args:
    config: a ``DalleBartConfig``.
    legacy: the raw ``config.json`` dict, whose generation keys (``do_sample``, ``max_length``,
      ...) are recovered; None uses the config's attributes only.
    name_or_path: the Hub repo id the model came from; a released one
      (:data:`RELEASED_GENERATION_SETTINGS`) gets its original notebook's settings (guidance
      scale 10 for mini-1 and mega-1). A local folder gets none: write a generation_config.json.

  Returns:
    A GenerationConfig reproducing the released models (sampling, top_k 50, top_p 1,
    temperature 1, 1 + image_length tokens) with one documented improvement:
    ``suppress_tokens`` lists the ids the VQGAN cannot decode (``decoder_start_token_id`` and
    the padding rows above it). Pass ``suppress_tokens=[]`` for the original behaviour.
  """
  # Only the keys our loop honours: the 2021 seed's config.json still carries BART-CNN's beam
  # search settings (num_beams 4, no_repeat_ngram_size 3...), which its notebooks overrode.
  source = {k: v for k, v in (legacy or {}).items() if k in _LEGACY_KEYS}
  for key in ("decoder_start_token_id", "bos_token_id", "eos_token_id", "pad_token_id"):
    source.setdefault(key, getattr(config, key, None))
  generation_config = GenerationConfig.from_model_config(source)
  generation_config._from_model_config = False
  if generation_config.do_sample is None:
    generation_config.do_sample = bool(getattr(config, "do_sample", True))
  for key, value in (("top_k", 50), ("top_p", 1.0), ("temperature", 1.0)):
    if getattr(generation_config, key) is None:
      setattr(generation_config, key, value)
  generation_config.max_length = config.image_length + 1
  generation_config.min_length = None  # the original never applied a min-length processor
  generation_config.num_return_sequences = generation_config.num_return_sequences or 1
  start = config.decoder_start_token_id
  if generation_config.suppress_tokens is None:
    generation_config.suppress_tokens = list(range(start, config.image_vocab_size + 1))
  for key, value in released_settings(name_or_path).items():
    setattr(generation_config, key, value)
  return generation_config


def released_settings(name_or_path: str | None) -> dict[str, Any]:
  """The original notebook's sampling settings for a released repo id, else ``{}``."""
  if not name_or_path or os.path.exists(name_or_path):
    return {}  # a local folder: we cannot know which repo it came from
  return dict(RELEASED_GENERATION_SETTINGS.get(name_or_path.strip("/").lower(), {}))


def pop_generation_aliases(kwargs: dict[str, Any]) -> dict[str, Any]:
  """Moves DALL·E mini's argument names to transformers' ones; both given is an error."""
  renamed: dict[str, Any] = {}
  for old, new in {**_KWARG_ALIASES, **_INPUT_ALIASES}.items():
    if old in kwargs:
      value = kwargs.pop(old)
      other = kwargs.get(new)
      if other is not None and value is not None and not _same(value, other):
        raise ValueError(f"Got both {old!r} and its alias {new!r} with different values; pass only {new!r}.")
      kwargs[new] = value if value is not None else other
      renamed[old] = new
  return renamed


def _same(a: Any, b: Any) -> bool:
  """True when two alias values agree (the processor returns both names for the same array)."""
  if a is b:
    return True
  try:
    return bool(np.array_equal(np.asarray(a), np.asarray(b)))
  except (TypeError, ValueError):
    return False


def resolve_generation_config(
    model_generation_config: GenerationConfig,
    generation_config: GenerationConfig | None,
    kwargs: Mapping[str, Any],
    *,
    image_length: int,
    vocab_size: int,
) -> GenerationConfig:
  """Copies the model's (or the given) config, applies ``kwargs`` and validates the result.

  Raises:
    TypeError: an argument generate() does not know.
    ValueError: an invalid or unsupported setting (with the expected range).
  """
  if generation_config is not None and not isinstance(generation_config, GenerationConfig):
    raise TypeError(
        f"generation_config must be a transformers.GenerationConfig, got "
        f"{type(generation_config).__name__}."
    )
  resolved = copy.deepcopy(generation_config if generation_config is not None else model_generation_config)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    unused = resolved.update(**{k: v for k, v in kwargs.items()})
  if unused:
    raise TypeError(
        f"generate() got unknown argument(s) {sorted(unused)}; known sampling arguments are "
        "do_sample, top_k, top_p, temperature, guidance_scale (alias condition_scale), "
        "num_return_sequences, suppress_tokens."
    )
  _validate(resolved, image_length=image_length, vocab_size=vocab_size)
  return resolved


def _validate(config: GenerationConfig, *, image_length: int, vocab_size: int) -> None:
  unsupported = sorted(
      key for key, value in config.to_diff_dict().items()
      if key not in _SUPPORTED and value not in (None, False, [], {})
  )
  if unsupported:
    raise ValueError(
        f"generate() does not support {unsupported}; DALL·E mini samples exactly image_length "
        "tokens with temperature / top_k / top_p / guidance_scale."
    )
  if (config.num_beams or 1) != 1:
    raise ValueError(f"Beam search is not supported: num_beams must be 1, got {config.num_beams}.")
  if config.max_new_tokens is not None and config.max_new_tokens != image_length:
    raise ValueError(
        f"max_new_tokens must be image_length={image_length} (every image has that many tokens), "
        f"got {config.max_new_tokens}."
    )
  if config.max_length is not None and config.max_length != image_length + 1:
    raise ValueError(
        f"max_length must be 1 + image_length = {image_length + 1} (start token + image tokens), "
        f"got {config.max_length}."
    )
  if config.do_sample:
    temperature = 1.0 if config.temperature is None else config.temperature
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
      raise ValueError(
          f"temperature must be a finite number > 0 when sampling, got {config.temperature!r}; "
          "for greedy decoding pass do_sample=False."
      )
  top_p = 1.0 if config.top_p is None else config.top_p
  if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
    raise ValueError(f"top_p must be in (0, 1], got {config.top_p!r}.")
  top_k = 0 if config.top_k is None else config.top_k
  if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
    raise ValueError(f"top_k must be an int >= 0 (0 disables it), got {config.top_k!r}.")
  scale = config.guidance_scale
  if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
    raise ValueError(f"guidance_scale must be a finite number, got {scale!r}.")
  n = config.num_return_sequences or 1
  if isinstance(n, bool) or not isinstance(n, int) or n < 1:
    raise ValueError(f"num_return_sequences must be an int >= 1, got {n!r}.")
  if not config.do_sample and n > 1:
    raise ValueError(
        f"Greedy decoding (do_sample=False) gives the same image every time; "
        f"num_return_sequences must be 1, got {n}. Pass do_sample=True to get {n} different images."
    )
  for token in config.suppress_tokens or []:
    if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size:
      raise ValueError(f"suppress_tokens must be ids in [0, {vocab_size}), got {token!r}.")
