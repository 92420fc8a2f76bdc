"""Re-rank generated images by CLIP similarity to the prompt, as the dalle-mini notebook did.

Example: ``best_first = rerank_with_clip(pipe("a red fox", num_images_per_prompt=8), "a red fox")``.

Uses transformers' PyTorch CLIP (the optional ``[torch]`` extra); nothing else in dalle_flax
needs torch. Scores are CLIP's ``logits_per_image`` (100 x cosine similarity, scaled by the
model's learned logit scale), the "score" the notebook displayed.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from ..image_utils import to_pil

__all__ = ["DEFAULT_CLIP_MODEL", "rerank_with_clip"]

DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"


def _require_torch() -> Any:
  try:
    import torch
  except ImportError as e:
    raise ImportError(
        "rerank_with_clip runs transformers' CLIP, which needs PyTorch; install it with "
        'pip install "dalle-flax[torch]".'
    ) from e
  return torch


@functools.lru_cache(maxsize=2)
def _load_clip(name_or_path: str, revision: str | None) -> tuple[Any, Any]:
  from transformers import CLIPModel, CLIPProcessor

  model = CLIPModel.from_pretrained(name_or_path, revision=revision).eval()
  return model, CLIPProcessor.from_pretrained(name_or_path, revision=revision)


def rerank_with_clip(
    images: Sequence[Image.Image] | np.ndarray,
    prompt: str,
    model: str | os.PathLike | Any = DEFAULT_CLIP_MODEL,
    *,
    processor: Any = None,
    revision: str | None = None,
    batch_size: int = 16,
    return_scores: bool = False,
) -> list[Image.Image] | tuple[list[Image.Image], list[float]]:
  """Sorts ``images`` from most to least similar to ``prompt`` according to CLIP.

  Args:
    images: PIL images, or an (n, H, W, 3) array (floats in [0, 1] or uint8).
    prompt: the text the images were generated from.
    model: a CLIP repo id or folder (loaded once and cached), or a loaded ``CLIPModel``.
    processor: the ``CLIPProcessor`` (default: loaded from ``model``; required for a loaded model).
    revision: revision of a ``model`` repo id.
    batch_size: images scored per forward pass.
    return_scores: also return the sorted scores.

  Returns:
    The images, best first (ties keep their order), and with ``return_scores`` their scores.

  Raises:
    ImportError: PyTorch is not installed.
    ValueError: no images, or a loaded model without a processor.
  """
  torch = _require_torch()
  if not (isinstance(images, Sequence) and all(isinstance(i, Image.Image) for i in images)):
    images = to_pil(images)
  images = list(images)
  if not images:
    raise ValueError("rerank_with_clip got no images.")
  if not isinstance(prompt, str):
    raise TypeError(f"prompt must be a string, got {type(prompt).__name__}.")
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
  if isinstance(model, (str, os.PathLike)):
    clip, loaded_processor = _load_clip(os.fspath(model), revision)
    processor = processor or loaded_processor
  else:
    clip = model
    if processor is None:
      raise ValueError(
          "model is a loaded CLIPModel; pass processor=CLIPProcessor.from_pretrained(...) too.")
  scores: list[float] = []
  device = next(clip.parameters()).device
  with torch.no_grad():
    for start in range(0, len(images), batch_size):
      inputs = processor(text=[prompt], images=images[start:start + batch_size],
                         return_tensors="pt", padding=True)
      output = clip(**{k: v.to(device) for k, v in inputs.items()})
      scores.extend(output.logits_per_image[:, 0].float().cpu().tolist())
  order = sorted(range(len(images)), key=lambda i: -scores[i])
  ranked = [images[i] for i in order]
  return (ranked, [scores[i] for i in order]) if return_scores else ranked
