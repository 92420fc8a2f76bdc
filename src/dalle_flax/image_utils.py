"""Conversions between VQGAN pixel arrays and PIL images, and image grids.

Example: ``make_image_grid(to_pil(vqgan.decode_code(codes)), rows=2, cols=2).save("grid.png")``.

Pixel arrays are NHWC floats in [0, 1], dalle-mini's convention for both the VQGAN encoder input
and its decoder output. Decoded images are not clipped by the model; :func:`to_uint8` clips.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["from_pil", "make_image_grid", "to_pil", "to_uint8"]


def to_uint8(images: Any) -> np.ndarray:
  """Clips float images to [0, 1] and converts them to uint8, as every dalle-mini pipeline did.

  The conversion is ``(clip(x, 0, 1) * 255).astype(uint8)``, which truncates (floors) rather than
  rounds: 0.999 -> 254, and only exactly 1.0 gives 255. This reproduces the images of the
  original notebook and min-dalle bit for bit.

  Args:
    images: float array of any shape (typically (b, H, W, 3) or (H, W, 3)); a jax array works.

  Returns:
    uint8 numpy array of the same shape.

  Raises:
    TypeError: ``images`` is not a floating-point array (uint8 images need no conversion).
    ValueError: ``images`` contains NaN.
  """
  images = np.asarray(images)
  if not np.issubdtype(images.dtype, np.floating) and images.dtype.name != "bfloat16":
    raise TypeError(f"to_uint8 expects float images in [0, 1], got dtype {images.dtype}")
  images = images.astype(np.float32)
  if np.isnan(images).any():
    raise ValueError("images contain NaN values; check the decoder parameters and the codes")
  return (np.clip(images, 0.0, 1.0) * 255).astype(np.uint8)


def to_pil(images: Any) -> list[Image.Image]:
  """Converts a batch of images to a list of PIL images.

  Args:
    images: (b, H, W, C) or a single (H, W, C) image, C in {1, 3}; floats in [0, 1] (clipped as
      in :func:`to_uint8`) or uint8.

  Returns:
    A list of ``b`` (or 1) PIL images, mode "RGB" (C=3) or "L" (C=1).
  """
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[None]
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(
        f"to_pil expects (batch, height, width, 3) or (height, width, 3) images, got shape "
        f"{images.shape}; channels must be last"
    )
  if images.dtype != np.uint8:
    images = to_uint8(images)
  if images.shape[-1] == 1:
    return [Image.fromarray(image[..., 0], mode="L") for image in images]
  return [Image.fromarray(image, mode="RGB") for image in images]


def _center_crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
  # torchvision's CenterCrop offsets: int(round((dim - size) / 2)).
  left = int(round((width - size) / 2.0))
  top = int(round((height - size) / 2.0))
  return left, top, left + size, top + size


def from_pil(images: Image.Image | str | os.PathLike | Sequence[Any], size: int = 256) -> np.ndarray:
  """Prepares images for ``FlaxVQGANModel.encode`` like dalle-mini's dataset encoding.

  Each image is converted to RGB, resized so its short side is ``size`` with LANCZOS (the long
  side becomes ``int(size * long / short)``, as torchvision's ``Resize(size)``), center-cropped to
  ``size`` x ``size`` (torchvision's ``CenterCrop`` offsets) and scaled to [0, 1].

  Args:
    images: a PIL image, a path, or a sequence of them.
    size: output side; a multiple of the VQGAN downsampling factor (16), 256 for the released
      models.

  Returns:
    (b, size, size, 3) float32 array in [0, 1].
  """
  if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
    raise ValueError(f"size must be a positive int, got {size!r}")
  if isinstance(images, (Image.Image, str, os.PathLike)):
    images = [images]
  batch = []
  for i, image in enumerate(images):
    if isinstance(image, (str, os.PathLike)):
      with Image.open(image) as opened:
        image = opened.convert("RGB")
    elif isinstance(image, Image.Image):
      image = image.convert("RGB")
    else:
      raise TypeError(f"images[{i}] must be a PIL image or a file path, got {type(image).__name__}")
    width, height = image.size
    if width <= height:
      new_size = (size, int(size * height / width))
    else:
      new_size = (int(size * width / height), size)
    image = image.resize(new_size, Image.Resampling.LANCZOS)
    image = image.crop(_center_crop_box(*new_size, size))
    batch.append(np.asarray(image, dtype=np.float32) / 255.0)
  if not batch:
    raise ValueError("from_pil got no images")
  return np.stack(batch)


def make_image_grid(images: Any, rows: int, cols: int) -> Image.Image:
  """Pastes equally sized images into one ``rows`` x ``cols`` grid, row by row.

  Image ``k`` goes to row ``k // cols``, column ``k % cols`` (the order ``decode_seamless`` uses).

  Args:
    images: a sequence of PIL images, or an array accepted by :func:`to_pil`.
    rows, cols: grid size; ``rows * cols`` must equal the number of images.

  Returns:
    One PIL image of size (cols * width, rows * height).
  """
  if not (isinstance(images, Sequence) and all(isinstance(im, Image.Image) for im in images)):
    images = to_pil(images)
  for name, value in (("rows", rows), ("cols", cols)):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
      raise ValueError(f"{name} must be a positive int, got {value!r}")
  if rows * cols != len(images):
    raise ValueError(
        f"a {rows}x{cols} grid holds rows*cols = {rows * cols} images, got {len(images)}; pass "
        "rows and cols whose product is the number of images"
    )
  width, height = images[0].size
  sizes = {im.size for im in images}
  if len(sizes) != 1:
    raise ValueError(f"all images must have the same size, got sizes {sorted(sizes)}")
  grid = Image.new(images[0].mode, (cols * width, rows * height))
  for k, image in enumerate(images):
    grid.paste(image, ((k % cols) * width, (k // cols) * height))
  return grid
