"""The bundled default model: a small DALL·E mini trained by dalle-flax itself, shipped in the package.

Example: ``pipe = dalle_flax.pipeline("text-to-image")`` (no model: this one, offline).

``shapes/`` is a single-folder pipeline (safetensors text model + VQGAN, tokenizer, processor,
generation defaults) that ``scripts/train_shapes_model.py`` trains from scratch on
:mod:`dalle_flax.datasets.shapes` in under an hour on a 2-core CPU; its ``README.md`` is the
model card (data, recipe, curves, evaluation, limits). It draws coloured shapes on coloured
backgrounds at 64x64 ("a small red circle on the left, on a blue background"); for real
pictures load ``dalle-mini/dalle-mini``.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["BUNDLED_MODEL", "bundled_model"]

BUNDLED_MODEL = Path(__file__).resolve().parent / "shapes"


def bundled_model() -> Path:
  """The bundled pipeline folder.

  Raises:
    FileNotFoundError: the installation has no bundled weights (a build that left out the
      package data); reinstall dalle-flax, or pass a model explicitly.
  """
  if not (BUNDLED_MODEL / "config.json").is_file():
    raise FileNotFoundError(
        f"the bundled default model is missing from this installation (expected {BUNDLED_MODEL}/config.json); "
        "reinstall dalle-flax (`pip install --force-reinstall dalle-flax`) or pass a model, e.g. "
        "model='dalle-mini/dalle-mini'.")
  return BUNDLED_MODEL
