"""DalleMiniProcessor: prompts -> normalized text -> padded token arrays for DALL·E mini.

Example: ``batch = DalleMiniProcessor.from_pretrained("dalle-mini/dalle-mini")(["a red apple"])``.

It follows ``dalle_mini.model.processor.DalleBartProcessor`` (reference §5.2): normalize each
prompt when the model was trained on normalized captions, tokenize to exactly
``max_text_length`` tokens (``<s> ... </s>`` then ``<pad>``; truncation keeps ``</s>``), and add
the unconditional row used by guidance: the raw empty string, NOT normalized, i.e.
``[<s>, </s>, <pad>, ...]`` with mask ``[1, 1, 0, ...]``, repeated once per prompt.

Departures from the original: a single string is accepted (the original asserted a list); a
user-given ``negative_prompt`` replaces the unconditional row and is normalized like a prompt
(except ``""``, which keeps the original raw empty row); truncation is logged; outputs are numpy
int32 arrays in a ``transformers.BatchFeature`` rather than jax arrays.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from transformers import AutoProcessor, AutoTokenizer, BatchFeature, ProcessorMixin

from .hub_utils import HubOptions, read_json_object, resolve_file
from .text_normalization import TextNormalizer
from .tokenization_dalle_mini import DalleBartTokenizer

__all__ = ["PROCESSOR_CONFIG_FILE", "DalleMiniProcessor", "register"]

logger = logging.getLogger(__name__)

PROCESSOR_CONFIG_FILE = "processor_config.json"  # transformers' PROCESSOR_NAME
# Defaults of the original DalleBartConfig, used when a config.json lacks the keys (the 2021
# seed checkpoint has neither and was trained without normalization).
DEFAULT_NORMALIZE_TEXT = False
DEFAULT_MAX_TEXT_LENGTH = 64

# Keyword arguments that transformers' AutoProcessor / pipelines pass along and that have no
# meaning here.
_IGNORED_LOAD_KWARGS = ("trust_remote_code", "_from_auto", "_from_pipeline", "code_revision")


class DalleMiniProcessor(ProcessorMixin):
  """Turns prompts into the ``input_ids`` / ``attention_mask`` DALL·E mini's encoder reads.

  Args:
    tokenizer: the model's byte-level BPE tokenizer (:class:`DalleBartTokenizer`).
    normalize_text: apply :class:`TextNormalizer` to prompts first (True for the released
      mini-1 / mega-1 models).
    max_text_length: every row is padded or truncated to this many tokens (the model's
      ``max_text_length``, 64 for mini / mega).
    text_normalizer: the normalizer to use; by default one without a hashtag word list (use
      :meth:`from_pretrained` to get the model's list).

  Raises:
    ValueError: ``max_text_length`` is below 2 (no room for ``<s>`` and ``</s>``).
    TypeError: an argument has the wrong type.
  """

  def __init__(
      self,
      tokenizer: Any,
      normalize_text: bool = True,
      max_text_length: int = DEFAULT_MAX_TEXT_LENGTH,
      text_normalizer: TextNormalizer | None = None,
  ):
    super().__init__(tokenizer)
    if not isinstance(normalize_text, bool):
      raise TypeError(f"normalize_text must be a bool, got {type(normalize_text).__name__}.")
    if isinstance(max_text_length, bool) or not isinstance(max_text_length, int):
      raise TypeError(f"max_text_length must be an int, got {type(max_text_length).__name__}.")
    if max_text_length < 2:
      raise ValueError(
          f"max_text_length must be at least 2 (<s> and </s>), got {max_text_length}; use the "
          "model config's max_text_length (64 for mini / mega)."
      )
    if text_normalizer is not None and not isinstance(text_normalizer, TextNormalizer):
      raise TypeError(
          f"text_normalizer must be a TextNormalizer, got {type(text_normalizer).__name__}."
      )
    self.normalize_text = normalize_text
    self.max_text_length = max_text_length
    self.text_normalizer = text_normalizer

  # --- loading and saving ---------------------------------------------------------------------

  @classmethod
  def from_pretrained(
      cls,
      pretrained_model_name_or_path: str | os.PathLike,
      cache_dir: str | os.PathLike | None = None,
      force_download: bool = False,
      local_files_only: bool = False,
      token: str | bool | None = None,
      revision: str | None = None,
      *,
      subfolder: str = "",
      normalize_text: bool | None = None,
      max_text_length: int | None = None,
      text_normalizer: TextNormalizer | None = None,
      seed: int | random.Random | None = 0,
      **kwargs: Any,
  ) -> DalleMiniProcessor:
    """Loads the tokenizer and text settings of a model folder or Hub repo.

    Reads the tokenizer files (``vocab.json`` + ``merges.txt`` or ``tokenizer.json``, legacy
    ``tokenizer_config.json`` included), then ``normalize_text`` / ``max_text_length`` from
    ``processor_config.json`` if present, else from the raw keys of ``config.json`` (top level,
    or its ``text_config``), else the original defaults (False, 64). ``enwiki-words-frequency.txt``
    is used for hashtags when present.

    Args:
      pretrained_model_name_or_path: a local folder or a Hub repo id such as
        ``"dalle-mini/dalle-mini"``.
      cache_dir: Hugging Face cache folder.
      force_download: re-download files even if cached.
      local_files_only: never touch the network.
      token: Hub token for private repos.
      revision: branch, tag or commit of the repo.
      subfolder: folder inside the repo / folder holding the files.
      normalize_text: overrides the stored setting.
      max_text_length: overrides the stored setting.
      text_normalizer: use this normalizer instead of building one.
      seed: ``<person>`` randomness of the built normalizer (see :class:`TextNormalizer`).
      **kwargs: only the loader keywords transformers' ``AutoProcessor`` passes along.

    Returns:
      The processor.

    Raises:
      TypeError: an unknown keyword argument.
      ValueError: a settings file is not valid JSON.
    """
    for key in _IGNORED_LOAD_KWARGS:
      kwargs.pop(key, None)
    if kwargs:
      raise TypeError(
          f"DalleMiniProcessor.from_pretrained got unexpected keyword arguments {sorted(kwargs)}; "
          "accepted: cache_dir, force_download, local_files_only, token, revision, subfolder, "
          "normalize_text, max_text_length, text_normalizer, seed."
      )
    options = HubOptions(revision=revision, cache_dir=cache_dir, token=token,
                         local_files_only=local_files_only, force_download=force_download,
                         subfolder=subfolder)
    tokenizer = DalleBartTokenizer.from_pretrained(pretrained_model_name_or_path,
                                                   **options.from_pretrained_kwargs())
    settings = _read_text_settings(pretrained_model_name_or_path, options)
    if normalize_text is None:
      normalize_text = bool(settings.get("normalize_text", DEFAULT_NORMALIZE_TEXT))
    if max_text_length is None:
      max_text_length = settings.get("max_text_length", DEFAULT_MAX_TEXT_LENGTH)
    if text_normalizer is None and normalize_text:
      text_normalizer = TextNormalizer.from_pretrained(pretrained_model_name_or_path, seed=seed,
                                                       **options.from_pretrained_kwargs())
    return cls(tokenizer, normalize_text=normalize_text, max_text_length=max_text_length,
               text_normalizer=text_normalizer)

  def to_dict(self) -> dict[str, Any]:
    """The content of ``processor_config.json``."""
    return {
        "processor_class": type(self).__name__,
        "normalize_text": self.normalize_text,
        "max_text_length": self.max_text_length,
    }

  def save_pretrained(
      self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs: Any
  ) -> list[str]:
    """Writes the tokenizer (transformers 5.x layout), ``processor_config.json`` and the hashtag
    word list (``enwiki-words-frequency.txt``, when the normalizer has one).

    Args:
      save_directory: target folder (created if needed).
      push_to_hub: also upload to the Hub repo ``kwargs["repo_id"]`` (default: the folder name);
        the other ``kwargs`` go to :meth:`push_to_hub` (``commit_message``, ``private``,
        ``token``, ``revision``, ``create_pr``...).

    Returns:
      The paths of the written settings files.
    """
    save_directory = os.fspath(save_directory)
    if push_to_hub:
      repo_id = kwargs.pop("repo_id", Path(save_directory).name)
      written = self.save_pretrained(save_directory)
      self.push_to_hub(repo_id, **kwargs)
      return written
    kwargs.pop("max_shard_size", None)  # passed by PushToHubMixin.push_to_hub; weights only
    if kwargs:
      raise TypeError(
          f"DalleMiniProcessor.save_pretrained got unexpected keyword arguments {sorted(kwargs)}."
      )
    written = [os.fspath(p) for p in super().save_pretrained(save_directory)]
    if self.text_normalizer is not None:
      words = self.text_normalizer.save_word_frequencies(save_directory)
      if words is not None:
        written.append(os.fspath(words))
    return written

  # --- processing -----------------------------------------------------------------------------

  def normalize(self, text: str) -> str:
    """Returns ``text`` as the model sees it: normalized if ``normalize_text``, else unchanged."""
    if not self.normalize_text:
      return text
    if self.text_normalizer is None:
      self.text_normalizer = TextNormalizer()
    return self.text_normalizer(text)

  def __call__(
      self,
      text: str | Sequence[str],
      negative_prompt: str | Sequence[str] | None = None,
      *,
      return_tensors: str = "np",
  ) -> BatchFeature:
    """Tokenizes prompts, and the negative prompts / unconditional rows used by guidance.

    Args:
      text: one prompt or a list of prompts (b of them).
      negative_prompt: None for the original unconditional row (raw ``""``, not normalized);
        else one string for every prompt or a list of b strings, normalized like prompts (an
        empty string stays the raw unconditional row).
      return_tensors: ``"np"`` (numpy) or ``"jax"``.

    Returns:
      A ``BatchFeature`` of int32 arrays, each (b, max_text_length): ``input_ids``,
      ``attention_mask``, ``negative_prompt_ids``, ``negative_prompt_attention_mask``, and the
      DALL·E mini names of the last two, ``input_ids_uncond`` and ``attention_mask_uncond``
      (the same arrays).

    Raises:
      TypeError: a prompt is not a string.
      ValueError: no prompts, a negative prompt list of the wrong length, or an unknown
        ``return_tensors``.
    """
    if return_tensors not in ("np", "jax"):
      raise ValueError(f"return_tensors must be 'np' or 'jax', got {return_tensors!r}.")
    prompts = _as_prompt_list(text, "text")
    input_ids, attention_mask = self._encode([self.normalize(p) for p in prompts], "prompt")
    if negative_prompt is None:
      negatives = [""]
    else:
      negatives = _as_prompt_list(negative_prompt, "negative_prompt")
      if len(negatives) not in (1, len(prompts)):
        raise ValueError(
            f"Got {len(negatives)} negative prompts for {len(prompts)} prompts; pass one string "
            "for all of them or a list with one negative prompt per prompt."
        )
    negative_ids, negative_mask = self._encode(
        [self.normalize(p) if p else p for p in negatives], "negative prompt")
    if len(negatives) == 1:
      negative_ids = np.repeat(negative_ids, len(prompts), axis=0)
      negative_mask = np.repeat(negative_mask, len(prompts), axis=0)
    data = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "negative_prompt_ids": negative_ids,
        "negative_prompt_attention_mask": negative_mask,
        "input_ids_uncond": negative_ids,
        "attention_mask_uncond": negative_mask,
    }
    if return_tensors == "jax":
      import jax.numpy as jnp  # deferred: tokenizing needs no accelerator runtime

      data = {key: jnp.asarray(value) for key, value in data.items()}
    return BatchFeature(data)

  def _encode(self, texts: list[str], kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Tokenizes to (n, max_text_length) int32 ids and mask, warning about truncation."""
    lengths = [len(ids) for ids in self.tokenizer(texts, truncation=False)["input_ids"]]
    too_long = {i: n - self.max_text_length for i, n in enumerate(lengths)
                if n > self.max_text_length}
    if too_long:
      details = ", ".join(f"{kind} {i} dropped {n} token(s)" for i, n in too_long.items())
      logger.warning(
          "Truncated %d %s(s) to max_text_length=%d tokens, keeping the end token: %s.",
          len(too_long), kind, self.max_text_length, details,
      )
    encoded = self.tokenizer(texts, padding="max_length", truncation=True,
                             max_length=self.max_text_length, return_tensors="np")
    return (encoded["input_ids"].astype(np.int32),  # (n, max_text_length)
            encoded["attention_mask"].astype(np.int32))


def _as_prompt_list(value: Any, name: str) -> list[str]:
  """Checks that ``value`` is a str or a non-empty list / tuple of str."""
  if isinstance(value, str):
    return [value]
  if not isinstance(value, (list, tuple)):
    raise TypeError(
        f"{name} must be a string or a list of strings, got {type(value).__name__}; "
        f"pass e.g. {name}=['an avocado armchair']."
    )
  if not value:
    raise ValueError(f"{name} is an empty list; pass at least one string.")
  for i, item in enumerate(value):
    if not isinstance(item, str):
      raise TypeError(f"{name}[{i}] must be a string, got {type(item).__name__}: {item!r}.")
  return list(value)


def _read_text_settings(path_or_repo_id: str | os.PathLike, options: HubOptions) -> dict[str, Any]:
  """``normalize_text`` / ``max_text_length`` from processor_config.json, else config.json.

  A 2021 seed config (model_type "bart") has neither key: its settings are those of the
  converted model (``convert_bart2021_config``: 128 tokens as its notebook, no normalization).
  """
  from .convert.bart2021 import convert_bart2021_config, is_bart2021_config

  settings: dict[str, Any] = {}
  config = _read_json(resolve_file(path_or_repo_id, "config.json", options, required=False))
  if is_bart2021_config(config):
    converted = convert_bart2021_config(config)
    config = {"normalize_text": converted.normalize_text, "max_text_length": converted.max_text_length}
  for source in (config.get("text_config") or {}, config):  # composite folder, then top level
    settings.update({k: source[k] for k in ("normalize_text", "max_text_length") if k in source})
  processor_config = _read_json(resolve_file(path_or_repo_id, PROCESSOR_CONFIG_FILE, options,
                                             required=False))
  settings.update({k: processor_config[k] for k in ("normalize_text", "max_text_length")
                   if k in processor_config})
  return settings


def _read_json(path: Path | None) -> dict[str, Any]:
  return {} if path is None else read_json_object(path)


def register() -> None:
  """Registers the text classes with transformers' Auto factories; idempotent.

  ``AutoTokenizer`` then resolves ``"tokenizer_class": "DalleBartTokenizer"`` and
  ``AutoProcessor`` resolves ``"processor_class": "DalleMiniProcessor"`` (written by
  :meth:`DalleMiniProcessor.save_pretrained`); keyed by ``DalleBartConfig``, ``AutoProcessor``
  also works on the released repos, which have no ``processor_config.json``. (The composite
  ``DalleMiniConfig`` is registered by ``dalle_flax.pipelines.configuration``.)
  """
  from .configuration_dalle_mini import DalleBartConfig

  AutoTokenizer.register(DalleBartConfig, tokenizer_class=DalleBartTokenizer, exist_ok=True)
  AutoProcessor.register(DalleBartConfig, DalleMiniProcessor, exist_ok=True)
