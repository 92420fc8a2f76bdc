"""``DalleMiniConfig``: the composite config of a single-folder DALL·E mini pipeline.

Example: ``config = DalleMiniConfig(text_config=text_model.config, vqgan_config=vqgan.config)``.

A pipeline folder's ``config.json`` holds this config (``model_type: "dalle-mini"``): the text
model's :class:`~dalle_flax.DalleBartConfig` under ``text_config`` and the VQGAN's
:class:`~dalle_flax.VQGANConfig` under ``vqgan_config``. :func:`register` makes
``transformers.AutoConfig`` resolve it, which ``transformers.pipeline(...)`` needs.
"""

from __future__ import annotations

import math
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, AutoProcessor, AutoTokenizer, PreTrainedConfig

from ..configuration_dalle_mini import DalleBartConfig
from ..configuration_utils import CheckedConfigMixin
from ..configuration_vqgan import VQGANConfig

__all__ = ["DalleMiniConfig", "register"]


@strict
class DalleMiniConfig(CheckedConfigMixin, PreTrainedConfig):
  r"""Configuration of a whole DALL·E mini text-to-image pipeline (text model + VQGAN).

  Args:
    text_config: the text-to-image-token model's config (a ``DalleBartConfig`` or its dict).
    vqgan_config: the image decoder's config (a ``VQGANConfig`` or its dict).

  Raises:
    ValueError: the two configs do not fit together: ``image_length`` is not a square number
      of codes, or the VQGAN codebook is larger than the text model's image vocabulary.
  """

  model_type = "dalle-mini"
  sub_configs_defaults = {"text_config": DalleBartConfig, "vqgan_config": VQGANConfig}

  text_config: dict | DalleBartConfig | None = None
  vqgan_config: dict | VQGANConfig | None = None

  def __post_init__(self, **kwargs: Any) -> None:
    super().__post_init__(**kwargs)
    self._check_components()

  def validate_components(self) -> None:
    """Part of ``@strict`` validation (also run at save time)."""
    self._check_components()

  def _check_components(self) -> None:
    text, vqgan = self.text_config, self.vqgan_config
    if not isinstance(text, DalleBartConfig) or not isinstance(vqgan, VQGANConfig):
      return  # still being built by __post_init__
    side = math.isqrt(text.image_length)
    if side * side != text.image_length:
      raise ValueError(
          f"text_config.image_length={text.image_length} is not a square number, so its codes "
          "cannot form the square code map a VQGAN decodes (256 = 16x16 for the released models)."
      )
    if vqgan.n_embed > text.image_vocab_size:
      raise ValueError(
          f"vqgan_config.n_embed={vqgan.n_embed} is larger than text_config.image_vocab_size="
          f"{text.image_vocab_size}: the text model cannot produce every code of this VQGAN. Pair "
          "the text model with the VQGAN it was trained with (dalle-mini/vqgan_imagenet_f16_16384 "
          "for mini-1 and mega-1)."
      )

  @property
  def image_size(self) -> int:
    """Side in pixels of a generated image: ``sqrt(image_length) * downsample_factor``."""
    return math.isqrt(self.text_config.image_length) * self.vqgan_config.downsample_factor


def register() -> None:
  """Registers ``"dalle-mini"`` with ``AutoConfig`` and maps it to the DALL·E mini processor and
  tokenizer in ``AutoProcessor`` / ``AutoTokenizer``; idempotent."""
  from ..processing_dalle_mini import DalleMiniProcessor
  from ..tokenization_dalle_mini import DalleBartTokenizer

  AutoConfig.register(DalleMiniConfig.model_type, DalleMiniConfig, exist_ok=True)
  AutoTokenizer.register(DalleMiniConfig, tokenizer_class=DalleBartTokenizer, exist_ok=True)
  AutoProcessor.register(DalleMiniConfig, DalleMiniProcessor, exist_ok=True)
