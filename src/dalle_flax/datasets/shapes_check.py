"""A deterministic checker of single-shape images, built on the shapes renderer's own vocabulary.

Example: ``score(pipe(prompts, seed=...), scenes)`` or ``evaluate(pipe, eval_prompts(200))``.

:func:`check_image` reads an image the way a person reading the caption would: the background is
the named colour nearest the median border pixel; the shape is every pixel far from that
background; its colour is the named colour nearest the median of their core, its pixels those at
least half-way from the background to that colour, its position the anchor nearest their
centroid, and its shape (and size) the rendered template with the best IoU. No learned parts:
the same image always gets the same answer, and clean renders of the scenes score (about) 100%.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from .shapes import ANCHORS, COLOURS, POSITIONS, SHAPES, SIZES, Scene, shape_mask

__all__ = ["ATTRIBUTES", "Prediction", "check_image", "evaluate", "score"]

ATTRIBUTES = ("background", "colour", "shape", "position")
"""What :func:`score` requires for "all"; it also reports "size"."""
_NAMES = tuple(COLOURS)
_RGB = np.asarray([COLOURS[name] for name in _NAMES], np.float64)  # (10, 3)
_THRESHOLD = 60.0  # RGB distance from the background beyond which a pixel is shape (colours: >= 127)
_MIN_PIXELS = 4  # fewer shape pixels than this: no shape


@dataclasses.dataclass(frozen=True)
class Prediction:
  """What :func:`check_image` read from one image.

  Attributes:
    background: the named colour of the border.
    colour, shape, position, size: the shape's attributes; all None when no pixel stands out.
    shape_iou: IoU of the shape's pixels with the best template (0 with no shape).
    mask_fraction: fraction of the image that is shape pixels.
  """

  background: str
  colour: str | None
  shape: str | None
  position: str | None
  size: str | None = None
  shape_iou: float = 0.0
  mask_fraction: float = 0.0


def _nearest_colour(rgb: np.ndarray) -> str:
  return _NAMES[int(np.argmin(np.linalg.norm(_RGB - rgb, axis=1)))]


def _to_array(image: Any, size: int) -> np.ndarray:
  """(size, size, 3) float64 in [0, 255] from a PIL image or an HWC uint8 / float array."""
  if isinstance(image, Image.Image):
    pil = image.convert("RGB")
  else:
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
      raise ValueError(f"expected an (H, W, 3) image array, got shape {array.shape}; pass one image "
                       "at a time (channels last)")
    array = array[..., :3]
    if array.dtype != np.uint8:
      array = array.astype(np.float64)
      if array.max(initial=0.0) <= 1.0:  # [0, 1] floats
        array = array * 255.0
      array = np.clip(np.rint(array), 0, 255).astype(np.uint8)
    pil = Image.fromarray(array)
  if pil.size != (size, size):
    pil = pil.resize((size, size), Image.Resampling.BOX)
  return np.asarray(pil, np.float64)


@functools.lru_cache(maxsize=4)
def _templates(size: int) -> dict[str, Any]:
  """Binary masks of every (shape, size) at every anchor, and centred with their centroids."""
  at_anchor, centred = {}, {}
  for shape, size_name in itertools.product(SHAPES, SIZES):
    for position in POSITIONS:
      at_anchor[shape, size_name, position] = shape_mask(shape, size_name, position, size) >= 0.5
    mask = shape_mask(shape, size_name, (0.5, 0.5), size) >= 0.5
    ys, xs = np.nonzero(mask)
    centred[shape, size_name] = (mask, float(ys.mean()), float(xs.mean()))
  return {"anchor": at_anchor, "centred": centred}


def _shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
  """``mask`` moved by (dy, dx) pixels, filling with False (no wrap-around)."""
  out = np.zeros_like(mask)
  h, w = mask.shape
  src = mask[max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
  out[max(0, dy):max(0, dy) + src.shape[0], max(0, dx):max(0, dx) + src.shape[1]] = src
  return out


def _iou(a: np.ndarray, b: np.ndarray) -> float:
  union = np.count_nonzero(a | b)
  return np.count_nonzero(a & b) / union if union else 0.0


def check_image(image: Any, size: int = 64) -> Prediction:
  """Reads background, shape colour, shape, position (and size) from a single-shape image.

  Args:
    image: a PIL image, or an (H, W, 3) array: uint8, or floats in [0, 1] or [0, 255]. Resized
      (box filter) to ``size`` x ``size`` when it is not.
    size: the side the templates are rendered at.

  Returns:
    A :class:`Prediction`; with no pixel far from the background, colour/shape/position are None
    (which :func:`score` counts as wrong).
  """
  pixels = _to_array(image, size)  # (size, size, 3)
  border = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3),
                           pixels[:, :2].reshape(-1, 3), pixels[:, -2:].reshape(-1, 3)])
  background_rgb = np.median(border, axis=0)
  background = _nearest_colour(background_rgb)
  distance = np.linalg.norm(pixels - background_rgb, axis=-1)  # (size, size)
  mask = distance > _THRESHOLD
  count = int(np.count_nonzero(mask))
  if count < _MIN_PIXELS:
    return Prediction(background, None, None, None, mask_fraction=count / mask.size)
  # The colour of the core (the half farthest from the background), free of blended edge pixels.
  core = mask & (distance >= np.median(distance[mask]))
  colour_rgb = np.median(pixels[core], axis=0)
  colour = _nearest_colour(colour_rgb)
  # Coverage: where each pixel lies between background and shape colour; the shape is > 1/2, as
  # the templates are (a fixed threshold would grow high-contrast shapes under blur).
  contrast = colour_rgb - background_rgb
  coverage = (pixels - background_rgb) @ contrast / max(float(contrast @ contrast), 1.0)
  if np.count_nonzero(coverage > 0.5) >= _MIN_PIXELS:
    mask = coverage > 0.5
    count = int(np.count_nonzero(mask))
  ys, xs = np.nonzero(mask)
  cy, cx = float(ys.mean()), float(xs.mean())
  centroid = np.array([(cx + 0.5) / size, (cy + 0.5) / size])
  position = min(POSITIONS, key=lambda p: float(np.linalg.norm(np.subtract(ANCHORS[p], centroid))))
  templates = _templates(size)
  best, best_iou = None, -1.0
  for shape, size_name in itertools.product(SHAPES, SIZES):
    template, ty, tx = templates["centred"][shape, size_name]
    moved = _shift(template, round(cy - ty), round(cx - tx))
    iou = max(_iou(mask, templates["anchor"][shape, size_name, position]), _iou(mask, moved))
    if iou > best_iou:
      best, best_iou = (shape, size_name), iou
  return Prediction(background, colour, best[0], position, best[1], shape_iou=float(best_iou),
                    mask_fraction=count / mask.size)


def score(images: Sequence[Any], scenes: Sequence[Scene], size: int = 64) -> dict[str, Any]:
  """Accuracy of :func:`check_image` on ``images`` against the single-shape ``scenes``.

  Returns:
    ``{"background", "colour", "shape", "position", "size", "all"}`` accuracies in [0, 1] ("all":
    the four ``ATTRIBUTES`` right at once; size is reported apart), ``"num_images"``,
    ``"correct"`` (the same keys as counts) and ``"num_empty"`` (images where no shape was found).
  """
  if len(images) != len(scenes):
    raise ValueError(f"got {len(images)} images for {len(scenes)} scenes; pass one image per scene")
  keys = (*ATTRIBUTES, "size", "all")
  correct = dict.fromkeys(keys, 0)
  empty = 0
  for image, scene in zip(images, scenes):
    if len(scene.shapes) != 1:
      raise ValueError(f"score checks single-shape scenes, got {len(scene.shapes)} shapes in {scene}")
    truth, prediction = scene.shapes[0], check_image(image, size)
    empty += prediction.shape is None
    right = {"background": prediction.background == scene.background,
             "colour": prediction.colour == truth.colour, "shape": prediction.shape == truth.shape,
             "position": prediction.position == truth.position, "size": prediction.size == truth.size}
    right["all"] = all(right[a] for a in ATTRIBUTES)
    for key in keys:
      correct[key] += right[key]
  n = len(images)
  return {**{key: correct[key] / n if n else 0.0 for key in keys}, "num_images": n,
          "correct": correct, "num_empty": empty}


def evaluate(pipe: Any, prompts_and_scenes: Sequence[tuple[str, Scene]],
             guidance_scale: float | None = None, seed: int = 0, batch_size: int | None = None,
             return_images: bool = False) -> dict[str, Any]:
  """Generates one image per prompt with ``pipe`` and scores it against its scene.

  Args:
    pipe: a text-to-image pipeline (``dalle_flax.pipeline("text-to-image", ...)``).
    prompts_and_scenes: (caption, scene) pairs, as from ``eval_prompts``.
    guidance_scale: passed to the pipeline (1 turns guidance off; None: the model's default).
    seed: image i gets seed ``seed + i``, so settings compare on the same seeds.
    batch_size: the most images per generate call (None: the pipeline's default).
    return_images: also return the PIL images under ``"images"``.

  Returns:
    :func:`score`'s dict plus ``"guidance_scale"`` and ``"seed"`` (and ``"images"``).
  """
  if not prompts_and_scenes:
    raise ValueError("prompts_and_scenes is empty; pass at least one (caption, scene) pair")
  prompts = [prompt for prompt, _ in prompts_and_scenes]
  scenes = [scene for _, scene in prompts_and_scenes]
  outputs = pipe(prompts, seed=[seed + i for i in range(len(prompts))],
                 guidance_scale=guidance_scale, batch_size=batch_size)
  images = [per_prompt[0] for per_prompt in outputs]  # one image per prompt
  result = {"guidance_scale": guidance_scale, "seed": seed, **score(images, scenes)}
  if return_images:
    result["images"] = images
  return result
