"""Output of :class:`~dalle_flax.TextToImagePipeline` when called with ``return_dict=True``.

Example: ``out = pipe("a red fox", seed=0, return_dict=True); out.images[0].save("fox.png")``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from PIL import Image


@dataclasses.dataclass
class TextToImagePipelineOutput:
  """Images, the VQGAN codes they decode from, and the seed of each image.

  Every field is nested like the prompt: a flat list over images for one prompt (a string), a
  list per prompt for a list of prompts. ``pipe(prompt, seed=out.seeds[i])`` regenerates image
  ``i`` alone (``out.seeds[p][i]`` for prompt ``p`` of a list); with ``grid``/``seamless`` each
  prompt has one image but still one seed and code map per generated tile.

  Attributes:
    images: PIL images (``output_type="pil"``), float32 arrays in [0, 1] of shape (n, H, W, 3)
      per prompt (``"np"``), or the codes again (``"tokens"``).
    image_tokens: int32 codes, (n, image_length) per prompt.
    seeds: the seed of each image, or None when the call used ``prng_key``.
  """

  images: list[Image.Image] | list[list[Image.Image]] | np.ndarray
  image_tokens: np.ndarray
  seeds: list[int] | list[list[int]] | None

  def __getitem__(self, index: int | str) -> Any:
    """``out[0]`` / ``out["images"]``, as diffusers' outputs index like a tuple and a dict."""
    if isinstance(index, str):
      return getattr(self, index)
    return self.to_tuple()[index]

  def to_tuple(self) -> tuple[Any, ...]:
    return tuple(getattr(self, field.name) for field in dataclasses.fields(self))
